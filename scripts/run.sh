#!/usr/bin/env bash
# One command: install what is missing, then run the daemon on the shipped config/agent.yaml (folder mode,
# no broker). Arguments go to `anomaly-agent run` (e.g. --mqtt-host, --http-port).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_installed.sh
exec .venv/bin/anomaly-agent run "$@"
