#!/usr/bin/env bash
# One command: install what is missing, then run the test suite (arguments go to pytest, e.g. -k opcua).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_installed.sh
exec .venv/bin/python -m pytest -q "$@"
