#!/usr/bin/env bash
# Issue 2's acceptance run: a 2 GiB mixed volume (40% zeros, 30% text, 30% random) backed up
# to a local Garage 2.5.0 and restored, byte-identical; then a second backup of the unchanged
# volume. Records wall time, bytes uploaded and peak RSS (/usr/bin/time -v) of each step.
#
#   perf/garage-2g.sh [SIZE]          (default 2G; appends a row set to perf/results/garage-2g.md)
#
# Starts its own Garage with scripts/garage.sh (installs it when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-2G}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-perf.XXXXXX")
garage_dir="$work/garage"
mkdir -p "$garage_dir" perf/results
cleanup() { scripts/garage.sh stop "$garage_dir" || true; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --locked --bins
scripts/garage.sh install
scripts/garage.sh start "$garage_dir"
# shellcheck disable=SC1091
source "$garage_dir/env"
ferry=(target/release/ferry --repo "s3://$FERRY_TEST_S3_BUCKET/perf-$(date +%s)"
       --s3-endpoint "$FERRY_TEST_S3_ENDPOINT" --s3-region "$FERRY_TEST_S3_REGION")

target/release/bench gen-image "$work/volume.img" --size "$size" --mix mixed --seed 2026 > "$work/gen.json"
"${ferry[@]}" init > /dev/null

# Runs a ferry command under /usr/bin/time -v; prints "wall_s rss_kib result-json".
measure() {
  local name=$1; shift
  /usr/bin/time -v -o "$work/$name.time" "${ferry[@]}" --json "$@" > "$work/$name.json"
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/$name.time")
  echo "$name $wall $rss"
}

row_backup1=$(measure backup1 backup --source "$work/volume.img")
row_backup2=$(measure backup2 backup --source "$work/volume.img")
id=$(tail -n 1 "$work/backup1.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["backup_id"])')
row_restore=$(measure restore restore "$id" --target "$work/restored.img")
cmp "$work/volume.img" "$work/restored.img"

python3 - "$work" "$size" "$row_backup1" "$row_backup2" "$row_restore" <<'PY' | tee -a perf/results/garage-2g.md
import json, sys, subprocess, platform, datetime
work, size, *rows = sys.argv[1:]
def result(name):
    return json.loads(open(f"{work}/{name}.json").read().strip().splitlines()[-1])
def seconds(text):
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"\n### {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, commit {commit}, {size} mixed, {cpu}, {subprocess.os.cpu_count()} CPUs\n")
print("| step | wall s | MB/s of volume | MiB uploaded / downloaded | new chunks | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for row in rows:
    name, wall, rss = row.split()
    r = result(name)
    wall_s = seconds(wall)
    if name.startswith("backup"):
        volume = r["volume_size_bytes"]; up = r["bytes_uploaded"] / 2**20; new = r["stats"]["new_chunk_count"]
    else:
        volume = r["stats"]["volume_size_bytes"]; up = r["stats"]["bytes_downloaded"] / 2**20; new = "-"
    print(f"| {name} | {wall_s:.2f} | {volume / 1e6 / wall_s:.0f} | {up:.1f} | {new} | {int(rss) / 1024:.0f} |")
print("\nrestore byte-identical (cmp): yes")
PY
