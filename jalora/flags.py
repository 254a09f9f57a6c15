"""Every command's flags, read from its function signature and checked before any work.

One mechanism for every entry point (finetune.py, generate.py, `jalora <command>`, recipe files):
a flag is a parameter of the command's function; its annotation says the type, RULES (keyed by
flag name, so one name means one thing everywhere) says the range, choices or list shape. A new
parameter is a new flag with no code here; a range or choice for it is one RULES entry.

The signature is read from the source with `ast` rather than by importing the command, because
the command modules import torch and transformers (~10 s): a misspelled flag is refused in well
under a second, before anything heavy is imported. fire is not used: it passes unknown flags to
whatever the function returned (after the work) and answers mistakes with a usage dump.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, make_dataclass
from functools import cache
from pathlib import Path

from jalora.data.stages import STAGES
from jalora.errors import UserError
from jalora.model.preflight import QUANTIZATIONS

NoneType = type(None)
TRUE_FALSE = {"true": True, "false": False}
# what a value of each type is called in an error
KIND_WORDS = {
    bool: "True or False",
    int: "a whole number",
    float: "a number",
    list: "a comma-separated list",
    str: "text",
}


@dataclass(frozen=True)
class Range:
    """Numbers from `low` (and up to `high`); `also` are single extra values with a meaning (-1)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    text: str = ""

    def accepts(self, value) -> bool:
        if value in self.also:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def describe(self, whole: bool) -> str:
        if self.text:
            return self.text
        noun = "a whole number" if whole else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '≥'} {self.low:g}"
        return noun


@dataclass(frozen=True)
class Choices:
    options: tuple[str, ...]


@dataclass(frozen=True)
class Names:
    """A list of names (module names): each non-empty, without spaces."""

    def bad(self, items: list[str]) -> str | None:
        return next((item for item in items if not item or re.search(r"\s", item)), None)


WHOLE_AT_LEAST_1 = Range(1)
# the rules, by flag name: a flag with the same name means the same thing in every command
RULES: dict[str, Range | Choices | Names] = {
    "batch_size": WHOLE_AT_LEAST_1,
    "micro_batch_size": WHOLE_AT_LEAST_1,
    "cutoff_len": Range(2),
    "lora_r": WHOLE_AT_LEAST_1,
    "save_steps": WHOLE_AT_LEAST_1,
    "eval_steps": WHOLE_AT_LEAST_1,
    "logging_steps": WHOLE_AT_LEAST_1,
    "warmup_steps": Range(0),
    "seed": Range(0),
    "max_steps": Range(1, also=(-1,), text="-1 (use --num_epochs) or a whole number ≥ 1"),
    "num_epochs": Range(0, low_open=True),
    "learning_rate": Range(0, low_open=True),
    "lora_alpha": Range(0, low_open=True),
    "lora_dropout": Range(0, 1, high_open=True),
    "val_set_size": Range(0, text="a count, or a fraction below 1, ≥ 0"),
    "beta": Range(0, low_open=True),
    "lora_target_modules": Names(),
    "stage": Choices(STAGES),
    "quantization": Choices(QUANTIZATIONS),
    # these five are also the commands' own tuples (tests/test_flags.py keeps them equal); they are
    # written here because the modules that hold them import torch
    "tasks": Choices(("elyza-tasks-100", "jcommonsenseqa")),
    "format": Choices(("gguf",)),
    "outtype": Choices(("f16", "q8_0")),
    "dtype": Choices(("float32", "bfloat16", "float16")),
    "sharding": Choices(("ddp", "fsdp", "zero3")),
    "num_gpus": WHOLE_AT_LEAST_1,
    "max_new_tokens": WHOLE_AT_LEAST_1,
    "num_beams": WHOLE_AT_LEAST_1,
    "temperature": Range(0),
    "top_p": Range(0, 1, low_open=True),
    "top_k": Range(0),
    "repetition_penalty": Range(0, low_open=True),
    "no_repeat_ngram_size": Range(0),
    "prompt_lookup_num_tokens": WHOLE_AT_LEAST_1,
    "num_fewshot": Range(0),
    "show_examples": Range(0),
    "gpu_gb": Range(0, low_open=True),
    "port": Range(1, 65535),
}


