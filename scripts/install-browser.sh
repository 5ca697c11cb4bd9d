#!/usr/bin/env bash
# Chromium for the gateway's browser test, from Debian's packages. Needs root (or sudo) and apt-get;
# elsewhere the browser test skips and says why.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
command -v apt-get >/dev/null 2>&1 || { echo "apt-get not available" >&2; exit 1; }
SUDO=""
if [ "$(id -u)" != 0 ]; then command -v sudo >/dev/null 2>&1 && SUDO="sudo -n" || exit 1; fi
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
