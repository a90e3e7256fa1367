#!/usr/bin/env bash
# Issue 4, scope 1: choose the uploader's part size and parts in flight from measurements.
# Runs `bench upload --size SIZE --part-size P --parts-in-flight N` against a throwaway Garage for
# P in PARTS and N in FLIGHTS, REPS times each, interleaved (every repetition walks the whole grid,
# in a rotated order), and records MB/s, client CPU-s/GiB (bench's own JSON), peak RSS
# (/usr/bin/time) and Garage's CPU-s (utime+stime of the Garage process from /proc/PID/stat,
# before and after each run). Must run as root (drop_caches).
#
#   perf/upload-sweep.sh [SIZE]       (default 1G)
#
#   REPS=2                 repetitions of every grid point
#   PARTS="8M 16M 32M"     part sizes
#   FLIGHTS="2 4 6 8 12"   parts in flight
#   NOTE="..."             a line copied into the results file
#   FERRY_BIN_DIR=DIR      take bench from DIR instead of `cargo build --release` of this tree
#   FERRY_BIN_COMMIT=SHA   the commit those binaries were built from (for the results)
#   FERRY_GARAGE_S3_PORT=39200   port of the throwaway Garage (moves up when busy)
#   FERRY_TEST_S3_ENDPOINT etc.  use that endpoint instead (then no Garage CPU figures)
#
# Writes perf/results/upload-sweep-DATE.jsonl (every run) and perf/results/upload-sweep-DATE.md.
# Note: `bench upload` sends parts-in-flight + 1 distinct random parts round-robin, so Garage
# (which stores blocks by content hash) sees repeated blocks.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=perf/lib.sh
source perf/lib.sh
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-1G}
reps=${REPS:-2}
read -r -a parts <<<"${PARTS:-8M 16M 32M}"
read -r -a flights <<<"${FLIGHTS:-2 4 6 8 12}"
note=${NOTE:-}
invocation="${FERRY_BIN_DIR:+FERRY_BIN_DIR=$FERRY_BIN_DIR }REPS=$reps PARTS=\"${parts[*]}\" FLIGHTS=\"${flights[*]}\" perf/upload-sweep.sh $*"
stamp=$(date -u +%Y%m%d-%H%M)
results=perf/results
md="$results/upload-sweep-$stamp.md"
jsonl="$results/upload-sweep-$stamp.jsonl"

[[ $(id -u) -eq 0 ]] || { echo "upload-sweep.sh: must run as root (drop_caches)" >&2; exit 1; }
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || { echo "upload-sweep.sh: REPS must be a positive integer" >&2; exit 2; }
size_bytes=$(numfmt --from=iec "$size")

