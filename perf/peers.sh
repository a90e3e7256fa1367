#!/usr/bin/env bash
# Issue 4's targets, side by side on one Garage and the same bytes: ferry against rclone
# (multipart upload, multi-stream download) and restic (`backup --stdin`, restore/dump).
# Must run as root (losetup, drop_caches, apt-get).
#
#   perf/peers.sh [SIZE]              (default 2G)
#
#   REPS=3           repetitions; the tool groups rotate their order from one repetition to the next
#   NOTE="..."       a line copied into the results file (e.g. "smoke run on a busy machine")
#   FERRY_BIN_DIR=DIR  take ferry and bench from DIR instead of `cargo build --release` of this tree
#                (e.g. binaries built from a clean `git archive` while the tree is being edited);
#                FERRY_BIN_COMMIT=SHA names their commit in the results
#   FERRY_GARAGE_S3_PORT=39200   port of the throwaway Garage (scripts/garage.sh moves up when busy)
#   FERRY_TEST_S3_ENDPOINT, FERRY_TEST_S3_BUCKET, FERRY_TEST_S3_REGION, AWS_ACCESS_KEY_ID,
#   AWS_SECRET_ACCESS_KEY        use this S3 endpoint instead of starting a Garage
#   RCLONE_S3_DISABLE_CHECKSUM=true etc.  any rclone flag as an environment variable (rclone's
#                default computes the file's MD5 before a multipart upload; that is measured)
#
# Per repetition, each step after `sync; echo 3 > /proc/sys/vm/drop_caches`, timed with
# `/usr/bin/time -f '%e %U %S %M'` (wall, user, sys, peak RSS; user+sys includes children):
#  random bytes:  `bench upload --size SIZE --part-size 16M --parts-in-flight 6` (ferry's S3 pool;
#                 its own JSON gives MB/s and CPU) and `rclone copyto` of a SIZE file laid out
#                 like bench's parts (7 distinct random 16 MiB parts, round-robin; Garage sees the
#                 same duplicate-block pattern from both);
#  rclone:        `rclone copyto` of the image (--s3-chunk-size 16M --s3-upload-concurrency 6),
#                 then a `--multi-thread-streams 6` download of it to a file;
#  ferry:         `ferry backup` of the loop device to a fresh repository, `ferry restore` to a new
#                 file;
#  restic:        `cat /dev/loopN | restic backup --stdin` to a fresh repository, then both
#                 `restic restore latest --target DIR` and `restic dump latest /vol.img > FILE`
#                 (the faster one is used for the ratio).
# Every restored or downloaded file is compared with the image (cmp). Credentials reach the tools
# only through the environment or files: rclone's remote is configured by RCLONE_CONFIG_PEERS_*
# variables (env_auth reads AWS_*), ferry by a config file plus AWS_*, restic by AWS_* and
# RESTIC_PASSWORD_FILE.
#
# Writes perf/results/peers-DATE.jsonl (every run: command, status, wall/user/sys/RSS, Garage
# CPU-s, tool JSON) and perf/results/peers-DATE.md (medians, ratios against the targets).
# Work files live under /var/tmp/ferry-peers; they, the loop device and Garage go at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=perf/lib.sh
source perf/lib.sh
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-2G}
reps=${REPS:-3}
note=${NOTE:-}
part=16M
streams=6
invocation="${FERRY_BIN_DIR:+FERRY_BIN_DIR=$FERRY_BIN_DIR }REPS=$reps perf/peers.sh $*"
stamp=$(date -u +%Y%m%d-%H%M)
results=perf/results
md="$results/peers-$stamp.md"
jsonl="$results/peers-$stamp.jsonl"

[[ $(id -u) -eq 0 ]] || { echo "peers.sh: must run as root (losetup, drop_caches)" >&2; exit 1; }
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || { echo "peers.sh: REPS must be a positive integer" >&2; exit 2; }
size_bytes=$(numfmt --from=iec "$size")
part_bytes=$(numfmt --from=iec "$part")

