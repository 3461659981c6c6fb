#!/usr/bin/env bash
# The GPU benchmark in one command (issue 16, item 3): the device and the package versions,
# then bench/gpu_step.py (a Llama-3.2-1B-shaped teacher -> a Qwen2.5-0.5B-shaped student, bf16,
# KD step / student step / teacher forward: tokens/s, peak memory, MFU) under `timeout 280`.
#
#   bash bench/gpu.sh                      # defaults: micro-batch 2 x 4096 tokens, 2 + 5 steps
#   bash bench/gpu.sh --micro-batch 1      # any other arguments go to gpu_step.py
#   PYTHON=/path/to/python bash bench/gpu.sh
#
# Python: $PYTHON, else .venv/bin/python when there is one, else python3. The repository is put
# on PYTHONPATH, so distill_llm needs no install. A GPU image without megatron-core / ModelOpt
# can be given their wheels in .whl/ (ignored by git): they are installed to /tmp/site first.
# Writes runs/bench/gpu_step.json (copied to $OUT too when that is set). Exits non-zero when
# there is no GPU or the benchmark fails or runs over 280 s (exit 124).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import megatron.core, modelopt" 2>/dev/null && [ -d .whl ]; then
  echo "== installing .whl/*.whl to /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

echo "== nvidia-smi -L"
if ! nvidia-smi -L; then
  echo "gpu.sh: no GPU (nvidia-smi -L failed); on a CPU run: $PY bench/gpu_step.py --cpu-smoke" >&2
  exit 1
fi

echo "== versions"
"$PY" bench/gpu_step.py --versions

echo "== bench/gpu_step.py $*"
rc=0
timeout 280 "$PY" bench/gpu_step.py "$@" || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "gpu.sh: bench/gpu_step.py failed with exit $rc (124: over the 280 s limit)" >&2
  exit "$rc"
fi
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ -f runs/bench/gpu_step.json ]; then
  cp runs/bench/gpu_step.json "$OUT/"
fi
