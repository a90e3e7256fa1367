#!/usr/bin/env bash
# Issue 13's targets: backup and restore through ferry's cinder-backup driver
# (ferry_cinder.driver.FerryBackupDriver) against Cinder 29.0.0's stock S3 driver and against
# `ferry --format cinder` run directly, on the same Garage, the same images (2 GiB mixed and
# random by default) and Cinder's defaults (zlib, 50 MiB objects). Both drivers run under
# cinder's real backup manager code through scripts/cinder/driver_harness.py; restores go into
# an existing volume (a full-size file), like `openstack volume backup restore BACKUP vol1`.
# Page cache dropped before every run (needs root). Every restore is compared with cmp.
# Appends a table to perf/results/cinder-driver-<date>.md.
#
#   perf/cinder-driver.sh [SIZE] [MIX...]      (default: 2G mixed random)
#
#   NOTE="..."             a line copied into the results (e.g. "machine shared with a build")
#   FERRY_BIN_DIR=DIR      take ferry and bench from DIR instead of `cargo build --release`
#   FERRY_TEST_S3_*        use this S3 endpoint instead of starting a Garage (see perf/lib.sh)
#
# Columns: wall time of the whole command (for the drivers: Python start-up and cinder's imports
# included, a few seconds a running cinder-backup does not pay per job); the manager's call
# alone; CPU-s/GiB = user+sys of the whole process tree (python and ferry) per GiB
# of volume; peak RSS of the cinder-side python process and of ferry (the driver's child).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-2G}
shift || true
mixes=("$@")
[[ ${#mixes[@]} -gt 0 ]] || mixes=(mixed random)
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-cinder-driver-perf.XXXXXX")
# shellcheck source=perf/lib.sh
source perf/lib.sh
cleanup() {
  if [[ -n "${garage_dir:-}" ]]; then scripts/garage.sh stop "$garage_dir" >&2 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p perf/results
perf_commit_label
perf_private_bins ferry bench
perf_start_garage
py=$(scripts/cinder/setup.sh | tail -n1)
export FERRY_BIN="$work/ferry"
export FERRY_TEST_S3_REGION=${FERRY_TEST_S3_REGION:-garage}
H=("$py" scripts/cinder/driver_harness.py)
STOCK=cinder.backup.drivers.s3.S3BackupDriver
FERRY=ferry_cinder.driver.FerryBackupDriver
uuid() { python3 -c 'import uuid; print(uuid.uuid4())'; }
drop_caches() { sync; if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 > /proc/sys/vm/drop_caches; fi; }

# measure NAME CMD...: runs CMD under /usr/bin/time -v after dropping caches;
# prints "wall_s cpu_s tree_rss_mib cinder_rss_mib ferry_rss_mib manager_s" (manager_s: the
# manager's continue_backup/restore_backup alone, without Python start-up and imports).
measure() {
  local name=$1; shift
  drop_caches
  /usr/bin/time -v -o "$work/$name.time" "$@" > "$work/$name.out" 2> "$work/$name.err" \
    || { tail -30 "$work/$name.err" >&2; exit 1; }
  python3 - "$work/$name.time" "$work/$name.out" "$name" <<'PY'
import json, sys
t = open(sys.argv[1]).read().splitlines()
get = lambda key: [l.split(': ', 1)[1] for l in t if key in l][0]
wall = get('Elapsed (wall clock)')
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(':'))))
cpu = float(get('User time')) + float(get('System time'))
tree = int(get('Maximum resident set size')) // 1024
cinder = ferry = manager = '-'
try:
    out = json.load(open(sys.argv[2]))
    if 'usage' in out:
        exc = out.get('exception')
        if exc:
            sys.exit('%s: %s' % (sys.argv[3], exc))
        cinder = out['usage']['cinder_peak_rss_kib'] // 1024
        manager = f"{out['manager_s']:.1f}"
        # The stock driver runs no ferry (its children are cinder's own helpers).
        if out.get('ferry_runs'):
            ferry = out['usage']['children_peak_rss_kib'] // 1024
except ValueError:  # ferry run directly: JSON Lines
    ferry = tree
print(f"{secs:.2f} {cpu:.2f} {tree} {cinder} {ferry} {manager}")
PY
}

out=perf/results/cinder-driver-$(date +%Y-%m-%d).md
{
  echo
  echo "## $(date -Iseconds): $size images, commit $commit, $(nproc) CPUs, Garage: $garage_version"
  echo
  [[ -n "${NOTE:-}" ]] && { echo "$NOTE"; echo; }
  echo "\`perf/cinder-driver.sh $size ${mixes[*]}\`; zlib (Cinder's default), 50 MiB objects; caches dropped before each run; every restore byte-identical (cmp)."
  echo
} >> "$out"

for mix in "${mixes[@]}"; do
  img="$work/$mix.img"
  "$work/bench" gen-image "$img" --size "$size" --mix "$mix" --seed 2026 > /dev/null
  bytes=$(stat -c %s "$img")
  gib=$(python3 -c "print($bytes / 2**30)")
  vol=$(uuid)
  declare -A bid=([stock]=$(uuid) [driver]=$(uuid) [direct]=$(uuid))
  declare -A res
  res[stock-backup]=$(measure "$mix-stock-backup" "${H[@]}" backup --driver "$STOCK" \
    --image "$img" --backup-id "${bid[stock]}" --volume-id "$vol" --compression zlib)
  res[driver-backup]=$(measure "$mix-driver-backup" "${H[@]}" backup --driver "$FERRY" \
    --image "$img" --backup-id "${bid[driver]}" --volume-id "$vol" --compression zlib)
  res[direct-backup]=$(measure "$mix-direct-backup" "$work/ferry" --json \
    --repo "s3://$FERRY_TEST_S3_BUCKET" --s3-endpoint "$FERRY_TEST_S3_ENDPOINT" \
    --s3-region "$FERRY_TEST_S3_REGION" backup --format cinder --source "$img" \
    --cinder-backup-id "${bid[direct]}" --cinder-volume-id "$vol" --compression zlib)
  for kind in stock driver direct; do
    target="$work/$mix-$kind-restore.img"
    # An existing volume: full size, holding data (the image's first GiB would do; zeros are
    # enough for the writers, which write every byte of an existing volume).
    truncate -s "$bytes" "$target"
    if [[ $kind == direct ]]; then
      res[$kind-restore]=$(measure "$mix-$kind-restore" "$work/ferry" --json \
        --repo "s3://$FERRY_TEST_S3_BUCKET" --s3-endpoint "$FERRY_TEST_S3_ENDPOINT" \
        --s3-region "$FERRY_TEST_S3_REGION" restore --format cinder "${bid[$kind]}" \
        --cinder-volume-id "$vol" --target "$target" --force)
    else
      driver=$FERRY; [[ $kind == stock ]] && driver=$STOCK
      res[$kind-restore]=$(measure "$mix-$kind-restore" "${H[@]}" restore --driver "$driver" \
        --backup-id "${bid[$kind]}" --src-volume-id "$vol" --volume-id "$(uuid)" \
        --target "$target")
    fi
    cmp "$img" "$target"
    rm -f "$target"
    "${H[@]}" delete --driver "$STOCK" --backup-id "${bid[$kind]}" --volume-id "$vol" \
      > /dev/null 2>&1 || true
  done
  python3 - "$out" "$mix" "$gib" "${res[stock-backup]}" "${res[driver-backup]}" \
    "${res[direct-backup]}" "${res[stock-restore]}" "${res[driver-restore]}" \
    "${res[direct-restore]}" <<'PY'
import sys
out, mix, gib = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = [r.split() for r in sys.argv[4:]]
names = ['stock S3 driver', 'ferry driver', 'ferry direct']
with open(out, 'a') as f:
    f.write(f"### {mix} image ({gib:.2f} GiB)\n\n")
    f.write("| step | path | wall | in manager | MiB/s | CPU-s/GiB | peak RSS cinder side | peak RSS ferry | vs stock | vs ferry direct |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for step, group in (('backup', rows[0:3]), ('restore', rows[3:6])):
        stock_wall, direct_wall = float(group[0][0]), float(group[2][0])
        for name, (wall, cpu, tree, cinder, ferry, manager) in zip(names, group):
            wall, cpu = float(wall), float(cpu)
            cinder = f"{cinder} MiB" if cinder != '-' else '-'
            ferry = f"{ferry} MiB" if ferry != '-' else '-'
            manager = f"{manager} s" if manager != '-' else '-'
            f.write(f"| {step} | {name} | {wall:.1f} s | {manager} | {gib * 1024 / wall:.0f} | {cpu / gib:.1f} | {cinder} | {ferry} | {stock_wall / wall:.2f}x | {direct_wall / wall:.2f}x |\n")
    f.write("\n")
PY
  rm -f "$img"
done
cat "$out"
