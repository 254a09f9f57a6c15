#!/usr/bin/env bash
# The GPU checks of bench/README.md, unattended, in well under 8 minutes on one large GPU:
#   1. a 7B-shaped Llama (Llama-2-7B / ELYZA shapes) in 4-bit, cutoff 1024, micro-batch 4
#   2. bf16 LoRA of a 1.5B-shaped Qwen2 (Qwen2.5-1.5B shapes), cutoff 1024, micro-batch 4
#   3. with 2+ GPUs: the 7B-shaped Llama in 4-bit sharded by FSDP2 over 2 GPUs (configs/accelerate/
#      fsdp2_qlora.yaml) through finetune.py, 5 steps; it checks that the adapter is written
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

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 2 ]; then
  echo "gpu_check: 2-GPU FSDP-QLoRA step skipped: $GPUS GPU(s) visible"
  exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_check import random_model_dir
random_model_dir("bench/model_configs/elyza-llama2-7b", Path(sys.argv[1]) / "model", tiny=False)
PY
timeout 600 "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/fsdp2_qlora.yaml \
  --num_processes 2 finetune.py --base_model "$WORK/model" --quantization 4bit --cutoff_len 1024 \
  --micro_batch_size 1 --batch_size 2 --max_steps 5 --val_set_size 0 --logging_steps 1 --output_dir "$WORK/out"
test -s "$WORK/out/adapter_model.safetensors" || { echo "gpu_check: FSDP-QLoRA wrote no adapter" >&2; exit 1; }
echo "gpu_check: 2-GPU FSDP2-QLoRA step done, adapter written"
