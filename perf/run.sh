#!/usr/bin/env bash
# Issue 3's side-by-side benchmark run: fio against `bench` on one loop device, then the engine
# stages, peak RSS, and (when Garage is installed) an S3 multipart upload. Must run as root
# (losetup). Takes about 10 minutes at the defaults.
#
#   perf/run.sh                       (environment knobs below)
#
#   REPS=3           repetitions of every timed step (fio and bench alternate within a repetition)
#   SIZE=2G          size of the loop device and of the generated images
#   BIG=16G          size of the large sparse image of the peak-RSS comparison
#   SKIP_UPLOAD=1    skip the Garage upload step
#
# Steps:
#  (a) loop device (`losetup --direct-io=on`) over a SIZE file of random data in /var/tmp;
#      fio (io_uring, O_DIRECT, sequential read, bs 1M, iodepth 16) and `bench read` (uring,
#      request 1M, depth 16; and pread) alternate REPS times;
#  (b) fio sequential write (same bs/depth, --end_fsync=1) and `bench restore` of a SIZE random
#      image onto the same loop device alternate REPS times;
#  (c) `bench pipeline` on SIZE random, mixed and sparse images (`bench gen-image`), REPS times;
#      `bench hash` and `bench compress` once on the mixed image;
#  (d) peak RSS (`/usr/bin/time -v`) of `bench pipeline` on a SIZE and a BIG sparse image (files
#      with holes, `gen-image --sparse-file`);
#  (e) `bench upload --size 1G` to a throwaway Garage (scripts/garage.sh).
# Every raw JSON result and its command go to perf/results/run-DATE.jsonl; perf/report.py turns
# them into perf/results/run-DATE.md (tables) and perf/results/run-DATE-*.png (matplotlib, in a
# venv under target/perf-venv when not importable). Loop device, Garage and big files are removed
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
reps=${REPS:-3}
size=${SIZE:-2G}
big=${BIG:-16G}
stamp=$(date -u +%Y%m%d-%H%M)
results=perf/results
jsonl="$results/run-$stamp.jsonl"
mkdir -p "$results"
: >"$jsonl"

work=$(mktemp -d /var/tmp/ferry-run.XXXXXX)
loop=""
garage_dir=""
cleanup() {
    if [[ -n "$loop" ]]; then losetup -d "$loop" || true; fi
    if [[ -n "$garage_dir" ]]; then scripts/garage.sh stop "$garage_dir" >/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

[[ $(id -u) -eq 0 ]] || { echo "run.sh: must run as root (losetup)" >&2; exit 1; }
command -v fio >/dev/null || apt-get install -y fio
python=python3
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    if [[ ! -x target/perf-venv/bin/python ]] || ! target/perf-venv/bin/python -c 'import matplotlib' 2>/dev/null; then
        python3 -m venv target/perf-venv
        target/perf-venv/bin/pip install -q matplotlib
    fi
    python=target/perf-venv/bin/python
fi

cargo build --release --bins
# A private copy: others building in the same tree may replace target/release/bench mid-run.
cp target/release/bench "$work/bench"
bench="$work/bench"

# record SECTION STEP TOOL REP CMD...: runs CMD and appends its JSON result, with the command
# and exit status, to the .jsonl file (a failed step is recorded and the run goes on). With
# TIME_V=1 the command runs under /usr/bin/time -v and the peak RSS is recorded too.
record() {
    local section=$1 step=$2 tool=$3 rep=$4
    shift 4
    echo "+ [$section/$step/$tool/$rep] $*" >&2
    local timefile="" status=0
    if [[ "${TIME_V:-0}" == 1 ]]; then
        timefile="$work/time.txt"
        /usr/bin/time -v -o "$timefile" "$@" >"$work/out.json" || status=$?
    else
        "$@" >"$work/out.json" || status=$?
    fi
    if [[ $status -ne 0 ]]; then echo "run.sh: step failed with status $status: $*" >&2; fi
    "$python" perf/report.py wrap "$section" "$step" "$tool" "$rep" "$*" "$work/out.json" "$status" "$timefile" >>"$jsonl"
}

gen() { # gen NAME SIZE MIX [--sparse-file]
    "$bench" gen-image "$work/$1.img" --size "$2" --mix "$3" --seed 2026 "${@:4}" >>"$work/gen.json"
}

# (a) sequential read of a loop device: fio vs bench read.
echo "generating images ($size)" >&2
gen loop "$size" random
gen random "$size" random
gen mixed "$size" mixed
gen sparse "$size" sparse
loop=$(losetup --direct-io=on --find --show "$work/loop.img")
echo "loop device $loop (direct-io: $(cat /sys/block/"${loop#/dev/}"/loop/dio))" >&2
fio_common=(--filename="$loop" --ioengine=io_uring --direct=1 --bs=1M --iodepth=16 --output-format=json)
for rep in $(seq 1 "$reps"); do
    record a read fio "$rep" fio --name=seqread --rw=read "${fio_common[@]}"
    record a read bench-uring "$rep" "$bench" read "$loop" --io-engine uring --request-size 1M --queue-depth 16 --chunk-size 4M
    record a read bench-pread "$rep" "$bench" read "$loop" --io-engine pread --chunk-size 4M
done

# (b) sequential write of the loop device: fio vs bench restore (random image, all data).
for rep in $(seq 1 "$reps"); do
    record b write fio "$rep" fio --name=seqwrite --rw=write --end_fsync=1 "${fio_common[@]}"
    record b write bench-restore "$rep" "$bench" restore "$work/random.img" --target "$loop" --repo "$work/repo" --io-engine uring --queue-depth 16
done
losetup -d "$loop"
loop=""
rm -f "$work/loop.img"
rm -rf "$work/repo"

# (c) the engine alone: backup into a null store, per image kind; single stages in memory.
for rep in $(seq 1 "$reps"); do
    for mix in random mixed sparse; do
        record c "pipeline-$mix" bench "$rep" "$bench" pipeline "$work/$mix.img" --io-engine uring
    done
done
record c hash bench 1 "$bench" hash "$work/mixed.img"
record c compress bench 1 "$bench" compress "$work/mixed.img"
rm -f "$work/random.img" "$work/mixed.img" "$work/sparse.img"

# (d) peak RSS against volume size, on files with holes.
gen sparse-small "$size" sparse --sparse-file
gen sparse-big "$big" sparse --sparse-file
TIME_V=1 record d "rss-$size" bench 1 "$bench" pipeline "$work/sparse-small.img"
TIME_V=1 record d "rss-$big" bench 1 "$bench" pipeline "$work/sparse-big.img"
rm -f "$work/sparse-small.img" "$work/sparse-big.img"

# (e) multipart upload to a local Garage.
if [[ "${SKIP_UPLOAD:-0}" != 1 ]] && { command -v garage >/dev/null || [[ -n "${FERRY_GARAGE_BIN:-}" ]]; }; then
    garage_dir="$work/garage"
    scripts/garage.sh start "$garage_dir" >&2
    (
        # shellcheck disable=SC1091
        source "$garage_dir/env"
        record e upload bench 1 "$bench" upload --size 1G --part-size 16M --parts-in-flight 6
    )
else
    echo "skipping the upload step (no garage, or SKIP_UPLOAD=1)" >&2
fi

"$python" perf/report.py report "$jsonl" "$results/run-$stamp"
echo "wrote $jsonl, $results/run-$stamp.md and $results/run-$stamp-*.png" >&2
