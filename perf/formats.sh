#!/usr/bin/env bash
# Issue 10's targets: ferry's two repository formats side by side on one Garage, one run, the same
# images: native (`ferry backup` / `ferry restore`) against `--format cinder` (zlib, 50 MiB
# objects, Cinder's defaults), for a mixed (40% zero / 30% text / 30% random) and a random image.
# Each step runs under /usr/bin/time -v after dropping the page cache (root): wall time, CPU-s/GiB
# (user + sys of the ferry process), the CPU-s/GiB of the Garage this script started (its share of
# the same cores) and peak RSS. Restores are checked byte-identical with cmp. Next to them, the
# floor the Cinder format imposes on each image (`bench cinder-floor`: MD5 of every object,
# SHA-256 of every non-zero block, zlib segments, each on one thread). Appends the tables to
# perf/results/formats-<date>.md.
#
#   perf/formats.sh [SIZE] [SPARSE_SIZE]   (default 2G; SPARSE_SIZE: also a volume of that size,
#                                           e.g. 32G, whose first SIZE is the mixed image and the
#                                           rest a hole, to show memory does not grow with size)
#   NOTE="..."   a line copied into the results
#   FERRY_BIN_DIR, FERRY_TEST_S3_*, AWS_*: as perf/lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-2G}
sparse_size=${2:-}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-formats-perf.XXXXXX")
# shellcheck source=perf/lib.sh
source perf/lib.sh
cleanup() {
  if [[ -n "${garage_dir:-}" ]]; then scripts/garage.sh stop "$garage_dir" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p perf/results
perf_commit_label
perf_private_bins ferry bench
perf_start_garage
bucket=$FERRY_TEST_S3_BUCKET
common=(--s3-endpoint "$FERRY_TEST_S3_ENDPOINT" --s3-region "$FERRY_TEST_S3_REGION" --json)
rows="$work/rows.tsv"
: > "$rows"

drop_caches() { sync; if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
# measure IMAGE_LABEL STEP BYTES CMD...: one row "label step wall_s cpu_s rss_mib bytes garage_cpu_s".
measure() {
  local label=$1 step=$2 bytes=$3; shift 3
  drop_caches
  local garage_before; garage_before=$(garage_cpu)
  /usr/bin/time -v -o "$work/time" "$@" > "$work/out" 2> "$work/err" \
    || { cat "$work/err" >&2; tail -3 "$work/out" >&2; exit 1; }
  local garage_after; garage_after=$(garage_cpu)
  python3 - "$work/time" "$label" "$step" "$bytes" "$garage_before" "$garage_after" >> "$rows" <<'PY'
import sys
t = open(sys.argv[1]).read().splitlines()
get = lambda key: [l.split(': ', 1)[1] for l in t if key in l][0]
wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(get('Elapsed (wall clock)').split(':'))))
cpu = float(get('User time (seconds)')) + float(get('System time (seconds)'))
rss = int(get('Maximum resident set size')) // 1024
before, after = float(sys.argv[5]), float(sys.argv[6])
garage = after - before if before >= 0 else -1
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{wall:.2f}\t{cpu:.2f}\t{rss}\t{sys.argv[4]}\t{garage:.2f}")
PY
}
floors="$work/floors.jsonl"
: > "$floors"
# floor IMAGE_LABEL IMAGE: the Cinder format's own CPU on the image, stage by stage.
floor() {
  "$work/bench" cinder-floor "$2" | python3 -c 'import json, sys
for line in sys.stdin:
    d = json.loads(line); d["label"] = sys.argv[1]; print(json.dumps(d))' "$1" >> "$floors"
}

