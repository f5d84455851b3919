#!/usr/bin/env bash
# Installs what is missing (scripts/install.sh) unless .venv already holds this checkout's dependencies:
# a stamp named after pyproject.toml's hash, written after a successful install. Sourced by run.sh / test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || ! .venv/bin/python -c "import agent, core" >/dev/null 2>&1; then
  bash scripts/install.sh
  rm -f .venv/.installed-*
  touch "$stamp"
fi
