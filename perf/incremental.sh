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
# FORMAT=cinder: the same with `--format cinder` (Cinder's default 50 MiB objects and 32 KiB
# blocks, zlib) into an S3 bucket (FERRY_TEST_S3_ENDPOINT/FERRY_TEST_S3_BUCKET and the AWS_*
# keys from the environment, else a throwaway Garage, perf/lib.sh): the first backup is a full
# Cinder backup; the incremental reads the read chunks (3.2 MiB) the diff touches and takes every
# other block's SHA-256 from the first backup's _sha256file; the comparison is the full-read
# Cinder incremental of the same volume state onto the same parent (diff answered 404,
# `--incremental-parent`): it reads and hashes everything and uploads the same changed blocks.
# The Cinder backups are deleted afterwards (PYTHON, a python with boto3, default python3).
# Also printed: the upload floor, the incremental's objects (same sizes, fresh contents) PUT
# again by boto3 alone (4 in flight): no data plane on this store can take less.
#
#   sudo perf/incremental.sh [SIZE] [PERCENT]      (default: 4G 1)
#   sudo FORMAT=cinder perf/incremental.sh [SIZE] [PERCENT]
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
# 0.2 s and the 0.1 s poll interval dominate it: it is the simulator's, not a cluster's);
# CPU s = user + system of the ferry process (/usr/bin/time), peak RSS its maximum resident set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-4G}
percent=${2:-1}
format=${FORMAT:-native}
[[ "$format" == native || "$format" == cinder ]] || { echo "FORMAT is native or cinder" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-incremental-perf.XXXXXX")
sim_pid=""
repo_dir=$(mktemp -d "${REPO_DIR:-$work}/ferry-incremental-repo.XXXXXX")
cinder_volume=""
garage_pid=""
cleanup() {
  if [[ -n "$sim_pid" ]]; then kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; fi
  if [[ -n "$cinder_volume" ]]; then
    "${PYTHON:-python3}" - "$cinder_volume" <<'EOF' || echo "Cinder backups of volume $cinder_volume not deleted" >&2
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FERRY_TEST_S3_ENDPOINT"],
                  region_name=os.environ.get("FERRY_TEST_S3_REGION", "garage"))
bucket = os.environ.get("FERRY_TEST_S3_BUCKET", "ferry-test")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"volume_{sys.argv[1]}/"):
    for item in page.get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=item["Key"])
EOF
  fi
  if [[ -n "$garage_pid" ]]; then kill "$garage_pid" 2>/dev/null || true; fi
  rm -rf "$repo_dir" "$work"
}
trap cleanup EXIT
# shellcheck source=perf/lib.sh
source perf/lib.sh
mkdir -p perf/results
perf_commit_label
perf_private_bins ferry bench
if [[ "$format" == cinder ]]; then
  perf_start_garage
  s3_args=(--repo "s3://${FERRY_TEST_S3_BUCKET:-ferry-test}" --s3-endpoint "$FERRY_TEST_S3_ENDPOINT"
           --s3-region "${FERRY_TEST_S3_REGION:-garage}")
  new_uuid() { python3 -c 'import uuid; print(uuid.uuid4())'; }
  cinder_volume=$(new_uuid)
fi
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
if [[ "$format" == native ]]; then
  ferry init --chunk-size 4M >/dev/null
fi

