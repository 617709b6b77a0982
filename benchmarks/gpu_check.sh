#!/usr/bin/env bash
# The GPU check in one command (see DEVELOPERS.md): build fastdiff._C if it lacks CUDA kernels, run the CUDA
# tests, measure, and write benchmarks/results/gpu_<device-name>.json. Arguments go to python -m fastdiff.gpu_check
# (--dry-run runs the measuring code on the CPU at tiny sizes; --budget-s, --out, --no-tests, --no-pipelines).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m fastdiff.gpu_check "$@"
