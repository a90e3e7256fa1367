#!/usr/bin/env bash
# What opening an encrypted repository costs with a key file against a passphrase (issue 15):
# every command unwraps the master secret first, a passphrase key with Argon2id (64 MiB, 3
# passes), a key-file key with one BLAKE3 call. Two local repositories, one per kind, each with
# one small backup; `ferry list` on each, alternately, ROUNDS times, under /usr/bin/time -v:
# median wall time, CPU-s (user + sys) and peak RSS per command. Appends the table to
# perf/results/key-file-<date>.md.
#
#   perf/key-file.sh [ROUNDS]   (default 10)
#   FERRY_BIN: the ferry binary (default target/release/ferry)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
ferry=${FERRY_BIN:-target/release/ferry}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-key-file-perf.XXXXXX")
trap 'rm -rf "$work"' EXIT
head -c $((4 << 20)) /dev/urandom > "$work/a.img"
"$ferry" key generate-file "$work/k" > /dev/null
pass="perf-key-file-$RANDOM-$RANDOM"
FERRY_PASSPHRASE=$pass "$ferry" --repo "$work/pass" init --encrypt > /dev/null
FERRY_PASSPHRASE=$pass "$ferry" --repo "$work/pass" backup --source "$work/a.img" > /dev/null
"$ferry" --repo "$work/file" --key-file "$work/k" init --encrypt > /dev/null
"$ferry" --repo "$work/file" --key-file "$work/k" backup --source "$work/a.img" > /dev/null
rows="$work/rows.tsv"
: > "$rows"
measure() {
  local label=$1; shift
  /usr/bin/time -v -o "$work/time" "$@" > /dev/null 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
  python3 - "$work/time" "$label" >> "$rows" <<'PY'
import sys
t = open(sys.argv[1]).read().splitlines()
get = lambda key: [l.split(': ', 1)[1] for l in t if key in l][0]
wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(get('Elapsed (wall clock)').split(':'))))
cpu = float(get('User time (seconds)')) + float(get('System time (seconds)'))
print(f"{sys.argv[2]}\t{wall:.3f}\t{cpu:.3f}\t{int(get('Maximum resident set size')) // 1024}")
PY
}
for _ in $(seq 1 "$rounds"); do
  FERRY_PASSPHRASE=$pass measure passphrase "$ferry" --repo "$work/pass" list
  measure key-file "$ferry" --repo "$work/file" --key-file "$work/k" list
done
out=perf/results/key-file-$(date -u +%F).md
python3 - "$rows" "$rounds" "$(git rev-parse --short HEAD)" "$(nproc)" >> "$out" <<'PY'
import statistics, sys, datetime
rows = [l.split('\t') for l in open(sys.argv[1]).read().splitlines()]
by = {}
for label, wall, cpu, rss in rows:
    by.setdefault(label, []).append((float(wall), float(cpu), int(rss)))
now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')
print(f"\n## {now}: commit {sys.argv[3]}, {sys.argv[4]} CPUs\n")
print(f"Command: `perf/key-file.sh {sys.argv[2]}`: `ferry list` on a local encrypted repository "
      "(one 4 MiB backup) opened by a passphrase key and by a key-file key, alternately; "
      "medians over the rounds.\n")
print("| opened with | rounds | wall s | CPU-s | peak RSS MiB |")
print("|---|---|---|---|---|")
med = {}
for label in ("passphrase", "key-file"):
    runs = by[label]
    med[label] = [statistics.median(r[i] for r in runs) for i in range(3)]
    wall, cpu, rss = med[label]
    # /usr/bin/time resolves 0.01 s: below that, say so rather than print a zero.
    show = lambda s: f"{s:.2f}" if s >= 0.01 else "<0.01"
    print(f"| {label} | {len(runs)} | {show(wall)} | {show(cpu)} | {rss:.0f} |")
p, k = med["passphrase"], med["key-file"]
ratio = lambda a, b: f"{a / b:.2f}x" if a >= 0.01 else f"<{0.01 / b:.2f}x"
print(f"\nKey file against passphrase, per command: wall {ratio(k[0], p[0])}, "
      f"CPU {ratio(k[1], p[1])}, peak RSS {k[2] / p[2]:.2f}x (/usr/bin/time resolves 0.01 s).")
PY
tail -12 "$out"
