#!/usr/bin/env bash
# Issue 15's targets: an encrypted repository (`ferry init --encrypt`) against an unencrypted one,
# side by side in one run on one Garage, the same images: a mixed (40% zero / 30% text / 30%
# random) and a random image, backed up and restored into each repository alternately, ROUNDS
# times. Each step runs under /usr/bin/time -v after dropping the page cache (root): wall time,
# CPU-s/GiB (user + sys of the ferry process) and peak RSS. Restores are checked byte-identical
# with cmp. Appends the table (encrypted / unencrypted throughput, CPU-s/GiB added) to
# perf/results/encryption-<date>.md.
#
#   perf/encryption.sh [SIZE] [ROUNDS]   (default 2G, 2)
#   NOTE="..."   a line copied into the results
#   CIPHER=NAME  `init --cipher NAME` (default: ferry's choice for this CPU)
#   KEY=file     unlock with a key file instead of a passphrase (no Argon2id per command)
#
# Also measures what unlocking costs each command: `ferry list` of one encrypted and one
# unencrypted repository, five times each (CPU-s of the whole process).
#   FERRY_BIN_DIR, FERRY_TEST_S3_*, AWS_*: as perf/lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
size=${1:-2G}
rounds=${2:-2}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-encryption-perf.XXXXXX")
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
cipher_args=()
if [[ -n "${CIPHER:-}" ]]; then cipher_args=(--cipher "$CIPHER"); fi
if [[ "${KEY:-passphrase}" == file ]]; then
  "$work/ferry" key generate-file "$work/repo.key" > /dev/null
  export FERRY_KEY_FILE="$work/repo.key"
else
  export FERRY_PASSPHRASE="perf-encryption-$RANDOM-$RANDOM"
fi
unkeyed=(env -u FERRY_PASSPHRASE -u FERRY_KEY_FILE)
rows="$work/rows.tsv"
: > "$rows"

drop_caches() { sync; if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
# measure LABEL STEP BYTES CMD...: one row "label step wall_s cpu_s rss_mib bytes".
measure() {
  local label=$1 step=$2 bytes=$3; shift 3
  drop_caches
  /usr/bin/time -v -o "$work/time" "$@" > "$work/out" 2> "$work/err" \
    || { cat "$work/err" >&2; tail -3 "$work/out" >&2; exit 1; }
  python3 - "$work/time" "$label" "$step" "$bytes" >> "$rows" <<'PY'
import sys
t = open(sys.argv[1]).read().splitlines()
get = lambda key: [l.split(': ', 1)[1] for l in t if key in l][0]
wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(get('Elapsed (wall clock)').split(':'))))
cpu = float(get('User time (seconds)')) + float(get('System time (seconds)'))
rss = int(get('Maximum resident set size')) // 1024
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{wall:.2f}\t{cpu:.2f}\t{rss}\t{sys.argv[4]}")
PY
}

run_image() {
  local label=$1 image=$2
  local bytes; bytes=$(stat -c %s "$image")
  local round kind repo
  for round in $(seq 1 "$rounds"); do
    # Alternate which goes first, so drift in the shared machine's load hits both.
    local order=(plain encrypted)
    if (( round % 2 == 0 )); then order=(encrypted plain); fi
    for kind in "${order[@]}"; do
      repo="s3://$bucket/encryption-$label-$kind-$round-$RANDOM"
      if [[ $kind == encrypted ]]; then
        "$work/ferry" --repo "$repo" "${common[@]}" init --encrypt "${cipher_args[@]}" > /dev/null
      else
        "${unkeyed[@]}" "$work/ferry" --repo "$repo" "${common[@]}" init > /dev/null
      fi
      last_repo[$kind]=$repo
      local run=("$work/ferry")
      if [[ $kind == plain ]]; then run=("${unkeyed[@]}" "$work/ferry"); fi
      measure "$label" "$kind backup" "$bytes" "${run[@]}" --repo "$repo" "${common[@]}" backup --source "$image" --backup-id b1
      rm -f "$work/restore.img"
      measure "$label" "$kind restore" "$bytes" "${run[@]}" --repo "$repo" "${common[@]}" restore b1 --target "$work/restore.img"
      cmp "$image" "$work/restore.img"
      rm -f "$work/restore.img"
    done
  done
}