if ! command -v rclone >/dev/null || ! command -v restic >/dev/null; then
    apt-get install -y rclone restic >&2
fi
rclone_version=$(rclone version | sed -n 1p)
restic_version=$(restic version)

base=/var/tmp/ferry-peers
mkdir -p "$base" "$results"
work=$(mktemp -d "$base/peers.XXXXXX")
loop=""
garage_dir=""
cleanup() {
    if [[ -n "$loop" ]]; then losetup -d "$loop" || true; fi
    if [[ -n "$garage_dir" ]]; then scripts/garage.sh stop "$garage_dir" >&2 || true; fi
    rm -rf "$work"
    rmdir "$base" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

perf_commit_label
perf_private_bins ferry bench
ferry_bin="$work/ferry"
bench_bin="$work/bench"

perf_start_garage
: "${AWS_ACCESS_KEY_ID:?}" "${AWS_SECRET_ACCESS_KEY:?}"
export FERRY_TEST_S3_BUCKET=${FERRY_TEST_S3_BUCKET:-ferry-test}
export FERRY_TEST_S3_REGION=${FERRY_TEST_S3_REGION:-garage}
endpoint=$FERRY_TEST_S3_ENDPOINT
bucket=$FERRY_TEST_S3_BUCKET
region=$FERRY_TEST_S3_REGION

# rclone: one remote, "peers:", from the environment only.
export RCLONE_CONFIG="$work/rclone.conf"
: >"$RCLONE_CONFIG"
export RCLONE_CONFIG_PEERS_TYPE=s3
export RCLONE_CONFIG_PEERS_PROVIDER=Other
export RCLONE_CONFIG_PEERS_ENV_AUTH=true
export RCLONE_CONFIG_PEERS_ENDPOINT="$endpoint"
export RCLONE_CONFIG_PEERS_REGION="$region"
export RCLONE_CONFIG_PEERS_FORCE_PATH_STYLE=true
# rclone 1.60's AWS session fails on any AWS_CA_BUNDLE ("LoadCustomCABundleError: unable to load
# custom CA bundle, HTTPClient's transport unsupported type"), so rclone runs without it.
rclone=(env -u AWS_CA_BUNDLE rclone)
# ferry: endpoint and region from a config file, credentials from AWS_*.
cat >"$work/ferry.toml" <<EOF
[s3]
endpoint_url = "$endpoint"
region = "$region"
path_style = true
EOF
# restic: AWS_* for S3, a password file, a cache inside the work directory.
umask 077
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/restic.pass"
umask 022
export RESTIC_PASSWORD_FILE="$work/restic.pass"
export RESTIC_CACHE_DIR="$work/restic-cache"
restic_s3="s3:$endpoint/$bucket"

echo "generating the ${size} mixed image and the random file" >&2
"$bench_bin" gen-image "$work/volume.img" --size "$size" --mix mixed --seed 2026 >"$work/gen.json"
image_bytes=$(stat -c %s "$work/volume.img")
# Like `bench upload`'s data: parts-in-flight + 1 distinct random parts, part n is sample n % 7.
python3 - "$work/random.bin" "$size_bytes" "$part_bytes" $((streams + 1)) <<'PY'
import os, sys
path, size, part, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
samples = [os.urandom(part) for _ in range(k)]
with open(path, "wb") as f:
    offset, number = 0, 1
    while offset < size:
        length = min(part, size - offset)
        f.write(samples[number % k][:length])
        offset += length
        number += 1
PY
loop=$(losetup --direct-io=on --find --show "$work/volume.img")
echo "loop device $loop over $work/volume.img ($image_bytes bytes)" >&2


drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

failures=0
# measure TOOL OP REP BYTES CMD...: drops caches, runs CMD under /usr/bin/time (stdout to
# $work/out.txt), appends one JSON line to the .jsonl. Never fails: a failed step is recorded.
measure() {
    local tool=$1 op=$2 rep=$3 bytes=$4
    shift 4
    echo "+ [$rep $tool $op] $*" >&2
    drop_caches
    local status=0 g0 g1
    g0=$(garage_cpu)
    /usr/bin/time -f '%e %U %S %M' -o "$work/time.txt" "$@" >"$work/out.txt" 2>"$work/err.txt" || status=$?
    g1=$(garage_cpu)
    if [[ $status -ne 0 ]]; then
        echo "peers.sh: [$tool $op] failed with status $status: $*" >&2
        tail -n 5 "$work/err.txt" >&2
        failures=$((failures + 1))
    fi
    python3 perf/record.py "$work/time.txt" "$work/out.txt" "$work/err.txt" "$g0" "$g1" \
        "$(python3 -c 'import json, sys; print(json.dumps({"tool": sys.argv[1], "op": sys.argv[2],
"rep": int(sys.argv[3]), "bytes": int(sys.argv[4]), "status": int(sys.argv[5]),
"command": sys.argv[6]}))' "$tool" "$op" "$rep" "$bytes" "$status" "$*")" >>"$jsonl"
}

