"""Fine-tune a LoRA adapter: `python finetune.py --base_model ... --data_path ...` (see jalora/train/finetune.py)."""

from jalora.cli import run_quietly
from jalora.train.finetune import finetune

if __name__ == "__main__":
    run_quietly(finetune)
