#!/usr/bin/env bash
# Issue 14's targets: an incremental backup of a Lightbits volume from a snapshot diff against a
# full backup of the same volume, side by side. A SIZE volume (default 4G, mixed content) is
# served by scripts/lightbits-sim.py (attached as a loop device), backed up with
# --lightbits-keep-base, then 1% of its 4 MiB chunks are rewritten through the simulator; the
# same volume state is then backed up twice from the same repository state (the repository is
# copied before the first of them): incrementally (diff against the kept base) and in full (the
# simulator told to answer the diff call with 404, so ferry falls back to a full read); both store
# the same rewritten chunks.
# Needs root (losetup). Local repository under a scratch directory; page cache dropped before
# each backup. Appends a table to perf/results/incremental-<date>.md.
#
#   sudo perf/incremental.sh [SIZE] [PERCENT]      (default: 4G 1)
#
#   NOTE="..."             a line copied into the results (e.g. "machine shared with a build")
#   FERRY_BIN_DIR=DIR      take ferry and bench from DIR instead of `cargo build --release`
#   REPO_DIR=DIR           put the repositories there (e.g. /dev/shm: the simulator copies
#                          GiBs into the page cache when it makes a snapshot or clone, and on the
#                          same ext4 a pack's fsync waits for that data to be written out)
#
# Columns: bytes read from the source (the job's stats.bytes_read, the sampling check included);
# data-plane time = the job's own stats.duration_ms (read + hash + compress + upload, with the
# sample re-read); wall = the whole command, the snapshot/clone/attach lifecycle and the diff
# call included; control plane = wall - data plane (the simulator's create/delete delays of
# 0.2 s and the 0.1 s poll interval dominate it: it is the simulator's, not a cluster's).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-4G}
percent=${2:-1}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-incremental-perf.XXXXXX")
sim_pid=""
repo_dir=$(mktemp -d "${REPO_DIR:-$work}/ferry-incremental-repo.XXXXXX")
cleanup() {
  if [[ -n "$sim_pid" ]]; then kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; fi
  rm -rf "$repo_dir" "$work"
}
trap cleanup EXIT
# shellcheck source=perf/lib.sh
source perf/lib.sh
mkdir -p perf/results
perf_commit_label
perf_private_bins ferry bench
mkdir -p "$work"/{state,discovery,by-id,journal} "$repo_dir/repo"
echo perf-token >"$work/token"
"$work/bench" gen-image "$work/volume.img" --size "$size" --mix mixed --seed 14 >/dev/null
python3 scripts/lightbits-sim.py --port 0 --port-file "$work/port" --token-file "$work/token" \
  --state-dir "$work/state" --discovery-dir "$work/discovery" --by-id-dir "$work/by-id" \
  --create-delay 0.2 --delete-delay 0.2 2>"$work/sim.log" >/dev/null &
sim_pid=$!
for _ in $(seq 200); do [[ -s "$work/port" ]] && break; sleep 0.05; done
api="127.0.0.1:$(cat "$work/port")"
cat >"$work/config.toml" <<EOF
repository = "$repo_dir/repo"
[lightbits]
api_addresses = ["http://$api"]
token_file = "$work/token"
hostnqn = "nqn.2014-08.org.nvmexpress:uuid:ferry-perf"
discovery_dir = "$work/discovery"
by_id_dir = "$work/by-id"
journal_dir = "$work/journal"
poll_interval_secs = 0.1
EOF
sim() { python3 - "$api" "$@"; }
uuid=$(sim "$work/volume.img" <<'EOF'
import json, sys, urllib.request
body = json.dumps({"name": "vol-perf", "from_file": sys.argv[2]}).encode()
with urllib.request.urlopen(urllib.request.Request(f"http://{sys.argv[1]}/sim/volumes", body)) as r:
    print(json.load(r)["UUID"])
EOF
)
sed "s|^repository = .*|repository = \"$repo_dir/repo-full\"|" "$work/config.toml" >"$work/config-full.toml"
config="$work/config.toml"
ferry() { "$work/ferry" --json --config "$config" "$@"; }
ferry init --chunk-size 4M >/dev/null

