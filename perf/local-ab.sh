#!/usr/bin/env bash
# Two builds of ferry side by side on a local repository (the engine without Garage): a full
# backup of a SIZE mixed volume into an empty repository, then an incremental backup
# (`--changed-ranges`, PERCENT% of the 4 MiB chunks rewritten with random data) onto a copy of
# the repository state after the full one. Builds alternate within each round; the page cache
# is dropped before every backup. Prints, and appends to perf/results/local-ab-<date>.md, the
# medians over ROUNDS of wall s, the job's own data-plane s (stats.duration_ms), CPU s
# (user + system, /usr/bin/time) and peak RSS, with the ratio B / A.
#
#   sudo perf/local-ab.sh A_BIN_DIR B_BIN_DIR [SIZE] [PERCENT] [ROUNDS]   (default 4G 1 3)
#
#   A_LABEL, B_LABEL   names in the table (default: the directories)
#   REPO_DIR=DIR       where repositories go (default /dev/shm: the disk is the source's alone)
#   NOTE="..."         a line copied into the results
# Each BIN_DIR holds `ferry`; `bench` (gen-image) is taken from B_BIN_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
a_dir=${1:?A_BIN_DIR}
b_dir=${2:?B_BIN_DIR}
size=${3:-4G}
percent=${4:-1}
rounds=${5:-3}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-local-ab.XXXXXX")
repos=$(mktemp -d "${REPO_DIR:-/dev/shm}/ferry-local-ab.XXXXXX")
trap 'rm -rf "$work" "$repos"' EXIT
mkdir -p "$work/a" "$work/b" perf/results
cp "$a_dir/ferry" "$work/a/ferry"
cp "$b_dir/ferry" "$work/b/ferry"
"$b_dir/bench" gen-image "$work/volume.img" --size "$size" --mix mixed --seed 14 >/dev/null
# The change: PERCENT% of the 4 MiB chunks, random data, kept in changes.bin with the ranges in
# changes.json and the original bytes in original.bin. `rewrite new|original` writes one or the
# other into the volume (in place: a parent is only used for the same source path).
python3 - "$work/volume.img" "$percent" "$work" <<'EOF'
import json, os, random, sys
path, percent, work = sys.argv[1], float(sys.argv[2]), sys.argv[3]
chunk = 4 << 20
size = os.path.getsize(path)
count = max(1, round(size // chunk * percent / 100))
picked = sorted(random.Random(14).sample(range(size // chunk), count))
with open(path, "rb") as f, open(f"{work}/original.bin", "wb") as out:
    for index in picked:
        f.seek(index * chunk)
        out.write(f.read(chunk))
with open(f"{work}/changes.bin", "wb") as out:
    out.write(os.urandom(chunk * count))
json.dump([{"offset": i * chunk, "length": chunk, "exists": "true"} for i in picked],
          open(f"{work}/changes.json", "w"))
EOF
rewrite() {
  python3 - "$work/volume.img" "$work/changes.json" "$work/$1.bin" <<'EOF'
import json, sys
ranges = json.load(open(sys.argv[2]))
with open(sys.argv[1], "r+b") as f, open(sys.argv[3], "rb") as data:
    for r in ranges:
        f.seek(r["offset"])
        f.write(data.read(r["length"]))
EOF
}

# One backup by build $1 into repository $2 of source $3 (more arguments follow): prints
# "wall_s data_plane_s cpu_s rss_kib backup_id".
backup() {
  local bin=$1 repo=$2 source=$3
  shift 3
  sync; echo 3 >/proc/sys/vm/drop_caches
  /usr/bin/time -f "%e %U %S %M" -o "$work/time.txt" "$work/$bin/ferry" --json --repo "$repo" \
    backup --source "$source" "$@" >"$work/out.jsonl"
  python3 - "$work/out.jsonl" "$work/time.txt" <<'EOF'
import json, os, sys
result = [json.loads(line) for line in open(sys.argv[1])][-1]
assert result["event"] == "result", result
backup = result["backups"][0]
if os.environ.get("EXPECT_BASE"):
    assert backup.get("base"), f"the incremental read the whole source: {backup}"
wall, user, system, rss = open(sys.argv[2]).read().split()[-4:]
print(wall, backup["stats"]["duration_ms"] / 1000, f"{float(user) + float(system):.2f}", rss,
      backup["backup_id"])
EOF
}

: >"$work/rows.txt"
for round in $(seq "$rounds"); do
  for bin in a b; do
    repo="$repos/$bin"
    rm -rf "$repo" "$repo-inc"
    "$work/$bin/ferry" --json --repo "$repo" init --chunk-size 4M >/dev/null
    read -r wall dp cpu rss id < <(backup "$bin" "$repo" "$work/volume.img")
    echo "$bin full $wall $dp $cpu $rss" >>"$work/rows.txt"
    cp -a "$repo" "$repo-inc"
    rewrite changes
    read -r wall dp cpu rss _ < <(EXPECT_BASE=1 backup "$bin" "$repo-inc" "$work/volume.img" \
      --changed-ranges "$work/changes.json" --changed-since "$id")
    rewrite original
    echo "$bin incremental $wall $dp $cpu $rss" >>"$work/rows.txt"
    rm -rf "$repo" "$repo-inc"
  done
done

out="perf/results/local-ab-$(date -u +%Y-%m-%d).md"
python3 - "$work/rows.txt" "${A_LABEL:-$a_dir}" "${B_LABEL:-$b_dir}" "$size" "$percent" \
  "$rounds" "${REPO_DIR:-/dev/shm}" "${NOTE:-}" <<'EOF' | tee -a "$out"
import datetime, statistics, sys
rows, a_label, b_label, size, percent, rounds, repo_dir, note = sys.argv[1:]
table = {}
for line in open(rows):
    bin_, kind, *values = line.split()
    table.setdefault((kind, bin_), []).append([float(v) for v in values])
print(f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
print(f"Command: `sudo perf/local-ab.sh A B {size} {percent} {rounds}` (repositories in {repo_dir}; "
      f"A = {a_label}, B = {b_label}); medians of {rounds} rounds, builds alternating.")
if note:
    print(f"Note: {note}")
print()
print("| backup | build | wall s | data-plane s | CPU s | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for kind in ("full", "incremental"):
    medians = {}
    for bin_, label in (("a", a_label), ("b", b_label)):
        columns = list(zip(*table[(kind, bin_)]))
        medians[bin_] = [statistics.median(c) for c in columns]
        wall, dp, cpu, rss = medians[bin_]
        print(f"| {kind} | {label} | {wall:.2f} | {dp:.3f} | {cpu:.2f} | {rss / 1024:.0f} |")
    ratio = [b / a if a else float("nan") for a, b in zip(medians["a"], medians["b"])]
    print(f"| {kind} | B / A | {ratio[0]:.2f} | {ratio[1]:.2f} | {ratio[2]:.2f} | {ratio[3]:.2f} |")
EOF
