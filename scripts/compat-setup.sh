#!/usr/bin/env bash
# Installs the third-party clients the compat tests drive, unmodified:
# centrifuge-js and puppeteer-core (npm, pinned by
# tests/compat/package-lock.json), Chromium (apt, as root), cent and
# centrifuge-python (PyPI, pinned by tests/compat/requirements.txt) in a
# virtualenv under target/. Idempotent: does nothing when they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium for centrifuge-js's browser bundle (driven by
# puppeteer-core from npm): Debian's package.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/compat-setup.sh: chromium is missing (apt-get install chromium)" >&2
    exit 1
  fi
fi
if [ ! -d tests/compat/node_modules/centrifuge ] || [ ! -d tests/compat/node_modules/puppeteer-core ]; then
  npm ci --prefix tests/compat --no-audit --no-fund --loglevel=error
fi
if [ ! -x target/compat-venv/bin/python ] || ! target/compat-venv/bin/python -c "import cent, centrifuge" 2>/dev/null; then
  python3 -m venv target/compat-venv
  target/compat-venv/bin/pip install --quiet --disable-pip-version-check -r tests/compat/requirements.txt
fi
