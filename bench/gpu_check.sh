#!/usr/bin/env bash
# GPU check (bench/gpu_check.py): the embedded default's extract + 20 training steps on CUDA and on
# CPU, speed-ups and peak GPU memory. Self-contained: sets the project up first when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import pipeline, torch, transformers" 2>/dev/null; then
  make setup
  PY=.venv/bin/python
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
exec timeout 300 "$PY" bench/gpu_check.py "$@"
