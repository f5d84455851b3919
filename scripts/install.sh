#!/usr/bin/env bash
# One-command install: a virtual environment in .venv with a CPU torch when none is present.
# A machine that already has torch (e.g. a CUDA build in the interpreter used) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # No torch yet: take the CPU build first, so the package's range does not pull CUDA wheels.
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
echo "installed: $(.venv/bin/anomaly-agent --version)"
