# shellcheck shell=bash disable=SC2154,SC2034  # sets and reads variables of the sourcing script
# Shared by perf/peers.sh and perf/upload-sweep.sh: sourced, not run.
# Expects `work` (a scratch directory) to be set; sets `commit`, `garage_dir`, `garage_pid`,
# `garage_version`.

# The commit the numbers belong to, taken before the build (others may commit mid-run).
perf_commit_label() {
    if [[ -n "${FERRY_BIN_DIR:-}" ]]; then
        commit="${FERRY_BIN_COMMIT:-unknown} (binaries from FERRY_BIN_DIR=$FERRY_BIN_DIR)"
    else
        commit=$(git rev-parse --short HEAD)
        if git status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock | grep -q .; then
            commit+=" + uncommitted changes in src"
        fi
    fi
}

# Builds (unless FERRY_BIN_DIR names prebuilt binaries) and copies the named binaries into
# $work: others building in the same tree may replace target/release/* mid-run.
perf_private_bins() {
    local bin_dir=${FERRY_BIN_DIR:-}
    if [[ -z "$bin_dir" ]]; then
        cargo build --release --bins >&2
        bin_dir=target/release
    fi
    local name
    for name in "$@"; do cp "$bin_dir/$name" "$work/$name"; done
}

# Starts a throwaway Garage on FERRY_GARAGE_S3_PORT (default 39200) unless FERRY_TEST_S3_ENDPOINT
# already names an S3 endpoint; sources its env (endpoint, bucket, keys).
perf_start_garage() {
    garage_dir=""
    garage_pid=""
    garage_version="external endpoint"
    if [[ -n "${FERRY_TEST_S3_ENDPOINT:-}" ]]; then
        return
    fi
    scripts/garage.sh install >&2
    garage_dir="$work/garage"
    FERRY_GARAGE_S3_PORT=${FERRY_GARAGE_S3_PORT:-39200} scripts/garage.sh start "$garage_dir" >&2
    # shellcheck disable=SC1091
    source "$garage_dir/env"
    garage_pid=$(cat "$garage_dir/garage.pid")
    garage_version=$("$(readlink -f "/proc/$garage_pid/exe")" --version 2>/dev/null | sed -n 1p || true)
}

# CPU-s (user+sys) used so far by the Garage process started above, or -1 when not ours.
garage_cpu() {
    if [[ -n "$garage_pid" && -r "/proc/$garage_pid/stat" ]]; then
        awk -v t="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / t }' "/proc/$garage_pid/stat"
    else
        echo -1
    fi
}
