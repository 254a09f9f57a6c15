"""Fine-tune a LoRA adapter: `python finetune.py --base_model ... --data_path ...` (see jalora/train/finetune.py).

`--config RECIPE.yaml` reads the flags from a file (configs/recipes/); flags typed here override it.
"""

from jalora.cli import run_command

if __name__ == "__main__":
    run_command("finetune", program="python finetune.py")