# One backup: drops the page cache, runs ferry under /usr/bin/time, prints "bytes_read
# duration_ms wall_s chunks_read chunks_sampled cpu_s peak_rss_kib backup_id".
run_backup() {
  sync; echo 3 >/proc/sys/vm/drop_caches
  local start end
  local format_args=()
  if [[ "$format" == cinder ]]; then
    format_args=("${s3_args[@]}" --format cinder --cinder-volume-id "$cinder_volume"
                 --cinder-backup-id "$(new_uuid)")
  fi
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S %M" -o "$work/time.txt" "$work/ferry" --json --config "$config" \
    backup --lightbits-volume vol-perf "${format_args[@]}" "$@" >"$work/out.jsonl"
  end=$(date +%s.%N)
  python3 - "$work/out.jsonl" "$start" "$end" "$work/time.txt" <<'EOF'
import json, sys
result = [json.loads(l) for l in open(sys.argv[1])][-1]
assert result["event"] == "result", result
wall = float(sys.argv[3]) - float(sys.argv[2])
user, system, rss = open(sys.argv[4]).read().split()[-3:]
stats = result["stats"]
base = result.get("base") or stats.get("base") or {}
print(stats["bytes_read"], stats["duration_ms"], f"{wall:.2f}", base.get("chunks_read", "-"),
      base.get("chunks_sampled", "-"), f"{float(user) + float(system):.2f}", rss,
      result.get("backup_id", "-"))
EOF
}

read -r first_bytes first_ms first_wall _ _ first_cpu first_rss first_id < <(run_backup --lightbits-keep-base)
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
read -r inc_bytes inc_ms inc_wall inc_read inc_sampled inc_cpu inc_rss inc_id < <(run_backup --lightbits-keep-base)
floor="- - -"
if [[ "$format" == cinder ]]; then
  # The floor of the incremental's uploads on this store: objects of the same sizes and kind
  # as the incremental's (random bytes for data objects; _sha256file and _metadata with every
  # hex digit replaced, so the store can neither deduplicate them against the originals nor
  # compress them differently) PUT by boto3 with as many requests in flight as ferry uses (4).
  floor=$("${PYTHON:-python3}" - "$cinder_volume" "$inc_id" <<'EOF'
import concurrent.futures, os, random, re, sys, time, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FERRY_TEST_S3_ENDPOINT"],
                  region_name=os.environ.get("FERRY_TEST_S3_REGION", "garage"))
bucket = os.environ.get("FERRY_TEST_S3_BUCKET", "ferry-test")
volume, backup = sys.argv[1], sys.argv[2]
keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"volume_{volume}/") for item in page.get("Contents", [])
        if f"_backup_{backup}" in item["Key"]]
rng = random.Random(14)
def fresh(key):
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if key.endswith(("_sha256file", "_metadata")):
        return re.sub(rb"[0-9a-f]", lambda m: b"%x" % rng.randrange(16), body)
    return os.urandom(len(body))
bodies = {f"ferry-perf-floor/{backup}/{key.rsplit('/', 1)[1]}": fresh(key) for key in keys}
start = time.monotonic()
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]),
                  bodies.items()))
elapsed = time.monotonic() - start
for key in bodies:
    s3.delete_object(Bucket=bucket, Key=key)
print(f"{elapsed:.3f} {sum(map(len, bodies.values()))} {len(bodies)}")
EOF
)
fi
sim <<'EOF'
import json, sys, urllib.request
body = json.dumps({"unsupported": 404}).encode()
urllib.request.urlopen(urllib.request.Request(f"http://{sys.argv[1]}/sim/diff", body)).read()
EOF
config="$work/config-full.toml"
full_args=()
if [[ "$format" == cinder ]]; then
  # The same parent as the incremental's: a full-read Cinder incremental (every block compared).
  full_args=(--incremental-parent "$first_id")
fi
read -r full_bytes full_ms full_wall _ _ full_cpu full_rss _ < <(run_backup "${full_args[@]}")

out="perf/results/incremental-$(date -u +%Y-%m-%d).md"
env_prefix="${REPO_DIR:+REPO_DIR=$REPO_DIR }"
if [[ "$format" == cinder ]]; then env_prefix="FORMAT=cinder $env_prefix"; fi
python3 - "$size" "$percent" "$rewritten" "$commit" "${NOTE:-}" \
  "$first_bytes" "$first_ms" "$first_wall" "$inc_bytes" "$inc_ms" "$inc_wall" "$inc_read" \
  "$inc_sampled" "$full_bytes" "$full_ms" "$full_wall" "$env_prefix" "$format" \
  "$first_cpu" "$first_rss" "$inc_cpu" "$inc_rss" "$full_cpu" "$full_rss" $floor >>"$out" <<'EOF'
