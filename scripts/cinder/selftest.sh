#!/usr/bin/env bash
# Round-trip self-check of scripts/cinder/harness.py against a live S3 endpoint,
# using only Cinder's own driver code for both directions:
#   full backup with every compression name -> restore -> cmp,
#   then an incremental chain (full -> inc1 -> inc2) -> chain restore -> cmp
#   (also with volume_is_new, i.e. Cinder's sparse restore of the base).
#
# Environment (same as harness.py): FERRY_TEST_S3_ENDPOINT, FERRY_TEST_S3_BUCKET,
#   FERRY_TEST_S3_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
# Optional:
#   FERRY_CINDER_PY                python with cinder (default: output of setup.sh)
#   FERRY_CINDER_SELFTEST_MIB      image size in MiB (default 1024)
#   FERRY_CINDER_SELFTEST_COMPRESSIONS  (default "zlib gzip bz2 bzip2 zstd none")
#   FERRY_CINDER_SELFTEST_OBJECT_SIZE   backup_s3_object_size (default Cinder's 52428800)
#   FERRY_CINDER_KEEP=1            keep the backups in the bucket (default: deleted
#                                  at the end with Cinder's delete_backup)
#   TMPDIR                         where the images go (needs ~4x image size free)
# Exit status: 0 all round trips byte-identical, 1 mismatch/failure.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for v in FERRY_TEST_S3_ENDPOINT FERRY_TEST_S3_BUCKET AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
    [ -n "${!v:-}" ] || { echo "selftest: $v is not set" >&2; exit 2; }
done

