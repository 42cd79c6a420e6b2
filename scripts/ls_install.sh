#!/usr/bin/env bash
# Installs Label Studio 1.23.2 into its own venv (.venv-ls); it would downgrade redis/rq in .venv.
# Idempotent: a second run only checks the stamp file. Prints the venv path.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.23.2
VENV=${LS_VENV:-.venv-ls}
stamp="$VENV/.installed-label-studio"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$VERSION" ] && [ -x "$VENV/bin/label-studio" ]; then
    echo "$VENV"
    exit 0
fi
echo "ls_install: installing label-studio==$VERSION into $VENV (about 100 s, 1 GB)" >&2
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
log="$VENV/install.log"
if ! { "$VENV/bin/pip" install -U pip && "$VENV/bin/pip" install "label-studio==$VERSION"; } >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "ls_install: failed; full log in $log" >&2
    exit 1
fi
echo "$VERSION" > "$stamp"
echo "$VENV"