base=/var/tmp/ferry-peers
mkdir -p "$base" "$results"
work=$(mktemp -d "$base/sweep.XXXXXX")
garage_dir=""
cleanup() {
    if [[ -n "$garage_dir" ]]; then scripts/garage.sh stop "$garage_dir" >&2 || true; fi
    rm -rf "$work"
    rmdir "$base" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

perf_commit_label
perf_private_bins bench

perf_start_garage


grid=()
for p in "${parts[@]}"; do
    for n in "${flights[@]}"; do grid+=("$p:$n"); done
done

failures=0
: >"$jsonl"
for rep in $(seq 1 "$reps"); do
    # Rotate the grid by a different offset each repetition, so no point always runs first.
    offset=$(((rep - 1) * ${#grid[@]} / reps))
    for i in "${!grid[@]}"; do
        point=${grid[(i + offset) % ${#grid[@]}]}
        p=${point%%:*}
        n=${point##*:}
        cmd=("$work/bench" upload --size "$size" --part-size "$p" --parts-in-flight "$n")
        echo "+ [$rep $p x $n] ${cmd[*]}" >&2
        sync
        echo 3 >/proc/sys/vm/drop_caches
        status=0
        g0=$(garage_cpu)
        /usr/bin/time -f '%e %U %S %M' -o "$work/time.txt" "${cmd[@]}" >"$work/out.txt" 2>"$work/err.txt" || status=$?
        g1=$(garage_cpu)
        if [[ $status -ne 0 ]]; then
            echo "upload-sweep.sh: failed with status $status: ${cmd[*]}" >&2
            tail -n 5 "$work/err.txt" >&2
            failures=$((failures + 1))
        fi
        python3 perf/record.py "$work/time.txt" "$work/out.txt" "$work/err.txt" "$g0" "$g1" \
            "$(python3 -c 'import json, sys; print(json.dumps({"rep": int(sys.argv[1]),
"part_size": sys.argv[2], "parts_in_flight": int(sys.argv[3]), "status": int(sys.argv[4]),
"command": sys.argv[5]}))' "$rep" "$p" "$n" "$status" "${cmd[*]}")" >>"$jsonl"
    done
done

P_INVOCATION="$invocation" P_COMMIT="$commit" \
    P_DATE="$(date -u '+%Y-%m-%d %H:%M') UTC" P_NPROC="$(nproc)" P_KERNEL="$(uname -r)" \
    P_MODEL="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    P_GARAGE="$garage_version at $FERRY_TEST_S3_ENDPOINT" P_NOTE="$note" P_SIZE="$size" \
    P_SIZE_BYTES="$size_bytes" \
    python3 - "$jsonl" "$md" <<'PY'
import json, os, statistics, sys
jsonl, md = sys.argv[1:]
E = os.environ
recs = [json.loads(l) for l in open(jsonl) if l.strip()]
GiB = 2**30
size = int(E["P_SIZE_BYTES"])

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

def iec(text):
    return int(float(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1].upper()]) if text[-1].isalpha() else int(text)

points = {}
for r in recs:
    points.setdefault((r["part_size"], r["parts_in_flight"]), []).append(r)

out = []
w = out.append
w("# Upload sweep: `bench upload` part size x parts in flight against Garage (perf/upload-sweep.sh)")
w("")
if E.get("P_NOTE"):
    w("**%s**" % E["P_NOTE"])
    w("")
w("- command: `%s`" % E["P_INVOCATION"])
w("- date: %s; commit %s" % (E["P_DATE"], E["P_COMMIT"]))
w("- machine: %s, nproc %s, kernel %s" % (E["P_MODEL"], E["P_NPROC"], E["P_KERNEL"]))
w("- Garage: %s (same machine); upload size %s (%d bytes) per run" % (E["P_GARAGE"], E["P_SIZE"], size))
w("- raw numbers: `%s`" % os.path.basename(jsonl))
w("")
w("MB/s and client CPU-s/GiB are `bench upload`'s own JSON (median of the repetitions, min-max);")
w("Garage CPU-s/GiB is the Garage process's utime+stime around the run; peak RSS from")
w("`/usr/bin/time`; p99 is the median over repetitions of the per-part upload latency p99.")
w("`bench upload` reuses parts-in-flight + 1 distinct random parts, so Garage, which stores blocks")
w("by content hash, writes fewer distinct blocks than it receives.")
w("")
w("| part size | in flight | runs | MB/s (min-max) | client CPU-s/GiB | Garage CPU-s/GiB | peak RSS MiB | part p99 ms |")
w("|---|---|---|---|---|---|---|---|")
best = None
for key in sorted(points, key=lambda k: (iec(k[0]), k[1])):
    rs = points[key]
    ok = [r for r in rs if r["status"] == 0 and r["result"]]
    if not ok:
        w("| %s | %d | 0 | failed | - | - | - | - |" % (key[0], key[1]))
        continue
    mbs = [r["result"]["mb_per_s"] for r in ok]
    cpu = med([r["result"]["cpu_seconds_per_gib"] for r in ok])
    garage = med([r["garage_cpu_s"] / (size / GiB) if r["garage_cpu_s"] is not None else None for r in ok])
    rss = max(r["max_rss_kib"] for r in ok) / 1024
    p99 = med([(r["result"].get("latency_us") or {}).get("p99") for r in ok])
    m = med(mbs)
    if best is None or m > best[1]:
        best = (key, m)
    w("| %s | %d | %d%s | %.0f (%.0f-%.0f) | %.2f | %s | %.0f | %s |" % (
        key[0], key[1], len(ok), "" if len(ok) == len(rs) else " (%d failed)" % (len(rs) - len(ok)),
        m, min(mbs), max(mbs), cpu, "-" if garage is None else "%.2f" % garage, rss,
        "-" if p99 is None else "%.0f" % (p99 / 1000)))
w("")
if best:
    w("Fastest median: %s parts x %d in flight, %.0f MB/s." % (best[0][0], best[0][1], best[1]))
open(md, "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
echo "wrote $md and $jsonl" >&2
if ((failures > 0)); then
    echo "upload-sweep.sh: $failures run(s) failed" >&2
    exit 1
fi
