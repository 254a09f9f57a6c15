"""Generate with a trained adapter: `python generate.py --lora_weights OUT --prompt ...` (see jalora/generation.py)."""

from jalora.cli import run_quietly
from jalora.generation import main

if __name__ == "__main__":
    run_quietly(main)
