"""`jalora <command>`, finetune.py and generate.py: flags checked first, the command imported after.

Each command is named by its module and function, not imported here: the flags are read from the
function's source (jalora/flags.py), so a wrong command name, an unknown flag or a bad value stops
with one `error:` line (exit 2) before torch or transformers are imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping

from jalora.errors import UserError
from jalora.flags import (
    Flag,
    check_required,
    closest,
    flags_in_source,
    flags_of,
    flags_table,
    parse_args,
    read_recipe,
    usage,
)
from jalora.presets import presets_table

RECIPE_FLAG = "config"  # finetune's recipe file
RECIPE_COMMANDS = ("finetune",)


def presets() -> None:
    """Print the model families jalora knows, with their LoRA targets, templates and tokens."""
    print(presets_table())


class Commands(Mapping):
    """Command name → function, imported on first use (the modules import torch)."""

    def __init__(self, places: dict[str, str]):
        self.places = places

    def __getitem__(self, name: str) -> Callable:
        module, _, function = self.places[name].partition(":")
        return getattr(importlib.import_module(module), function)

    def __contains__(self, name: object) -> bool:
        return name in self.places  # Mapping's own would import the command

    def __iter__(self):
        return iter(self.places)

    def __len__(self) -> int:
        return len(self.places)

    def flags(self, name: str) -> dict[str, Flag]:
        module, _, function = self.places[name].partition(":")
        return flags_in_source(importlib.util.find_spec(module).origin, function)


COMMANDS = Commands(
    {
        "finetune": "jalora.train.finetune:finetune",
        "generate": "jalora.generate.command:main",
        "evaluate": "jalora.evaluate.heldout:evaluate",
        "merge": "jalora.export.merge:merge",
        "export": "jalora.export.gguf:export",
        "presets": "jalora.cli:presets",
        "estimate": "jalora.evaluate.memory:estimate",
        "inspect": "jalora.train.inspect:inspect",
        "ui": "jalora.generate.ui:ui",
    }
)


def all_flags() -> dict[str, dict[str, Flag]]:
    """Every command's flags, for docs/flags.md."""
    return {f"jalora {name}": COMMANDS.flags(name) for name in COMMANDS}


def command_values(program: str, flags: dict[str, Flag], argv: list[str], recipes: bool) -> dict:
    """The checked flags of one call: the recipe file's (with --config), then the command line's."""
    extra = (RECIPE_FLAG,) if recipes else ()
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage(program, flags, extra))
        raise SystemExit(0)
    values = parse_args(flags, argv, extra)
    recipe = values.pop(RECIPE_FLAG, None)
    if recipe is not None:
        values = read_recipe(recipe, flags) | values
    check_required(flags, values)
    return values


def run(program: str, flags: dict[str, Flag], load: Callable[[], Callable], argv: list[str], recipes: bool) -> None:
    """Check the flags, then import and run the command (its return value is not printed: the
    commands print what they have to say)."""
    try:
        values = command_values(program, flags, argv, recipes)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    load()(**values)


def run_command(name: str, argv: list[str] | None = None, program: str | None = None) -> None:
    """One command of COMMANDS, as finetune.py and generate.py run theirs."""
    argv = sys.argv[1:] if argv is None else argv
    run(program or f"jalora {name}", COMMANDS.flags(name), lambda: COMMANDS[name], argv, name in RECIPE_COMMANDS)


def run_quietly(fn: Callable) -> None:
    """A function already imported (`python -m jalora.demo`) as a command, with the same checks."""
    run(f"python -m {fn.__module__}", flags_of(fn), lambda: fn, sys.argv[1:], recipes=False)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jalora COMMAND [--flag value ...]   (jalora COMMAND --help for its flags)")
        print(f"commands: {', '.join(COMMANDS)}")
        raise SystemExit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"error: unknown command {name!r}{closest(name, COMMANDS)}; commands: {known}", file=sys.stderr)
        raise SystemExit(2)
    run_command(name, argv[1:])


if __name__ == "__main__":  # `python -m jalora.cli > docs/flags.md`: the flag table, from the signatures
    print(flags_table(all_flags()), end="")