@dataclass(frozen=True)
class Flag:
    name: str
    kinds: tuple[type, ...]  # among bool, int, float, list, str, NoneType
    annotation: str
    default: str | None  # the default as written in the source; None: required

    @property
    def required(self) -> bool:
        return self.default is None

    def accepts(self) -> str:
        """What the flag takes, in words (for errors and the flag table)."""
        rule = RULES.get(self.name)
        if isinstance(rule, Choices):
            return ", ".join(rule.options)
        if isinstance(rule, Range):
            return rule.describe(whole=float not in self.kinds)
        words = [KIND_WORDS[k] for k in KIND_WORDS if k in self.kinds]
        if list in self.kinds and str in self.kinds:
            words.remove("text")
            words[words.index("a comma-separated list")] = "a name or a comma-separated list"
        return " or ".join(words)


def annotation_kinds(annotation: str) -> tuple[type, ...]:
    """`int | None`, `list[str] | str | None`, … as the plain types a value may have."""
    names = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "None": None}
    kinds: set[type] = set()
    for part in typing.get_args(hint := eval(annotation, {"__builtins__": {}}, names)) or (hint,):  # noqa: S307
        kinds.add(NoneType if part is None else typing.get_origin(part) or part)
    return tuple(kind for kind in (*KIND_WORDS, NoneType) if kind in kinds) or (str,)


def make_flag(name: str, annotation: str | None, default: str | None) -> Flag:
    return Flag(name, annotation_kinds(annotation) if annotation else (str,), annotation or "str", default)


