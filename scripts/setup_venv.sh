#!/usr/bin/env bash
# Creates (or updates) the project environment in .venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -r requirements.txt
# sam2 ships as an sdist; without build isolation it reuses the installed torch instead of downloading another.
SAM2_BUILD_CUDA=0 .venv/bin/pip install -q --no-build-isolation sam2==1.1.0
.venv/bin/pip install -q -r requirements-test.txt
echo "$want" > "$stamp"
