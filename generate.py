"""Generate with a trained adapter: `python generate.py --lora_weights OUT --prompt ...`.

The flags are those of jalora.generate.command.main.
"""

from jalora.cli import run_command

if __name__ == "__main__":
    run_command("generate", program="python generate.py")