# One backup: drops the page cache, runs ferry, prints "bytes_read duration_ms wall_s chunks_read".
run_backup() {
  sync; echo 3 >/proc/sys/vm/drop_caches
  local start end
  start=$(date +%s.%N)
  ferry backup --lightbits-volume vol-perf "$@" >"$work/out.jsonl"
  end=$(date +%s.%N)
  python3 - "$work/out.jsonl" "$start" "$end" <<'EOF'
import json, sys
result = [json.loads(l) for l in open(sys.argv[1])][-1]
assert result["event"] == "result", result
wall = float(sys.argv[3]) - float(sys.argv[2])
base = result.get("base") or {}
print(result["stats"]["bytes_read"], result["stats"]["duration_ms"], f"{wall:.2f}",
      base.get("chunks_read", "-"), base.get("chunks_sampled", "-"))
EOF
}

read -r first_bytes first_ms first_wall _ _ < <(run_backup --lightbits-keep-base)
# Rewrite PERCENT% of the 4 MiB chunks (random chunks, random data) through the simulator.
rewritten=$(sim "$uuid" "$size" "$percent" <<'EOF'
import base64, json, os, random, sys, urllib.request
api, uuid, size, percent = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
size = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
chunk = 4 << 20
count = max(1, round(size // chunk * percent / 100))
for index in random.Random(14).sample(range(size // chunk), count):
    body = json.dumps({"offset": index * chunk,
                       "data_b64": base64.b64encode(os.urandom(chunk)).decode()}).encode()
    urllib.request.urlopen(urllib.request.Request(f"http://{api}/sim/volumes/{uuid}/write", body)).read()
print(count)
EOF
)
cp -a "$repo_dir/repo" "$repo_dir/repo-full"
read -r inc_bytes inc_ms inc_wall inc_read inc_sampled < <(run_backup --lightbits-keep-base)
sim <<'EOF'
import json, sys, urllib.request
body = json.dumps({"unsupported": 404}).encode()
urllib.request.urlopen(urllib.request.Request(f"http://{sys.argv[1]}/sim/diff", body)).read()
EOF
config="$work/config-full.toml"
read -r full_bytes full_ms full_wall _ _ < <(run_backup)

out="perf/results/incremental-$(date -u +%Y-%m-%d).md"
python3 - "$size" "$percent" "$rewritten" "$commit" "${NOTE:-}" \
  "$first_bytes" "$first_ms" "$first_wall" "$inc_bytes" "$inc_ms" "$inc_wall" "$inc_read" \
  "$inc_sampled" "$full_bytes" "$full_ms" "$full_wall" "${REPO_DIR:+REPO_DIR=$REPO_DIR }" >>"$out" <<'EOF'
import datetime, sys
(size, percent, rewritten, commit, note, fb, fms, fwall, ib, ims, iwall, iread, isampled,
 gb, gms, gwall, repo_env) = sys.argv[1:]
where = f"in {repo_env.split('=', 1)[1].strip()}" if repo_env else "on the same disk"
def row(name, b, ms, wall):
    ctl = float(wall) - int(ms) / 1000
    return (f"| {name} | {int(b) / 2**20:.0f} | {int(b) / int(gb) * 100:.1f}% | {int(ms) / 1000:.2f} "
            f"| {wall} | {ctl:.2f} |")
print(f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}\n")
print(f"Command: `sudo {repo_env}perf/incremental.sh {size} {percent}`: {size} mixed volume on the "
      f"Lightbits simulator (loop device), 4 MiB chunks, local repository {where}, {rewritten} chunks ({percent}%) "
      f"rewritten with random data between the backups; incremental: {iread} chunks read for the "
      f"diff + {isampled} sampled.")
if note:
    print(f"Note: {note}")
print()
print("| backup | MiB read | of the volume | data-plane s | wall s | control-plane s |")
print("|---|---|---|---|---|---|")
print(row("first (full, keeps its base)", fb, fms, fwall))
print(row("incremental (diff against the base)", ib, ims, iwall))
print(row("full, same volume and repository state (diff answered 404)", gb, gms, gwall))
print(f"\nIncremental / full: bytes read {int(ib) / int(gb):.3f}, data-plane time "
      f"{int(ims) / int(gms):.3f}, wall {float(iwall) / float(gwall):.3f}.")
EOF
cat "$out"
