#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs Garage 2.5.0 when missing, starts a
# throwaway single-node Garage on loopback (non-default ports), runs every test against it and
# against loop devices, and stops Garage afterwards. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/garage.sh install

garage_dir=$(mktemp -d "${TMPDIR:-/tmp}/ferry-garage.XXXXXX")
cleanup() {
  scripts/garage.sh stop "$garage_dir" || true
  rm -rf "$garage_dir"
}
trap cleanup EXIT
scripts/garage.sh start "$garage_dir"
# shellcheck disable=SC1091
source "$garage_dir/env"

# Make the environment-gated tests mandatory here: skipping them would hide a broken setup.
export FERRY_TEST_REQUIRE_S3=1
if [ "$(id -u)" = 0 ]; then
  export FERRY_TEST_REQUIRE_LOOP=1
fi

cargo fmt --all -- --check
# Benchmarks are compiled, not run (criterion takes no test-harness flags); perf/ runs them.
cargo bench --locked --no-run
cargo test --release --locked -- --test-threads=2
