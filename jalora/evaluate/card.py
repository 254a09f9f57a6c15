"""The model card (README.md) of an adapter folder, rendered from its run record alone.

Everything in the card comes from jalora.json, so `jalora evaluate` can add its results to
the record and redraw the card without the training run. peft's own README stub is replaced.
"""

from __future__ import annotations

from pathlib import Path

from jalora.data.prompts import load_template
from jalora.evaluate.plots import LOSS_PLOT
from jalora.model.loading import EMBEDDED
from jalora.outputs import write_atomic

CARD = "README.md"
EXAMPLE_INSTRUCTION = "日本の首都はどこですか？"
QUANT_CONFIGS = {
    "8bit": "BitsAndBytesConfig(load_in_8bit=True)",
    "4bit": (
        'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
        "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)"
    ),
}


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None or value == "":
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_hub_id(base_model: str) -> bool:
    return base_model.count("/") == 1 and not Path(base_model).exists() and not base_model.endswith(".gguf")


def _front_matter(record: dict, library: str = "peft") -> str:
    base = record.get("base_model", "")
    lines = ["---", f"library_name: {library}", "language:", "- ja", "tags:", "- jalora", "- lora"]
    if _is_hub_id(base):
        lines.append(f"base_model: {base}")
    return "\n".join([*lines, "---", ""])


def _load_base_code(record: dict) -> str:
    """Python lines that load the base exactly as training did (GGUF file, bitsandbytes config)."""
    base = record.get("base_model", "")
    quant = QUANT_CONFIGS.get(record.get("quantization", "none"))
    extra = f", quantization_config={quant}" if quant else ""
    if base in EMBEDDED:
        package, gguf, assembled = EMBEDDED[base]
        if assembled:
            return (
                f"import {package}\n"
                f"gguf = {package}.assemble()\n"
                f"base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name{extra})"
            )
        return (
            "import importlib.util\n"
            f'base_dir = importlib.util.find_spec("{package}").submodule_search_locations[0]\n'
            f'base = AutoModelForCausalLM.from_pretrained(base_dir, gguf_file="{gguf}"{extra})'
        )
    if base.endswith(".gguf"):
        path = Path(base)
        return f'base = AutoModelForCausalLM.from_pretrained("{path.parent}", gguf_file="{path.name}"{extra})'
    return f'base = AutoModelForCausalLM.from_pretrained("{base}"{extra})'


def _prompt_section(record: dict) -> str:
    name = record.get("template")
    if not name:
        return "Render prompts with the template the adapter was trained with."
    template = load_template(name)
    system = record.get("system_prompt") or ""
    if template.use_chat_template:
        return (
            "Prompts use the tokenizer's chat template: "
            "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`"
            + (f", with the system message `{system}`." if system else ".")
        )
    example = template.prompt_no_input.format(instruction=EXAMPLE_INSTRUCTION, input="", system=system)
    return f"Prompts use the template `{name}`; an instruction without input reads:\n\n```text\n{example}\n```"


def _usage(record: dict, folder: str) -> str:
    quant = record.get("quantization", "none")
    imports = "import torch\n" if quant in QUANT_CONFIGS else ""
    imports += "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer"
    if quant in QUANT_CONFIGS:
        imports = imports.replace("AutoTokenizer", "AutoTokenizer, BitsAndBytesConfig")
    return f"""## How to use

With jalora (the prompt format, system prompt and eos come from `jalora.json`):

```bash
jalora generate --lora_weights {folder} --prompt "{EXAMPLE_INSTRUCTION}"
jalora merge --lora_weights {folder} --output_dir {folder}-merged   # full model, no peft needed
```

With plain peft and transformers:

```python
{imports}

{_load_base_code(record)}
model = PeftModel.from_pretrained(base, "{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")  # pad/eos as in training
```

{_prompt_section(record)}
"""


def _settings(record: dict) -> str:
    lora = record.get("lora", {})
    hyper = record.get("hyperparameters", {})
    rows = [(f"lora_{k}", ", ".join(v) if isinstance(v, list) else v) for k, v in lora.items()]
    rows += list(hyper.items())
    rows += [(k, record[k]) for k in ("cutoff_len", "train_on_inputs", "add_eos_token") if k in record]
    return "## Hyper-parameters\n\n" + _table(rows, ("setting", "value"))


def _data(record: dict) -> str:
    data = record.get("data")
    if not data:
        return ""
    rows = [(k, data.get(k)) for k in ("path", "val_path", "fingerprint", "train_examples", "val_examples")]
    rows += [(f"records {k}", data[k]) for k in ("truncated", "dropped") if k in data]
    return "## Data\n\n" + _table(rows, ("", "value"))