@cache
def flags_in_source(path: str, function: str) -> dict[str, Flag]:
    """The flags of `function` in the Python file `path`, read from its signature without importing it."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    args = node.args.args
    defaults = [None] * (len(args) - len(node.args.defaults)) + [ast.unparse(d) for d in node.args.defaults]
    return {
        a.arg: make_flag(a.arg, ast.unparse(a.annotation) if a.annotation else None, default)
        for a, default in zip(args, defaults)
    }


def flags_of(fn: Callable) -> dict[str, Flag]:
    """The flags of an imported command function (its decorators unwrapped)."""
    import inspect

    fn = inspect.unwrap(fn)
    return flags_in_source(inspect.getsourcefile(fn), fn.__name__)


# --- values -------------------------------------------------------------------------------


def closest(name: str, names, prefix: str = "") -> str:
    """` (did you mean X?)` for the nearest valid name, or nothing when none is near."""
    near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{near[0]}?)" if near else ""


def split_list(text: str) -> list[str]:
    """`a,b`, `[a, b]` or `["a", "b"]` as a list of names."""
    return [part.strip().strip("'\"") for part in text.strip().strip("[]").split(",") if part.strip()]


def from_text(flag: Flag, text: str, label: str, where: str = ""):
    """The value of a flag typed on the command line (or a string in a recipe file)."""
    kinds = flag.kinds
    if NoneType in kinds and text == "None":
        return None
    if bool in kinds and text.lower() in TRUE_FALSE:
        return TRUE_FALSE[text.lower()]
    if (int in kinds or float in kinds) and re.fullmatch(r"[+-]?\d+", text.strip()):
        return check_value(flag, int(text), label, where)
    if float in kinds:
        try:
            return check_value(flag, float(text), label, where)
        except ValueError:
            pass
    if list in kinds and (str not in kinds or "," in text or text.strip().startswith("[")):
        return check_value(flag, split_list(text), label, where)
    if str in kinds:
        return check_value(flag, text, label, where)
    raise UserError(f"{where}{label} must be {flag.accepts()}, got {text!r}")


def typed(flag: Flag, value):
    """`value` if it has one of the flag's types (a whole number is a number: `--val_set_size 3`
    is a count), else raise ValueError."""
    kinds = flag.kinds
    if value is None and NoneType in kinds:
        return None
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int):
        if int in kinds or float in kinds:
            return value
    elif isinstance(value, float):
        if float in kinds and math.isfinite(value):
            return value
    elif isinstance(value, str):
        if str in kinds:
            return value
    elif isinstance(value, (list, tuple)) and list in kinds and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(value)


def check_value(flag: Flag, value, label: str, where: str = ""):
    """The value, typed, if the flag accepts it; else a UserError starting with `where` (a file
    and line), naming `label` (`--name`, or the key in a file) and saying what it accepts."""
    try:
        value = typed(flag, value)
    except ValueError:
        raise UserError(f"{where}{label} must be {flag.accepts()}, got {value!r}") from None
    rule = RULES.get(flag.name)
    if value is None or rule is None or isinstance(value, bool):
        return value
    if isinstance(rule, Choices) and value not in rule.options:
        raise UserError(f"{where}unknown {label} {value!r}; choose one of: {', '.join(rule.options)}")
    if isinstance(rule, Range) and isinstance(value, (int, float)) and not rule.accepts(value):
        raise UserError(f"{where}{label} must be {flag.accepts()}, got {value!r}")
    if isinstance(rule, Names) and isinstance(value, (list, str)):
        if not value or rule.bad([value] if isinstance(value, str) else value) is not None:
            raise UserError(f"{where}{label} must be module names separated by commas, got {value!r}")
    return value


def checked_settings(fn: Callable, values: Mapping[str, object]):
    """The command's settings (a frozen dataclass, one field per flag) from a call's arguments,
    each checked as on the command line: Python callers get the same errors as the shell."""
    flags = flags_of(fn)
    cls = settings_class(fn)
    return cls(**{name: check_value(flags[name], values[name], f"--{name}") for name in flags})


@cache
def settings_class(fn: Callable) -> type:
    """A frozen dataclass with the command's flags as fields, typed as its signature types them."""
    import inspect

    fn = inspect.unwrap(fn)
    fields = [(name, flag.annotation) for name, flag in flags_of(fn).items()]
    name = "".join(part.title() for part in fn.__name__.split("_")) + "Settings"
    return make_dataclass(name, fields, frozen=True, namespace={"as_dict": asdict})


# --- the command line ------------------------------------------------------------------------


def parse_args(flags: dict[str, Flag], argv: list[str], extra: tuple[str, ...] = ()) -> dict:
    """`--name value`, `--name=value`, `--flag` (True), `--noflag` (False) and positional values,
    each converted and checked; `extra` names options handled by the caller (`--config`)."""
    given: dict = {}
    positional: list[str] = []
    known = [*flags, *extra]
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("-") or re.fullmatch(r"-[\d.]+", token):
            positional.append(token)
            continue
        if not token.startswith("--"):
            raise UserError(f"unknown flag {token}; flags are written --name value")
        name, has_value, text = token[2:].partition("=")
        flag = flags.get(name)
        if name in extra:
            flag = make_flag(name, "str", "None")
        elif flag is None and name.startswith("no") and bool in getattr(flags.get(name[2:]), "kinds", ()):
            name, flag, has_value, text = name[2:], flags[name[2:]], "=", "False"
        if flag is None:
            raise UserError(f"unknown flag --{name}{closest(name, known, prefix='--')}")
        if name in given:
            raise UserError(f"--{name} is given twice")
        if not has_value:
            following = argv[i] if i < len(argv) else None
            takes_text = any(kind in flag.kinds for kind in (str, int, float, list))
            if (
                following is not None
                and not following.startswith("--")
                and (takes_text or following.lower() in TRUE_FALSE)
            ):
                text, i = following, i + 1
            elif bool in flag.kinds:
                text = "True"
            else:
                raise UserError(f"--{name} needs a value ({flag.accepts()})")
        given[name] = text
    free = [name for name, flag in flags.items() if flag.required and name not in given]
    if len(positional) > len(free):
        raise UserError(f"unexpected argument {positional[len(free)]!r}; flags are written --name value")
    given.update(zip(free, positional))
    return {name: text if name in extra else from_text(flags[name], text, f"--{name}") for name, text in given.items()}


