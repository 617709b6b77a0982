#!/usr/bin/env bash
# The GPU check in one command (see DEVELOPERS.md): build fastdiff._C if it lacks CUDA kernels, run the CUDA
# tests, measure, and write benchmarks/results/gpu_<device-name>.json. Arguments go to python -m fastdiff.gpu_check
# (--dry-run runs the measuring code on the CPU at tiny sizes; --budget-s, --out, --no-tests, --no-pipelines).
#
# Wheels in .whl/ (a git-ignored folder, or FASTDIFF_WHEELS; DEVELOPERS.md says how to fill it) are installed
# first, without an index or their dependencies, into a folder put first on PYTHONPATH: the way to bring
# diffusers to a machine that has torch but no network. FASTDIFF_WHEEL_SITE names that folder (default
# ${TMPDIR:-/tmp}/fastdiff-site).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
shopt -s nullglob
wheels=("${FASTDIFF_WHEELS:-.whl}"/*.whl)
if ((${#wheels[@]})); then
  site="${FASTDIFF_WHEEL_SITE:-${TMPDIR:-/tmp}/fastdiff-site}"
  echo "wheels: installing ${#wheels[@]} from ${FASTDIFF_WHEELS:-.whl}/ into $site (--no-index --no-deps): ${wheels[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" -m fastdiff.gpu_check "$@"
