#!/usr/bin/env bash
# Installs Debian's chromium for the browser check (tests/e2e/test_browser.py), which drives it with the
# playwright Python package (no browser download). Idempotent: does nothing when /usr/bin/chromium exists.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
echo "ls_install_chromium: apt-get install chromium (about 40 s)" >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >&2
