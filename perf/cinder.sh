#!/usr/bin/env bash
# Issue 6's targets: Cinder's own S3 backup driver (cinder 29.0.0 through scripts/cinder/harness.py)
# against `ferry backup --format cinder` on the same Garage, the same image and the same settings
# (zlib, the default backup_compression_algorithm; 50 MiB objects, the default
# backup_s3_object_size), then the restore of each backup by its own writer. Page cache dropped
# before every run (needs root). Appends a table to perf/results/cinder-<date>.md.
#
#   perf/cinder.sh [SIZE]     (default 2G)
#
#   NOTE="..."                 a line copied into the results (e.g. "smoke run on a busy machine")
#   FERRY_BIN_DIR=DIR          take ferry and bench from DIR instead of `cargo build --release`
#   FERRY_TEST_S3_ENDPOINT, FERRY_TEST_S3_BUCKET, FERRY_TEST_S3_REGION, AWS_ACCESS_KEY_ID,
#   AWS_SECRET_ACCESS_KEY      use this S3 endpoint instead of starting a Garage
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-2G}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-cinder-perf.XXXXXX")
garage_dir=""
cleanup() {
  if [ -n "$garage_dir" ]; then scripts/garage.sh stop "$garage_dir" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p perf/results

if [ -n "${FERRY_BIN_DIR:-}" ]; then
  bin=$FERRY_BIN_DIR
else
  cargo build --release --locked --bins
  bin=${CARGO_TARGET_DIR:-target}/release
fi
if [ -z "${FERRY_TEST_S3_ENDPOINT:-}" ]; then
  scripts/garage.sh install
  garage_dir="$work/garage"
  mkdir -p "$garage_dir"
  scripts/garage.sh start "$garage_dir"
  # shellcheck disable=SC1091
  source "$garage_dir/env"
fi
py=$(scripts/cinder/setup.sh | tail -n1)

"$bin/bench" gen-image "$work/volume.img" --size "$size" --mix mixed --seed 2026 > /dev/null
bytes=$(stat -c %s "$work/volume.img")
vol_c=$(python3 -c 'import uuid; print(uuid.uuid4())')
vol_f=$(python3 -c 'import uuid; print(uuid.uuid4())')
bid_c=$(python3 -c 'import uuid; print(uuid.uuid4())')
bid_f=$(python3 -c 'import uuid; print(uuid.uuid4())')
ferry=("$bin/ferry" --repo "s3://$FERRY_TEST_S3_BUCKET" --s3-endpoint "$FERRY_TEST_S3_ENDPOINT"
       --s3-region "$FERRY_TEST_S3_REGION")

drop_caches() { sync; if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
# measure NAME CMD...: runs CMD under /usr/bin/time -v after dropping caches; prints "wall_s rss_mib".
measure() {
  local name=$1; shift
  drop_caches
  /usr/bin/time -v -o "$work/$name.time" "$@" > "$work/$name.out" 2> "$work/$name.err" \
    || { cat "$work/$name.err" >&2; exit 1; }
  python3 - "$work/$name.time" <<'PY'
import sys
t = open(sys.argv[1]).read()
wall = [l.split(': ', 1)[1] for l in t.splitlines() if 'Elapsed (wall clock)' in l][0]
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(':'))))
rss = [int(l.split(': ')[1]) for l in t.splitlines() if 'Maximum resident set size' in l][0]
print(f"{secs:.2f} {rss // 1024}")
PY
}

read -r c_backup c_backup_rss < <(measure cinder-backup "$py" scripts/cinder/harness.py backup \
  --image "$work/volume.img" --backup-id "$bid_c" --volume-id "$vol_c" --compression zlib)
read -r f_backup f_backup_rss < <(measure ferry-backup "${ferry[@]}" backup --format cinder \
  --source "$work/volume.img" --cinder-backup-id "$bid_f" --cinder-volume-id "$vol_f" --compression zlib)
truncate -s "$bytes" "$work/cinder-restore.img"
read -r c_restore c_restore_rss < <(measure cinder-restore "$py" scripts/cinder/harness.py restore \
  --backup-id "$bid_c" --volume-id "$(python3 -c 'import uuid; print(uuid.uuid4())')" \
  --target "$work/cinder-restore.img")
read -r f_restore f_restore_rss < <(measure ferry-restore "${ferry[@]}" restore --format cinder \
  "$bid_f" --cinder-volume-id "$vol_f" --target "$work/ferry-restore.img")
cmp "$work/volume.img" "$work/cinder-restore.img"
cmp "$work/volume.img" "$work/ferry-restore.img"
"$py" scripts/cinder/harness.py delete --backup-id "$bid_c" > /dev/null || true
"$py" scripts/cinder/harness.py delete --backup-id "$bid_f" > /dev/null || true

out=perf/results/cinder-$(date +%Y-%m-%d).md
mib=$((bytes >> 20))
python3 - "$out" "$size" "$mib" "$c_backup" "$f_backup" "$c_restore" "$f_restore" \
  "$c_backup_rss" "$f_backup_rss" "$c_restore_rss" "$f_restore_rss" "${NOTE:-}" \
  "$(git rev-parse --short HEAD)" "$(nproc)" <<'PY'
import sys, datetime
(out, size, mib, cb, fb, cr, fr, cbr, fbr, crr, frr, note, commit, cpus) = sys.argv[1:]
cb, fb, cr, fr, mib = float(cb), float(fb), float(cr), float(fr), float(mib)
with open(out, 'a') as f:
    f.write(f"\n## {datetime.datetime.now().isoformat(timespec='seconds')}: {size} mixed image, commit {commit}, {cpus} CPUs\n\n")
    if note:
        f.write(note + "\n\n")
    f.write("zlib (default backup_compression_algorithm), 50 MiB objects, same Garage; caches dropped before each run; both restores byte-identical (cmp).\n\n")
    f.write("| step | Cinder 29.0.0 driver | ferry --format cinder | speed-up | target |\n|---|---|---|---|---|\n")
    f.write(f"| backup | {cb:.1f} s ({mib/cb:.0f} MiB/s, {cbr} MiB RSS) | {fb:.1f} s ({mib/fb:.0f} MiB/s, {fbr} MiB RSS) | {cb/fb:.1f}x | >= 5x |\n")
    f.write(f"| restore | {cr:.1f} s ({mib/cr:.0f} MiB/s, {crr} MiB RSS) | {fr:.1f} s ({mib/fr:.0f} MiB/s, {frr} MiB RSS) | {cr/fr:.1f}x | >= 3x |\n")
print(open(out).read())
PY