def _losses(record: dict, has_plot: bool) -> str:
    metrics = record.get("metrics", {})
    names = {
        "train_loss": "train loss (mean over the run)",
        "eval_loss_before": "held-out loss before training",
        "eval_loss": "held-out loss after training",
        "eval_perplexity_before": "held-out perplexity before training",
        "eval_perplexity": "held-out perplexity after training",
        "eval_reward_accuracy_before": "held-out reward accuracy before training",
        "eval_reward_accuracy": "held-out reward accuracy after training",
        "eval_reward_margin_before": "held-out reward margin before training",
        "eval_reward_margin": "held-out reward margin after training",
        "eval_logp_margin_before": "held-out log p(chosen) − log p(rejected) before training",
        "eval_logp_margin": "held-out log p(chosen) − log p(rejected) after training",
        "steps": "optimizer steps",
    }
    rows = [(label, metrics[key]) for key, label in names.items() if key in metrics]
    if not rows and not has_plot:
        return ""
    text = "## Losses\n\n" + (_table(rows, ("", "value")) if rows else "")
    return text + (f"\n\n![train and eval loss]({LOSS_PLOT})" if has_plot else "")


def score_rows(scores: dict[str, dict]) -> tuple[tuple, list[tuple]]:
    """Header and rows of evaluation scores ({"adapter": ..., "base": ...}): one row per
    category after "overall", with loss and perplexity for each model."""
    models = list(scores)
    header = ("category", "examples", "tokens", *[f"{m} {q}" for m in models for q in ("loss", "ppl")])
    rows = []
    for name in ["overall", *scores[models[0]]["by_category"]]:
        groups = [s["overall"] if name == "overall" else s["by_category"][name] for s in scores.values()]
        values = [v for g in groups for v in (g["loss"], g["perplexity"])]
        rows.append((name, groups[0]["examples"], groups[0]["tokens"], *values))
    return header, rows


def _evaluations(record: dict) -> str:
    evaluations = record.get("evaluations", {})
    if not evaluations:
        return ""
    parts = ["## Evaluation (`jalora evaluate`)", "Loss: mean cross-entropy per answer token; ppl: its exp."]
    for path, result in evaluations.items():
        header, rows = score_rows({m: result[m] for m in ("adapter", "base") if m in result})
        parts.append(f"`{path}` ({result.get('fingerprint', '')})\n\n" + _table(rows, header))
    return "\n\n".join(parts)


def model_card(record: dict, folder: str, has_plot: bool = False) -> str:
    """The card's Markdown for the adapter in `folder` (the path shown in the usage snippets)."""
    base = record.get("base_model", "an unknown base model")
    intro = (
        f"# LoRA adapter for {base}\n\n"
        f"Trained with jalora {record.get('jalora_version', '')} "
        f"(stage `{record.get('stage', 'sft')}`, preset `{record.get('preset', '?')}`, "
        f"base weights in `{record.get('quantization', 'none')}` "
        "during training)."
    )
    sections = [
        _front_matter(record) + intro,
        _usage(record, folder).rstrip(),
        _data(record),
        _settings(record),
        _losses(record, has_plot),
        _evaluations(record),
        "The complete run record (data fingerprint, every setting, loss curves) is `jalora.json`.",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_model_card(out_dir: Path, record: dict) -> None:
    """README.md in the adapter folder, over peft's stub; links loss.png when it exists."""
    text = model_card(record, str(out_dir), has_plot=(out_dir / LOSS_PLOT).is_file())
    write_atomic(out_dir / CARD, text.encode("utf-8"))


def merged_card(record: dict, base_model: str, lora_weights: str | None, quantization: str, folder: str) -> str:
    """README.md of a merged model: where its weights came from and how to prompt it."""
    preset, template = record.get("preset"), record.get("template")
    origin = f"the LoRA adapter `{lora_weights}` merged into `{base_model}`" if lora_weights else f"`{base_model}`"
    note = f" (base dequantised from {quantization} first)" if quantization != "none" else ""
    flags = " ".join(f"--{k} {v}" for k, v in (("preset", preset), ("prompt_template_name", template)) if v)
    title = f"# {Path(folder).name}\n\nFull model: {origin}{note}, by jalora."
    sections = [
        _front_matter({"base_model": base_model}, library="transformers") + title,
        f"""## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```

```bash
jalora generate --base_model {folder} {flags} --prompt "{EXAMPLE_INSTRUCTION}"
```""",
        _prompt_section(record) if template else "",
        _settings(record) if record else "",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