# verify TOOL OP REP FILE: cmp FILE with the image, record the outcome, remove FILE.
verify() {
    local tool=$1 op=$2 rep=$3 file=$4 same=true
    if ! cmp "$work/volume.img" "$file" >&2; then
        same=false
        failures=$((failures + 1))
        echo "peers.sh: [$tool $op] $file differs from the image" >&2
    fi
    printf '{"tool":"%s","op":"%s","rep":%d,"verify":%s}\n' "$tool" "$op" "$rep" "$same" >>"$jsonl"
    rm -rf "$file"
}

last_status() { python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["status"])' "$jsonl"; }

group_random() {
    local rep=$1
    local pool=("$bench_bin" upload --size "$size" --part-size "$part" --parts-in-flight "$streams")
    local rc=("${rclone[@]}" copyto -q "$work/random.bin" "peers:$bucket/peers-rclone/random-$rep.bin"
              --s3-chunk-size "$part" --s3-upload-concurrency "$streams" --s3-upload-cutoff "$part")
    if ((rep % 2)); then
        measure ferry-pool upload-random "$rep" "$size_bytes" "${pool[@]}"
        measure rclone upload-random "$rep" "$size_bytes" "${rc[@]}"
    else
        measure rclone upload-random "$rep" "$size_bytes" "${rc[@]}"
        measure ferry-pool upload-random "$rep" "$size_bytes" "${pool[@]}"
    fi
    "${rclone[@]}" deletefile "peers:$bucket/peers-rclone/random-$rep.bin" >&2 || true
}

group_rclone() {
    local rep=$1
    local key="peers:$bucket/peers-rclone/volume-$rep.img"
    measure rclone upload "$rep" "$image_bytes" "${rclone[@]}" copyto -q "$work/volume.img" "$key" \
        --s3-chunk-size "$part" --s3-upload-concurrency "$streams" --s3-upload-cutoff "$part"
    [[ $(last_status) == 0 ]] || return 0
    measure rclone download "$rep" "$image_bytes" "${rclone[@]}" copyto -q "$key" "$work/rclone.img" \
        --multi-thread-streams "$streams" --multi-thread-cutoff "$part"
    if [[ $(last_status) == 0 ]]; then verify rclone download "$rep" "$work/rclone.img"; fi
    "${rclone[@]}" deletefile "$key" >&2 || true
}

group_ferry() {
    local rep=$1
    local ferry=("$ferry_bin" --config "$work/ferry.toml" --repo "s3://$bucket/peers-ferry-$stamp-$rep" --json)
    "${ferry[@]}" init >/dev/null
    measure ferry backup "$rep" "$image_bytes" "${ferry[@]}" backup --source "$loop"
    [[ $(last_status) == 0 ]] || return 0
    local id
    id=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["backup_id"])' "$work/out.txt")
    measure ferry restore "$rep" "$image_bytes" "${ferry[@]}" restore "$id" --target "$work/ferry.img"
    if [[ $(last_status) == 0 ]]; then verify ferry restore "$rep" "$work/ferry.img"; fi
}

