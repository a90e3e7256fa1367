#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs Garage 2.5.0 when missing, starts a
# throwaway single-node Garage and a throwaway 3-node Garage cluster on loopback (non-default
# ports), runs every test against them and against loop devices, and stops both afterwards. CI
# runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/garage.sh install

garage_dir=$(mktemp -d "${TMPDIR:-/tmp}/ferry-garage.XXXXXX")
cluster_dir=$(mktemp -d "${TMPDIR:-/tmp}/ferry-cluster.XXXXXX")
cleanup() {
  if [ -f "$garage_dir/tls-proxy.pid" ]; then kill "$(cat "$garage_dir/tls-proxy.pid")" 2>/dev/null || true; fi
  scripts/garage.sh stop "$garage_dir" || true
  scripts/garage.sh cluster-stop "$cluster_dir" || true
  rm -rf "$garage_dir" "$cluster_dir"
}
trap cleanup EXIT
scripts/garage.sh start "$garage_dir"
# shellcheck disable=SC1091
source "$garage_dir/env"
# Three nodes, replication factor 3, for tests/cluster.rs (many hosts, nodes lost mid-job).
scripts/garage.sh cluster-start "$cluster_dir"
# shellcheck disable=SC1091
source "$cluster_dir/cluster-env"

# An https endpoint in front of Garage, with a throwaway CA, for the TLS verification tests.
garage_port=${FERRY_TEST_S3_ENDPOINT##*:}
tls_port=$((garage_port + 443))
python3 scripts/tls-proxy.py "$garage_dir" "$tls_port" "$garage_port" > "$garage_dir/tls-proxy.log" 2>&1 &
for _ in $(seq 1 100); do
  [ -f "$garage_dir/tls-proxy.pid" ] && break
  sleep 0.1
done
[ -f "$garage_dir/tls-proxy.pid" ] || { cat "$garage_dir/tls-proxy.log"; exit 1; }
export FERRY_TEST_S3_TLS_ENDPOINT=https://127.0.0.1:$tls_port
export FERRY_TEST_S3_CA_BUNDLE=$garage_dir/ca.pem
# tests/encryption.rs searches its data and metadata for plaintext.
export FERRY_TEST_GARAGE_DIR=$garage_dir

# Cinder's own S3 backup driver, the judge of --format cinder (tests/cinder.rs).
FERRY_CINDER_PY=$(scripts/cinder/setup.sh | tail -n1)
export FERRY_CINDER_PY

# Make the environment-gated tests mandatory here: skipping them would hide a broken setup.
export FERRY_TEST_REQUIRE_S3=1
export FERRY_TEST_REQUIRE_CINDER=1
export FERRY_TEST_REQUIRE_CLUSTER=1
if [ "$(id -u)" = 0 ]; then
  export FERRY_TEST_REQUIRE_LOOP=1
fi

cargo fmt --all -- --check
# Clippy also type-checks the benchmarks (criterion takes no test-harness flags, so they are not
# run here; perf/ runs them).
cargo clippy --release --locked --all-targets -- -D warnings
cargo test --release --locked -- --test-threads=2