import datetime, sys
(size, percent, rewritten, commit, note, fb, fms, fwall, ib, ims, iwall, iread, isampled,
 gb, gms, gwall, env_prefix, fmt, fcpu, frss, icpu, irss, gcpu, grss,
 floor_s, floor_bytes, floor_objects) = sys.argv[1:]
repo_env = " ".join(w for w in env_prefix.split() if w.startswith("REPO_DIR="))
where = f"in {repo_env.split('=', 1)[1].strip()}" if repo_env else "on the same disk"
def row(name, b, ms, wall, cpu, rss):
    ctl = float(wall) - int(ms) / 1000
    gib = int(b) / 2**30
    per_gib = f"{float(cpu) / gib:.2f}" if gib > 0 else "-"
    return (f"| {name} | {int(b) / 2**20:.0f} | {int(b) / int(gb) * 100:.1f}% | {int(ms) / 1000:.2f} "
            f"| {wall} | {ctl:.2f} | {cpu} | {per_gib} | {int(rss) / 1024:.0f} |")
print(f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}\n")
if fmt == "cinder":
    print(f"Command: `sudo {env_prefix}perf/incremental.sh {size} {percent}`: {size} mixed volume on the "
          f"Lightbits simulator (loop device), --format cinder (50 MiB objects, 32 KiB blocks, zlib, "
          f"3.2 MiB read chunks) into Garage, {rewritten} 4 MiB chunks ({percent}%) rewritten with "
          f"random data between the backups; incremental: {iread} read chunks read for the diff + "
          f"{isampled} sampled; the comparison is the full-read Cinder incremental onto the same parent.")
else:
    print(f"Command: `sudo {env_prefix}perf/incremental.sh {size} {percent}`: {size} mixed volume on the "
          f"Lightbits simulator (loop device), 4 MiB chunks, local repository {where}, {rewritten} chunks ({percent}%) "
          f"rewritten with random data between the backups; incremental: {iread} chunks read for the "
          f"diff + {isampled} sampled.")
if note:
    print(f"Note: {note}")
print()
print("| backup | MiB read | of the volume | data-plane s | wall s | control-plane s | CPU s "
      "| CPU s/GiB read | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
print(row("first (full, keeps its base)", fb, fms, fwall, fcpu, frss))
print(row("incremental (diff against the base)", ib, ims, iwall, icpu, irss))
full_name = ("full-read incremental, same volume state and parent (diff answered 404)"
             if fmt == "cinder" else "full, same volume and repository state (diff answered 404)")
print(row(full_name, gb, gms, gwall, gcpu, grss))
print(f"\nIncremental / full: bytes read {int(ib) / int(gb):.3f}, data-plane time "
      f"{int(ims) / int(gms):.3f}, wall {float(iwall) / float(gwall):.3f}, CPU "
      f"{float(icpu) / float(gcpu):.3f}.")
if fmt == "cinder":
    print(f"Incremental / first (full, non-incremental) backup: data-plane time "
          f"{int(ims) / int(fms):.3f}.")
    print(f"Upload floor: the incremental's {floor_objects} objects ({int(floor_bytes) / 2**20:.1f} "
          f"MiB: its data objects, _sha256file and _metadata) PUT again with fresh contents of the "
          f"same sizes by boto3, 4 in flight: {float(floor_s):.2f} s, "
          f"{float(floor_s) / (int(gms) / 1000):.3f} of the full-read incremental's data plane; "
          f"the incremental's data plane is {int(ims) / 1000 / float(floor_s):.2f}x that floor.")
EOF
cat "$out"