group_restic() {
    local rep=$1
    local repo="$restic_s3/peers-restic-$stamp-$rep"
    local restic=(restic -r "$repo" -o "s3.region=$region" -q)
    "${restic[@]}" init >/dev/null
    # shellcheck disable=SC2016
    measure restic backup "$rep" "$image_bytes" bash -c 'set -o pipefail; dev=$1; shift; cat "$dev" | "$@" backup --stdin --stdin-filename vol.img' \
        _ "$loop" "${restic[@]}"
    [[ $(last_status) == 0 ]] || return 0
    measure restic restore "$rep" "$image_bytes" "${restic[@]}" restore latest --target "$work/restic-restore"
    if [[ $(last_status) == 0 ]]; then verify restic restore "$rep" "$work/restic-restore/vol.img"; fi
    rm -rf "$work/restic-restore"
    # shellcheck disable=SC2016
    measure restic dump "$rep" "$image_bytes" bash -c 'out=$1; shift; "$@" dump latest /vol.img >"$out"' \
        _ "$work/restic-dump.img" "${restic[@]}"
    if [[ $(last_status) == 0 ]]; then verify restic dump "$rep" "$work/restic-dump.img"; fi
    rm -f "$work/restic-dump.img"
}

: >"$jsonl"
groups=(group_random group_rclone group_ferry group_restic)
for rep in $(seq 1 "$reps"); do
    for i in "${!groups[@]}"; do
        "${groups[(i + rep - 1) % ${#groups[@]}]}" "$rep"
    done
done

