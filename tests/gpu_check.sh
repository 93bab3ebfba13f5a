#!/usr/bin/env bash
# The checks only a GPU can make, in one go, meant to take under 8 minutes on one H100/H200: NCA data speed on the
# GPU, the small preset's training with and without compile (tokens/s, MFU, peak memory, time to the first update,
# the loss of a short run), a resume, the estimated time of the main job, HumanEval sampling time. Writes one JSON.
#   bash tests/gpu_check.sh [--out=gpu_check.json] [--dry_run]
# --dry_run: tiny shapes on any device (the CPU in CI, about a minute): proves the script runs, measures nothing.
# PYTHON: the interpreter to run it with (default: python, e.g. from the project's venv, activated).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
exec "${PYTHON:-python}" tests/gpu_check.py "$@"