PY="${FERRY_CINDER_PY:-}"
[ -n "$PY" ] || PY="$("$HERE/setup.sh" | tail -n1)"
H=("$PY" "$HERE/harness.py")
MIB="${FERRY_CINDER_SELFTEST_MIB:-1024}"
COMPS="${FERRY_CINDER_SELFTEST_COMPRESSIONS:-zlib gzip bz2 bzip2 zstd none}"
OBJSZ="${FERRY_CINDER_SELFTEST_OBJECT_SIZE:-52428800}"
OBJARGS=(--object-size "$OBJSZ")

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ferry-cinder-selftest.XXXXXX")"
CREATED=()
cleanup() {
    local rc=$?
    if [ -z "${FERRY_CINDER_KEEP:-}" ]; then
        for b in "${CREATED[@]:-}"; do
            [ -n "$b" ] && "${H[@]}" delete --backup-id "$b" --volume-id "$VOL" >/dev/null 2>>"$WORK/log" || true
        done
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

textgen() { yes "$1" 2>/dev/null | head -c "$2" || true; }  # SIGPIPE-safe under pipefail
uuid() { "$PY" -c 'import uuid; print(uuid.uuid4())'; }
now() { date +%s.%N; }
secs() { "$PY" -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$(now)"; }
jget() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
FAIL=0
check() { # label a b
    if cmp -s "$2" "$3"; then echo "  OK   $1"; else echo "  FAIL $1: $(cmp "$2" "$3" 2>&1 | head -1)"; FAIL=1; fi
}

VOL="$(uuid)"
IMG="$WORK/image"
echo "selftest: work dir $WORK, image ${MIB} MiB, volume $VOL, object size $OBJSZ"
t=$(now)
# Mixed image: quarters of random / repeated text / zeros / 1 MiB random+zero stripes.
Q=$(( MIB / 4 )); [ "$Q" -ge 1 ] || Q=1
{
    head -c "$(( Q * 1048576 ))" /dev/urandom
    textgen "ferry cinder selftest: the quick brown fox jumps over the lazy dog 0123456789" "$(( Q * 1048576 ))"
    head -c "$(( Q * 1048576 ))" /dev/zero
} > "$IMG"
REST=$(( MIB - 3 * Q )); i=0
while [ "$i" -lt "$REST" ]; do
    if [ $(( i % 2 )) -eq 0 ]; then head -c 1048576 /dev/urandom; else head -c 1048576 /dev/zero; fi
    i=$(( i + 1 ))
done >> "$IMG"
echo "selftest: image generated ($(stat -c %s "$IMG") bytes) in $(secs "$t")s"

SUMMARY=()
restore_into() { # backup-id target [extra args...]
    local bid="$1" tgt="$2"; shift 2
    rm -f "$tgt"; truncate -s "$(stat -c %s "$IMG")" "$tgt"
    "${H[@]}" restore --backup-id "$bid" --volume-id "$(uuid)" --src-volume-id "$VOL" --target "$tgt" "$@" \
        > "$WORK/restore.json" 2>>"$WORK/log"
}

for c in $COMPS; do
    bid="$(uuid)"
    t=$(now)
    if ! "${H[@]}" backup --image "$IMG" --backup-id "$bid" --volume-id "$VOL" --compression "$c" "${OBJARGS[@]}" \
            > "$WORK/full-$c.json" 2>>"$WORK/log"; then
        echo "  FAIL backup $c (see below)"; tail -20 "$WORK/log"; exit 1
    fi
    CREATED+=("$bid")
    tb=$(secs "$t")
    t=$(now)
    restore_into "$bid" "$WORK/restored" || { echo "  FAIL restore $c"; tail -20 "$WORK/log"; exit 1; }
    tr=$(secs "$t")
    check "full $c: backup ${tb}s, restore ${tr}s, objects $(jget "$WORK/full-$c.json" object_count) $(jget "$WORK/full-$c.json" object_compressions)" "$IMG" "$WORK/restored"
    SUMMARY+=("full/$c backup=${tb}s restore=${tr}s")
    if [ -z "${BASE:-}" ] || [ "$c" = zlib ]; then BASE="$bid"; BASECOMP="$c"; fi
done

# ---- incremental chain ---------------------------------------------------
SIZE=$(stat -c %s "$IMG")
M=1048576
# inc1: 3 MiB random at an unaligned offset inside the random quarter, 1 MiB of
# the text quarter turned into zeros (data->zero), 2 MiB of text written into zeros.
head -c $(( 3 * M )) /dev/urandom | dd of="$IMG" bs=$M seek=$(( Q * M / 3 + 12345 )) oflag=seek_bytes iflag=fullblock conv=notrunc status=none
head -c $M /dev/zero | dd of="$IMG" bs=$M seek=$(( Q + Q / 2 )) conv=notrunc status=none
textgen "incremental change" $(( 2 * M )) | dd of="$IMG" bs=$M seek=$(( 2 * Q + 1 )) conv=notrunc status=none
INC1="$(uuid)"; t=$(now)
"${H[@]}" backup --image "$IMG" --backup-id "$INC1" --volume-id "$VOL" --parent-id "$BASE" --compression zstd "${OBJARGS[@]}" \
    > "$WORK/inc1.json" 2>>"$WORK/log" || { echo "  FAIL incremental 1"; tail -20 "$WORK/log"; exit 1; }
CREATED+=("$INC1"); ti1=$(secs "$t")
cp "$IMG" "$WORK/image-inc1"
# inc2: last byte of the volume, and the very first block.
printf 'Z' | dd of="$IMG" bs=1 seek=$(( SIZE - 1 )) conv=notrunc status=none
printf 'first block changed' | dd of="$IMG" bs=1 seek=7 conv=notrunc status=none
INC2="$(uuid)"; t=$(now)
"${H[@]}" backup --image "$IMG" --backup-id "$INC2" --volume-id "$VOL" --parent-id "$INC1" --compression bz2 "${OBJARGS[@]}" \
    > "$WORK/inc2.json" 2>>"$WORK/log" || { echo "  FAIL incremental 2"; tail -20 "$WORK/log"; exit 1; }
CREATED+=("$INC2"); ti2=$(secs "$t")

t=$(now)
restore_into "$INC2" "$WORK/restored" --chain "$BASE,$INC1,$INC2" || { echo "  FAIL chain restore"; tail -20 "$WORK/log"; exit 1; }
trc=$(secs "$t")
check "incremental chain $BASECOMP->zstd->bz2: inc1 ${ti1}s ($(jget "$WORK/inc1.json" object_count) objects), inc2 ${ti2}s ($(jget "$WORK/inc2.json" object_count) objects), chain restore ${trc}s" "$IMG" "$WORK/restored"
t=$(now)
restore_into "$INC2" "$WORK/restored" --volume-is-new || { echo "  FAIL chain restore (new volume)"; tail -20 "$WORK/log"; exit 1; }
check "incremental chain restore, volume_is_new (sparse base), parent links from _metadata: $(secs "$t")s" "$IMG" "$WORK/restored"
restore_into "$INC1" "$WORK/restored" || { echo "  FAIL restore of inc1"; tail -20 "$WORK/log"; exit 1; }
check "restore of the middle of the chain (inc1)" "$WORK/image-inc1" "$WORK/restored"
SUMMARY+=("inc1 backup=${ti1}s inc2 backup=${ti2}s chain-restore=${trc}s")

echo "selftest: timings: ${SUMMARY[*]}"
if [ "$FAIL" -ne 0 ]; then
    echo "selftest: FAILED (harness log: kept below)"; tail -40 "$WORK/log"; exit 1
fi
echo "selftest: all round trips byte-identical"