def check_required(flags: dict[str, Flag], values: Mapping) -> None:
    missing = [f"--{name}" for name, flag in flags.items() if flag.required and name not in values]
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def usage(command: str, flags: dict[str, Flag], extra: tuple[str, ...] = ()) -> str:
    """`--help`: every flag, what it accepts and its default (as the source writes it)."""
    lines = [f"usage: {command} [--flag value ...]"]
    width = max((len(name) for name in [*flags, *extra]), default=0) + 2
    for name in extra:
        lines.append(f"  --{name:<{width}} a recipe file (.yaml or .json); flags typed here override it")
    for name, flag in flags.items():
        default = "required" if flag.required else f"default {flag.default}"
        lines.append(f"  --{name:<{width}} {flag.accepts()} ({default})")
    return "\n".join(lines)


# --- recipe files -----------------------------------------------------------------------------


def read_recipe(path: str, flags: dict[str, Flag]) -> dict:
    """The flags a recipe file (.yaml, .yml or .json) sets, each checked like a command-line flag;
    errors name the file, the line and the key. A run record (jalora.json) works too: its
    `flags` are the flags the run was made with."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    values, lines = (read_yaml if file.suffix.lower() in (".yaml", ".yml") else read_json)(path, text)
    checked = {}
    for key, value in values.items():
        where = f"{path}:{lines.get(key, 1)}: "
        flag = flags.get(key)
        if flag is None:
            raise UserError(f"{where}unknown key {key}{closest(key, flags)}")
        check = from_text if isinstance(value, str) else check_value
        checked[key] = check(flag, value, key, where)
    return checked


def read_yaml(path: str, text: str) -> tuple[dict, dict[str, int]]:
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a recipe is a mapping of flag: value")
    return values, {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def read_json(path: str, text: str) -> tuple[dict, dict[str, int]]:
    """JSON keeps no line numbers, so a key's line is where `"key":` first appears in the text
    (after `"flags":` in a run record)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a recipe is an object of flag: value")
    start = 0
    if isinstance(values.get("flags"), dict) and "jalora_version" in values:
        values, start = values["flags"], text.find('"flags"')
    lines = {}
    for key in values:
        found = re.compile(rf"{re.escape(json.dumps(key))}\s*:").search(text, start)
        lines[key] = text.count("\n", 0, found.start()) + 1 if found else 1
    return values, lines


# --- the flag table (docs/flags.md) -------------------------------------------------------------


def flags_table(commands: Mapping[str, dict[str, Flag]]) -> str:
    """docs/flags.md: every command's flags (tests/test_flags.py checks the file is current)."""
    out = [
        "# Every command's flags",
        "",
        "Generated from the commands' signatures and `jalora/flags.py` RULES by `python -m jalora.cli`;",
        "`tests/test_flags.py` fails when this file is out of date. Flags are written `--name value` or",
        "`--name=value`; a True/False flag alone means True. An unknown flag or a bad value stops the command",
        "before any work with one `error:` line (exit 2). One name means one thing in every command:",
        "`--output_file` is a file the command writes, `--output_dir` a folder, `--data_path` the records a",
        "command reads. `python finetune.py` takes the flags of `jalora finetune`, `python generate.py` those of",
        "`jalora generate`. Defaults are shown as the source writes them.",
        "",
    ]
    for command, flags in commands.items():
        out += [f"## {command}", "", "| flag | accepts | default |", "|---|---|---|"]
        if command.endswith("finetune"):
            out.append("| `--config` | a recipe file (.yaml, .json, a run's jalora.json); typed flags win | |")
        for name, flag in flags.items():
            default = "required" if flag.required else f"`{flag.default}`"
            out.append(f"| `--{name}` | {flag.accepts().replace('|', '/')} | {default} |")
        out.append("")
    return "\n".join(out)