declare -A last_repo
"$work/bench" gen-image "$work/mixed.img" --size "$size" --mix mixed --seed 2026 > /dev/null
run_image "mixed-$size" "$work/mixed.img"
rm -f "$work/mixed.img"
"$work/bench" gen-image "$work/random.img" --size "$size" --mix random --seed 2027 > /dev/null
run_image "random-$size" "$work/random.img"
rm -f "$work/random.img"
# Unlocking: `list` of each kind's last repository, five times, alternating.
unlock="$work/unlock.tsv"
: > "$unlock"
for _ in 1 2 3 4 5; do
  for kind in plain encrypted; do
    run=("$work/ferry")
    if [[ $kind == plain ]]; then run=("${unkeyed[@]}" "$work/ferry"); fi
    /usr/bin/time -f "$kind %U %S %e" -a -o "$unlock" "${run[@]}" --repo "${last_repo[$kind]}" \
      "${common[@]}" list > /dev/null
  done
done

out=perf/results/encryption-$(date +%Y-%m-%d).md
python3 - "$rows" "$out" "$commit" "$(nproc)" "${NOTE:-}" "$size" "$rounds" "$unlock" \
  "${CIPHER:-}" "${KEY:-passphrase}" <<'PY'
import sys, datetime, statistics
rows_path, out, commit, cpus, note, size, rounds, unlock, cipher, key = sys.argv[1:11]
rows = [l.rstrip('\n').split('\t') for l in open(rows_path) if l.strip()]
with open(out, 'a') as f:
    f.write(f"\n## {datetime.datetime.now().isoformat(timespec='seconds')}: commit {commit}, {cpus} CPUs\n\n")
    if note:
        f.write(note + "\n\n")
    env = "".join(f"{k}={v} " for k, v in (("CIPHER", cipher), ("KEY", key)) if v and v != "passphrase")
    f.write(f"Command: `{env}perf/encryption.sh {size} {rounds}` (see the script's header; cipher "
            f"{cipher or 'ferry default'}, unlocked with a {'key file' if key == 'file' else 'passphrase'}). Caches dropped "
            "before each step; every restore byte-identical (cmp); encrypted and unencrypted runs "
            "alternate. CPU is the ferry process's user+sys per GiB of volume.\n\n")
    f.write("| image | step | round | wall s | MB/s | CPU-s/GiB | peak RSS MiB |\n|---|---|---|---|---|---|---|\n")
    seen = {}
    for label, step, wall, cpu, rss, nbytes in rows:
        seen[(label, step)] = seen.get((label, step), 0) + 1
        wall, cpu, nbytes = float(wall), float(cpu), int(nbytes)
        gib = nbytes / 2**30
        f.write(f"| {label} | {step} | {seen[(label, step)]} | {wall:.1f} | {nbytes / wall / 1e6:.0f} | {cpu / gib:.2f} | {rss} |\n")
    f.write("\nMedians over the rounds: encrypted against unencrypted (target: throughput >= 0.9x, "
            "CPU added <= 0.2 CPU-s/GiB).\n\n"
            "| image | step | MB/s unencrypted | MB/s encrypted | ratio | CPU-s/GiB unencrypted | CPU-s/GiB encrypted | added |\n|---|---|---|---|---|---|---|---|\n")
    labels = sorted({r[0] for r in rows})
    for label in labels:
        for step in ("backup", "restore"):
            def med(kind, col):
                vals = [(float(r[5]) / float(r[2]) / 1e6) if col == "mbs" else (float(r[3]) / (int(r[5]) / 2**30))
                        for r in rows if r[0] == label and r[1] == f"{kind} {step}"]
                return statistics.median(vals)
            p, e = med("plain", "mbs"), med("encrypted", "mbs")
            pc, ec = med("plain", "cpu"), med("encrypted", "cpu")
            f.write(f"| {label} | {step} | {p:.0f} | {e:.0f} | {e / p:.2f}x | {pc:.2f} | {ec:.2f} | {ec - pc:+.2f} |\n")
    times = [l.split() for l in open(unlock) if l.split() and l.split()[0] in ("plain", "encrypted")]
    cpu = {k: statistics.median(float(t[1]) + float(t[2]) for t in times if t[0] == k) for k in ("plain", "encrypted")}
    f.write(f"\nUnlocking, once per command: `ferry list` takes {cpu['encrypted']:.2f} CPU-s encrypted, "
            f"{cpu['plain']:.2f} unencrypted (median of 5): {cpu['encrypted'] - cpu['plain']:+.2f} CPU-s "
            f"per command, {(cpu['encrypted'] - cpu['plain']) / (int(rows[0][5]) / 2**30):+.3f} "
            f"CPU-s/GiB of a {size} backup (included in the figures above).\n")
print(open(out).read())
PY
