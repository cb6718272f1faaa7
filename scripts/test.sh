#!/usr/bin/env bash
# The test command (README): the whole suite, Ray/gRPC/Prometheus/Helm tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1
exec python -m pytest -q -ra "$@"
