#!/usr/bin/env bash
# `ferry list` of BACKUPS synthetic backups on Garage after a prune (catalog written), two
# binaries side by side in one session: OLD (e.g. built from main into /var/tmp) and this tree's.
# Rows alternate old/new so both see the same load. Needs /tmp/mg/env (FERRY_TEST_S3_*).
#
#   OLD=/var/tmp/ferry-base/target/release/ferry BACKUPS=10000 RUNS=3 perf/scale-list.sh
set -euo pipefail
cd "$(dirname "$0")/.."
old=${OLD:?set OLD to the ferry binary to compare with}
backups=${BACKUPS:-10000}
work=${SCALE_DIR:-/var/tmp/ferry-scale-list}
mkdir -p "$work"
cargo build --release --locked --bins >&2
new=target/release/ferry
# shellcheck disable=SC1091
source /tmp/mg/env
prefix="scale-list-$(date +%s)-$$"
delete_prefix() {
    aws --endpoint-url "$FERRY_TEST_S3_ENDPOINT" --region "$FERRY_TEST_S3_REGION" \
        s3 rm --recursive --quiet "s3://$FERRY_TEST_S3_BUCKET/$prefix/" >&2 || true
}
trap delete_prefix EXIT
target/release/bench synth-repo --s3-prefix "$prefix" --packs 1000 --backups "$backups" \
    > "$work/synth.json"
s3=(--repo "s3://$FERRY_TEST_S3_BUCKET/$prefix" --s3-endpoint "$FERRY_TEST_S3_ENDPOINT"
    --s3-region "$FERRY_TEST_S3_REGION")
"$new" "${s3[@]}" prune > /dev/null
echo "| binary | what | run | wall s | CPU s | peak RSS MiB | backups listed |"
echo "|---|---|---|---|---|---|---|"
for run in $(seq "${RUNS:-3}"); do
    for which in old new; do
        binary=$old
        [[ $which == new ]] && binary=$new
        /usr/bin/time -o "$work/time" -f "%e %U %S %M" "$binary" "${s3[@]}" list > "$work/out"
        read -r wall user sys rss < "$work/time"
        echo "| $which | list, Garage, $backups backups, after prune | $run | $wall |" \
            "$(echo "$user + $sys" | bc) | $((rss / 1024)) | $(wc -l < "$work/out") |"
    done
done