run_image() {
  local label=$1 image=$2
  local bytes; bytes=$(stat -c %s "$image")
  # (the floor bench holds the image in memory: skipped for the large sparse volume)
  if (( bytes <= 8 * 1024 * 1024 * 1024 )); then floor "$label" "$image"; fi
  local repo="s3://$bucket/formats-$label-$RANDOM"
  local vol; vol=$(python3 -c 'import uuid; print(uuid.uuid4())')
  local bid; bid=$(python3 -c 'import uuid; print(uuid.uuid4())')
  "$work/ferry" --repo "$repo" "${common[@]}" init > /dev/null
  measure "$label" "native backup" "$bytes" "$work/ferry" --repo "$repo" "${common[@]}" backup --source "$image" --backup-id b1
  measure "$label" "cinder backup" "$bytes" "$work/ferry" --repo "s3://$bucket" "${common[@]}" backup --format cinder \
    --source "$image" --cinder-backup-id "$bid" --cinder-volume-id "$vol"
  rm -f "$work/restore.img"
  measure "$label" "native restore" "$bytes" "$work/ferry" --repo "$repo" "${common[@]}" restore b1 --target "$work/restore.img"
  cmp "$image" "$work/restore.img"
  rm -f "$work/restore.img"
  measure "$label" "cinder restore" "$bytes" "$work/ferry" --repo "s3://$bucket" "${common[@]}" restore --format cinder \
    "$bid" --cinder-volume-id "$vol" --target "$work/restore.img"
  cmp "$image" "$work/restore.img"
  rm -f "$work/restore.img"
}

"$work/bench" gen-image "$work/mixed.img" --size "$size" --mix mixed --seed 2026 > /dev/null
run_image "mixed-$size" "$work/mixed.img"
"$work/bench" gen-image "$work/random.img" --size "$size" --mix random --seed 2027 > /dev/null
run_image "random-$size" "$work/random.img"
rm -f "$work/random.img"
if [[ -n "$sparse_size" ]]; then
  mv "$work/mixed.img" "$work/sparse.img"
  truncate -s "$sparse_size" "$work/sparse.img"
  run_image "mixed-$size-in-$sparse_size" "$work/sparse.img"
fi

out=perf/results/formats-$(date +%Y-%m-%d).md
python3 - "$rows" "$out" "$commit" "$(nproc)" "${NOTE:-}" "$floors" "$size" "$sparse_size" <<'PY'
import sys, datetime, json
rows_path, out, commit, cpus, note, floors_path = sys.argv[1:7]
rows = [l.rstrip('\n').split('\t') for l in open(rows_path) if l.strip()]
by = {(r[0], r[1]): r for r in rows}
with open(out, 'a') as f:
    f.write(f"\n## {datetime.datetime.now().isoformat(timespec='seconds')}: commit {commit}, {cpus} CPUs\n\n")
    if note:
        f.write(note + "\n\n")
    f.write("Command: `perf/formats.sh " + " ".join(a for a in sys.argv[7:] if a) + "` (see the script's header). "
            "Caches dropped before each step; every restore byte-identical (cmp). CPU is the ferry "
            "process's user+sys per GiB of volume; Garage's is the CPU the object store spent meanwhile "
            "on the same cores (n/a: an external endpoint).\n\n")
    f.write("| image | step | wall s | MB/s | CPU-s/GiB | Garage CPU-s/GiB | peak RSS MiB | cinder / native throughput |\n|---|---|---|---|---|---|---|---|\n")
    for label, step, wall, cpu, rss, nbytes, garage in rows:
        wall, cpu, nbytes, garage = float(wall), float(cpu), int(nbytes), float(garage)
        gib = nbytes / 2**30
        garage_cell = f"{garage / gib:.2f}" if garage >= 0 else "n/a"
        ratio = ""
        if step.startswith("cinder"):
            native = by.get((label, step.replace("cinder", "native")))
            if native:
                ratio = f"{float(native[2]) / wall:.2f}x"
        f.write(f"| {label} | {step} | {wall:.1f} | {nbytes / wall / 1e6:.0f} | {cpu / gib:.2f} | {garage_cell} | {rss} | {ratio} |\n")
    f.write("\nThe Cinder format's own CPU floor (`bench cinder-floor IMAGE`, one thread, image in memory; "
            "ferry spreads each stage over the cores, but every CPU-second is still spent): CPU-s per GiB of volume.\n\n"
            "| image | MD5 of every object | SHA-256 of non-zero 32 KiB blocks | zlib segments (level 1) | sum |\n|---|---|---|---|---|\n")
    floors = {}
    for line in open(floors_path):
        d = json.loads(line)
        floors.setdefault(d["label"], {})[d["bench"]] = d["cpu_seconds_per_gib"]
    for label, stages in floors.items():
        md5, sha, zlib = (stages.get(k, 0.0) for k in ("cinder-md5", "cinder-sha256", "cinder-zlib"))
        f.write(f"| {label} | {md5:.2f} | {sha:.2f} | {zlib:.2f} | {md5 + sha + zlib:.2f} |\n")
print(open(out).read())
PY
