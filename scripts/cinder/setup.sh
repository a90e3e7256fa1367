#!/usr/bin/env bash
# Create (idempotently) a virtualenv holding the real OpenStack Cinder 29.0.0
# plus its S3 backup driver runtime (boto3), for scripts/cinder/harness.py.
#
#   scripts/cinder/setup.sh            # venv at ${FERRY_CINDER_VENV:-$HOME/.cache/ferry/cinder-venv}
#   FERRY_CINDER_VENV=/some/dir scripts/cinder/setup.sh
#   FERRY_CINDER_PYTHON=python3.12 scripts/cinder/setup.sh   # interpreter (default python3, needs >= 3.11)
#   FERRY_CINDER_NO_CONSTRAINTS=1 ...  # resolve freshly instead of using constraints.txt
#
# Only PyPI access is needed (pip's normal index, honouring PIP_INDEX_URL etc.).
# Prints the venv's python path on the last line of stdout.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${FERRY_CINDER_VENV:-$HOME/.cache/ferry/cinder-venv}"
PY="${FERRY_CINDER_PYTHON:-python3}"
CINDER_VERSION=29.0.0
START=$(date +%s.%N)

elapsed() { python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$START" "$(date +%s.%N)" 2>/dev/null || echo '?'; }

have_cinder() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$CINDER_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
assert version("cinder") == sys.argv[1], version("cinder")
import boto3, zstd  # noqa: F401  (S3 driver + zstd compression runtime)
import cinder.backup.drivers.s3 as s3
assert s3.boto3 is not None, "cinder's S3 driver could not import boto3/botocore"
PYEOF
}

if have_cinder; then
    echo "setup.sh: cinder $CINDER_VERSION already present in $VENV (checked in $(elapsed)s)" >&2
    echo "$VENV/bin/python"
    exit 0
fi

command -v "$PY" >/dev/null || { echo "setup.sh: $PY not found" >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "setup.sh: cinder $CINDER_VERSION needs Python >= 3.11 ($PY is $("$PY" -V 2>&1))" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    echo "setup.sh: creating virtualenv $VENV with $("$PY" -V 2>&1)" >&2
    if ! "$PY" -m venv "$VENV" >&2; then
        # Debian/Ubuntu without python3-venv (no ensurepip): fall back to the
        # PyPI 'virtualenv' package, installed for the user.
        rm -rf "$VENV"
        echo "setup.sh: 'python3 -m venv' failed; trying PyPI virtualenv" >&2
        "$PY" -m pip --version >/dev/null 2>&1 || {
            echo "setup.sh: neither venv/ensurepip nor pip is available for $PY;" \
                 "install python3-venv (Debian/Ubuntu) or python3-pip" >&2; exit 1; }
        "$PY" -m pip install --user --quiet virtualenv >&2 ||
            "$PY" -m pip install --user --quiet --break-system-packages virtualenv >&2
        "$PY" -m virtualenv "$VENV" >&2
    fi
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip >&2 || true
CONSTRAINTS=()
if [ -z "${FERRY_CINDER_NO_CONSTRAINTS:-}" ] && [ -f "$HERE/constraints.txt" ]; then
    CONSTRAINTS=(-c "$HERE/constraints.txt")
fi
echo "setup.sh: pip install cinder[s3]==$CINDER_VERSION ${CONSTRAINTS[*]:-} (this takes a minute or two)" >&2
"${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" "cinder[s3]==$CINDER_VERSION" boto3 zstd >&2

have_cinder || { echo "setup.sh: cinder $CINDER_VERSION installed but the S3 driver does not import" >&2; exit 1; }
echo "setup.sh: cinder $CINDER_VERSION ready in $VENV (took $(elapsed)s)" >&2
echo "$VENV/bin/python"
