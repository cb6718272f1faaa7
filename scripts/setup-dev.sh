#!/usr/bin/env bash
# Create .venv with the pinned CPU torch and every extra (dev, ray, grpc, metrics, bench).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# The exact pin takes the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import osfn_dist, torch, ray, grpc, prometheus_client; print('osfn-dist dev env ready: torch', torch.__version__)"
