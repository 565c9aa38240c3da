#!/usr/bin/env bash
# GPU check, under 5 minutes once set up: (1) bench/gpu_check.py: the embedded default's extract + 20
# training steps on CUDA and on CPU, speed-ups, peak GPU memory, throughput; (2) closed VQA ranking at
# VQAv2's 3,129 answers x 32 questions on the GPU (and a 50 x 8 case checked against the unchunked
# ranking); (3) one sharded Sinkhorn step at the paper's B = 2,048, K = 49,152 over 2 ranks on the GPU(s)
# against the gathered solve. Self-contained: sets the project up first when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import pipeline, torch, transformers" 2>/dev/null; then
  make setup
  PY=.venv/bin/python
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
timeout 180 "$PY" bench/gpu_check.py "$@"
timeout 60 "$PY" bench/vqa_closed.py --device cuda --compare 50x8
timeout 45 "$PY" bench/sinkhorn_sharded.py --device cuda --ranks 2 --gathered-ranks 2
