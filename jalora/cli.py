"""`jalora <command>`: one entry point for every tool in the package."""

from __future__ import annotations

import fire

from jalora.evaluate.heldout import evaluate
from jalora.evaluate.memory import estimate
from jalora.export.gguf import export
from jalora.export.merge import merge
from jalora.generate.command import main as generate
from jalora.generate.ui import ui
from jalora.presets import presets_table
from jalora.train.finetune import finetune
from jalora.train.inspect import inspect


def presets() -> None:
    """Print the model families jalora knows, with their LoRA targets, templates and tokens."""
    print(presets_table())


COMMANDS = {
    "finetune": finetune,
    "generate": generate,
    "evaluate": evaluate,
    "merge": merge,
    "export": export,
    "presets": presets,
    "estimate": estimate,
    "inspect": inspect,
    "ui": ui,
}


def run_quietly(component) -> None:
    """fire.Fire without echoing return values (run records, answers) a second time."""
    fire.Fire(component, serialize=lambda _: None)


def main() -> None:
    fire.Fire(COMMANDS, name="jalora", serialize=lambda _: None)
