#!/usr/bin/env bash
# Issue 12's scale numbers, on synthetic repositories that `bench synth-repo` writes directly
# (consolidated indexes, the per-pack indexes of 64 packs written since the last consolidation,
# pack objects of the indexed size, manifests):
# - backup start: `ferry backup` of a 4 MiB source (one chunk), whole process, so the time is
#   the start (marks, packs and index listed, consolidated and new per-pack indexes read, dedup
#   view built) plus one chunk; wall time and peak RSS from /usr/bin/time, 3 runs each;
# - `ferry list` of the backups, before any prune (every manifest read, 8 at once) and after
#   one (`prune` writes the catalog list reads instead).
# Local store: PACKS_LOCAL packs (default 1,000,000) and BACKUPS manifests (default 10,000).
# Garage: PACKS_S3 packs (default 100,000) under a fresh prefix of the bucket in
# /tmp/mg/env (FERRY_TEST_S3_*), deleted afterwards; skipped when that file is missing.
#
#   perf/scale.sh              (prints a Markdown table on stdout; logs in $SCALE_DIR)
#   CHUNKS_PER_PACK=32 PACKS_LOCAL=1000000 PACKS_S3=100000 BACKUPS=10000 RUNS=3 perf/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
work=${SCALE_DIR:-/var/tmp/ferry-scale}
packs_local=${PACKS_LOCAL:-1000000}
packs_s3=${PACKS_S3:-100000}
chunks_per_pack=${CHUNKS_PER_PACK:-32}
backups=${BACKUPS:-10000}
rm -rf "$work"
mkdir -p "$work"
# FERRY_BIN_DIR: binaries built elsewhere (so that a long run is not disturbed by a rebuild).
if [[ -z "${FERRY_BIN_DIR:-}" ]]; then
    cargo build --release --locked --bins >&2
fi
bench=${FERRY_BIN_DIR:-target/release}/bench
ferry=${FERRY_BIN_DIR:-target/release}/ferry
head -c 4194304 /dev/urandom > "$work/source.img"

# measure LABEL ARGS...: RUNS runs (default 3) of `ferry ARGS`, one table row each.
measure() {
    local label=$1
    shift
    for run in $(seq "${RUNS:-3}"); do
        /usr/bin/time -o "$work/time" -f "%e %M" "$ferry" "$@" > "$work/out" 2> "$work/err" || {
            cat "$work/err" >&2
            return 1
        }
        read -r wall rss < "$work/time"
        echo "| $label | $run | $wall | $((rss / 1024)) |"
    done
}

echo "| what | run | wall s | peak RSS MiB |"
echo "|---|---|---|---|"
/usr/bin/time -o "$work/time" -f "%e %M" "$bench" synth-repo --repo "$work/local" \
    --packs "$packs_local" --chunks-per-pack "$chunks_per_pack" --backups "$backups" \
    > "$work/synth-local.json"
read -r wall rss < "$work/time"
echo "| synth-repo local: $packs_local packs × $chunks_per_pack chunks, $backups backups | 1 | $wall | $((rss / 1024)) |"
measure "backup start, local, $packs_local packs" --repo "$work/local" backup --source "$work/source.img"
RUNS=1 measure "list, local, $backups backups, no catalog" --repo "$work/local" list
"$ferry" --repo "$work/local" prune > /dev/null
measure "list, local, $backups backups, after prune (catalog)" --repo "$work/local" list
rm -rf "$work/local"

if [[ -f /tmp/mg/env ]]; then
    # shellcheck disable=SC1091
    source /tmp/mg/env
    prefix="scale-$(date +%s)-$$"
    delete_prefix() {
        aws --endpoint-url "$FERRY_TEST_S3_ENDPOINT" --region "$FERRY_TEST_S3_REGION" \
            s3 rm --recursive --quiet "s3://$FERRY_TEST_S3_BUCKET/$prefix/" >&2 || true
    }
    trap delete_prefix EXIT
    /usr/bin/time -o "$work/time" -f "%e %M" "$bench" synth-repo --s3-prefix "$prefix" \
        --packs "$packs_s3" --chunks-per-pack "$chunks_per_pack" --backups "$backups" \
        > "$work/synth-s3.json"
    read -r wall rss < "$work/time"
    echo "| synth-repo Garage: $packs_s3 packs × $chunks_per_pack chunks, $backups backups | 1 | $wall | $((rss / 1024)) |"
    s3=(--repo "s3://$FERRY_TEST_S3_BUCKET/$prefix" --s3-endpoint "$FERRY_TEST_S3_ENDPOINT"
        --s3-region "$FERRY_TEST_S3_REGION")
    measure "backup start, Garage, $packs_s3 packs" "${s3[@]}" backup --source "$work/source.img"
    RUNS=1 measure "list, Garage, $backups backups, no catalog" "${s3[@]}" list
    "$ferry" "${s3[@]}" prune > /dev/null
    measure "list, Garage, $backups backups, after prune (catalog)" "${s3[@]}" list
fi
