#!/usr/bin/env bash
# The GPU checks of bench/README.md, unattended, in well under 8 minutes on one large GPU:
#   1. a 7B-shaped Llama (Llama-2-7B / ELYZA shapes) in 4-bit, cutoff 1024, micro-batch 4
#   2. bf16 LoRA of a 1.5B-shaped Qwen2 (Qwen2.5-1.5B shapes), cutoff 1024, micro-batch 4
# Random weights, no download. Each prints one `gpu_check {...}` JSON line: peak VRAM next to
# `jalora estimate`, tokens/s, and the dtypes attention computes in during a training step.
# Without a GPU, `bench/gpu_check.sh --tiny True` runs the same code on tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import torch, transformers, peft, bitsandbytes, accelerate" \
  || { echo "gpu_check: torch, transformers, peft, bitsandbytes and accelerate must be installed" >&2; exit 1; }
"$PYTHON" -c "import torch; print('gpu_check: device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
timeout 300 "$PYTHON" bench/gpu_check.py --model_config bench/model_configs/elyza-llama2-7b \
  --quantization 4bit --cutoff_len 1024 --micro_batch_size 4 "$@"
timeout 180 "$PYTHON" bench/gpu_check.py --model_config bench/model_configs/qwen2.5-1.5b-instruct \
  --quantization none --cutoff_len 1024 --micro_batch_size 4 "$@"
