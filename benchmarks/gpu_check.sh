#!/usr/bin/env bash
# The prepared GPU run, for a machine with PyTorch + CUDA and no package index (under 8 minutes
# on one H100/H200-class GPU). First, on a machine with an index: bash benchmarks/gpu_prepare.sh
# (wheels into .whl/, which travels with the run). Then here:
#
#   bash benchmarks/gpu_check.sh
#
# 1. installs .whl/ into /tmp/site (ahead of the machine's packages, nothing else touched);
# 2. runs the gpu-marked tests;
# 3. runs benchmarks/gpu_check.py: the bandwidth roofline, estimation peak memory on a random
#    LLaMA-shaped model in bf16, Table III rows in torch fp16 for LLaMA-7B-shaped random weights
#    (dense, 5.26B, 3.12B). Results: benchmarks/results/gpu/ (and $OUT when set), device named.
# 4. runs benchmarks/gpu_large_model.py: a random-weight LLaMA-7B built there through the real CLI
#    (compress with the defaults and a short recovery, export, eval) with the allocator capped at
#    24 GiB, every stage's time and peak, and Table III rows beside the paper's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p benchmarks/results/gpu
rc=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee benchmarks/results/gpu/gpu_tests.log || rc=1
"$PY" benchmarks/gpu_check.py --out benchmarks/results/gpu || rc=1
# LLaMA-7B through compress / export / eval with the card capped at 24 GiB (an RTX 3090's memory)
[ -d .whl/data ] && { "$PY" benchmarks/gpu_large_model.py --data-dir .whl/data --out benchmarks/results/gpu || rc=1; }
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu/* "$OUT"/ 2>/dev/null; fi
exit $rc