P_INVOCATION="$invocation" P_COMMIT="$commit" \
    P_DATE="$(date -u '+%Y-%m-%d %H:%M') UTC" P_NPROC="$(nproc)" P_KERNEL="$(uname -r)" \
    P_MODEL="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    P_IMAGE="$size mixed (\`bench gen-image --mix mixed --seed 2026\`, $image_bytes bytes)" \
    P_GARAGE="$garage_version at $endpoint" P_RCLONE="$rclone_version" P_RESTIC="$restic_version" \
    P_FERRY="$("$ferry_bin" --version)" P_NOTE="$note" \
    python3 - "$jsonl" "$md" <<'PY'
import json, statistics, sys, os
jsonl, md = sys.argv[1:]
E = os.environ
recs = [json.loads(l) for l in open(jsonl) if l.strip()]
runs = [r for r in recs if "verify" not in r]
verifies = [r for r in recs if "verify" in r]
GiB = 2**30

def metrics(r):
    """MB/s and client CPU-s per GiB of one run (bench upload: its own timing)."""
    if r["tool"] == "ferry-pool" and r["result"]:
        return r["result"]["mb_per_s"], r["result"]["cpu_seconds_per_gib"]
    return r["bytes"] / 1e6 / r["wall_s"], (r["user_s"] + r["sys_s"]) / (r["bytes"] / GiB)

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

rows = {}
for r in runs:
    key = (r["tool"], r["op"])
    rows.setdefault(key, []).append(r)

summary = {}
for key, rs in rows.items():
    ok = [r for r in rs if r["status"] == 0 and r["wall_s"]]
    if not ok:
        summary[key] = None
        continue
    m = [metrics(r) for r in ok]
    s = {"n": len(ok), "failed": len(rs) - len(ok),
         "mb_s": med([x[0] for x in m]), "mb_s_min": min(x[0] for x in m), "mb_s_max": max(x[0] for x in m),
         "cpu_gib": med([x[1] for x in m]),
         "rss_mib": max(r["max_rss_kib"] for r in ok) / 1024,
         "garage_gib": med([r["garage_cpu_s"] / (r["bytes"] / GiB) if r["garage_cpu_s"] is not None else None for r in ok]),
         "wall": med([r["wall_s"] for r in ok])}
    if key == ("ferry", "backup"):
        s["wire"] = "%.0f MiB uploaded" % (med([r["result"]["bytes_uploaded"] for r in ok]) / 2**20)
    if key == ("ferry", "restore"):
        down = [r["result"]["stats"]["bytes_downloaded"] for r in ok]
        s["wire"] = "%.0f MiB downloaded, %.0f MB/s on the wire" % (
            med(down) / 2**20, med([d / 1e6 / r["wall_s"] for d, r in zip(down, ok)]))
        s["wire_mb_s"] = med([d / 1e6 / r["wall_s"] for d, r in zip(down, ok)])
    summary[key] = s

order = [("ferry-pool", "upload-random"), ("rclone", "upload-random"),
         ("ferry", "backup"), ("rclone", "upload"), ("restic", "backup"),
         ("ferry", "restore"), ("rclone", "download"), ("restic", "restore"), ("restic", "dump")]
what = {("ferry-pool", "upload-random"): "bench upload: SIZE random bytes, 16M parts x 6 (own timing)",
        ("rclone", "upload-random"): "copyto of a SIZE random file (same part layout), 16M chunks x 6",
        ("ferry", "backup"): "backup of the loop device (mixed image), fresh repository",
        ("rclone", "upload"): "copyto of the image, 16M chunks x 6",
        ("restic", "backup"): "cat loop | backup --stdin, fresh repository",
        ("ferry", "restore"): "restore to a new file",
        ("rclone", "download"): "copyto of the image object, --multi-thread-streams 6",
        ("restic", "restore"): "restore latest --target DIR",
        ("restic", "dump"): "dump latest /vol.img > FILE"}

def cell(v, fmt="%.0f"):
    return "-" if v is None else fmt % v

out = []
w = out.append
w("# Peers side by side: ferry, rclone, restic on one Garage (perf/peers.sh)")
w("")
if E.get("P_NOTE"):
    w("**%s**" % E["P_NOTE"])
    w("")
w("- command: `%s`" % E["P_INVOCATION"])
w("- date: %s; commit %s" % (E["P_DATE"], E["P_COMMIT"]))
w("- machine: %s, nproc %s, kernel %s" % (E["P_MODEL"], E["P_NPROC"], E["P_KERNEL"]))
w("- image: %s on a loop device (`losetup --direct-io=on`); Garage: %s (same machine)" % (E["P_IMAGE"], E["P_GARAGE"]))
w("- versions: %s; %s; %s" % (E["P_RCLONE"], E["P_RESTIC"], E["P_FERRY"]))
w("- raw numbers: `%s`" % os.path.basename(jsonl))
w("")
w("Page cache dropped before every step. MB/s = SIZE (or image bytes) / wall seconds, except the")
w("ferry-pool row, which is `bench upload`'s own JSON (its timer starts after it has generated its")
w("parts, and its CPU is its own process). CPU-s/GiB = client user+sys (children included) per GiB")
w("of the volume or file; Garage CPU-s/GiB from /proc/<garage>/stat around the step. Medians of")
w("the successful repetitions (min-max); peak RSS is the maximum over repetitions.")
w("")
w("| tool | operation | runs | MB/s (min-max) | client CPU-s/GiB | peak RSS MiB | Garage CPU-s/GiB | note |")
w("|---|---|---|---|---|---|---|---|")
for key in order:
    s = summary.get(key)
    if key not in summary:
        continue
    if s is None:
        w("| %s | %s | 0 | failed | - | - | - | %s |" % (key[0], key[1], what[key]))
        continue
    note = what[key] + ("; " + s["wire"] if "wire" in s else "")
    if s["failed"]:
        note += "; %d failed" % s["failed"]
    w("| %s | %s | %d | %s (%s-%s) | %s | %s | %s | %s |" % (key[0], key[1], s["n"], cell(s["mb_s"]),
      cell(s["mb_s_min"]), cell(s["mb_s_max"]), cell(s["cpu_gib"], "%.2f"), cell(s["rss_mib"]),
      cell(s["garage_gib"], "%.2f"), note))
w("")

def get(key, field):
    s = summary.get(key)
    return s.get(field) if s else None

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

restic_restore_key = None
rr, rd = get(("restic", "restore"), "mb_s"), get(("restic", "dump"), "mb_s")
if rr is not None or rd is not None:
    restic_restore_key = ("restic", "restore") if (rd is None or (rr is not None and rr >= rd)) else ("restic", "dump")
targets = [
    ("ferry pool upload vs rclone upload, same random bytes", "MB/s",
     ratio(get(("ferry-pool", "upload-random"), "mb_s"), get(("rclone", "upload-random"), "mb_s")), ">= 1", 1, True),
    ("ferry pool vs rclone, client CPU-s/GiB uploaded", "CPU",
     ratio(get(("ferry-pool", "upload-random"), "cpu_gib"), get(("rclone", "upload-random"), "cpu_gib")), "<= 1", 1, False),
    ("ferry backup vs rclone upload, same image", "MB/s",
     ratio(get(("ferry", "backup"), "mb_s"), get(("rclone", "upload"), "mb_s")), ">= 1", 1, True),
    ("ferry backup vs rclone upload, client CPU-s/GiB of image", "CPU",
     ratio(get(("ferry", "backup"), "cpu_gib"), get(("rclone", "upload"), "cpu_gib")), "<= 1", 1, False),
    ("ferry restore vs rclone multi-stream download, image MB/s", "MB/s",
     ratio(get(("ferry", "restore"), "mb_s"), get(("rclone", "download"), "mb_s")), ">= 1", 1, True),
    ("ferry restore wire MB/s (bytes downloaded) vs rclone download", "MB/s",
     ratio(get(("ferry", "restore"), "wire_mb_s"), get(("rclone", "download"), "mb_s")), "(info)", None, True),
    ("ferry backup vs restic backup --stdin", "MB/s",
     ratio(get(("ferry", "backup"), "mb_s"), get(("restic", "backup"), "mb_s")), ">= 4", 4, True),
    ("ferry restore vs restic %s (the faster)" % (restic_restore_key[1] if restic_restore_key else "restore"), "MB/s",
     ratio(get(("ferry", "restore"), "mb_s"), get(restic_restore_key, "mb_s") if restic_restore_key else None), ">= 3", 3, True),
]
w("## Issue 4 targets (ratio of medians, ferry / peer)")
w("")
w("| comparison | of | ratio | target | met |")
w("|---|---|---|---|---|")
for name, of, value, target, bound, higher in targets:
    met = "-" if value is None or bound is None else ("yes" if (value >= bound if higher else value <= bound) else "no")
    w("| %s | %s | %s | %s | %s |" % (name, of, cell(value, "%.2f"), target, met))
w("")
bad = [v for v in verifies if not v["verify"]]
w("Restores and downloads compared with the image (cmp): %d of %d identical%s." % (
  len(verifies) - len(bad), len(verifies), "" if not bad else " — DIFFERENT: " + ", ".join("%s %s rep %d" % (v["tool"], v["op"], v["rep"]) for v in bad)))
failed = [r for r in runs if r["status"] != 0]
if failed:
    w("")
    w("Failed steps:")
    for r in failed:
        w("- %s %s rep %d, status %d: `%s`" % (r["tool"], r["op"], r["rep"], r["status"], r["command"]))
open(md, "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
echo "wrote $md and $jsonl" >&2
if ((failures > 0)); then
    echo "peers.sh: $failures step(s) failed or differed" >&2
    exit 1
fi
