#!/usr/bin/env bash
# Installs the third-party clients the compat tests drive, unmodified:
# centrifuge-js (npm, pinned by tests/compat/package-lock.json), cent and
# centrifuge-python (PyPI, pinned by tests/compat/requirements.txt) in a
# virtualenv under target/. Idempotent: does nothing when they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d tests/compat/node_modules/centrifuge ]; then
  npm ci --prefix tests/compat --no-audit --no-fund --loglevel=error
fi
if [ ! -x target/compat-venv/bin/python ] || ! target/compat-venv/bin/python -c "import cent, centrifuge" 2>/dev/null; then
  python3 -m venv target/compat-venv
  target/compat-venv/bin/pip install --quiet --disable-pip-version-check -r tests/compat/requirements.txt
fi
