#!/usr/bin/env bash
# The GPU checks of issue 25 in one run (benchmarks/device_check.py says what each part measures): flow throughput
# fp32/bf16, a paper-schedule MTD-200 trial, the quickstart sweep with four trials sharing one GPU; one JSON.
#   bash benchmarks/device_check.sh [--tiny] [--out device_check.json] [--parts flow trial sweep]
# Runs with .venv/bin/python when the repository has one, else python3 (a GPU image with torch; parts whose
# packages or data are missing are recorded as skipped). Budget on one GPU: under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; fi
PYTHONUNBUFFERED=1 exec "$python" -m benchmarks.device_check "$@"
