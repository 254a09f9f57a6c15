"""`jalora export --format gguf`: the merged model (or the adapter alone) as a GGUF for llama.cpp,
Ollama and LM Studio, with the training prompt as its chat template and an Ollama Modelfile beside it.

The adapter is merged into the 16-bit base, never into a 4-bit one (re-rounding to 4 bits can erase
a weak adapter), also when the run trained in 4-bit. Tensors are renamed with gguf's own name maps
and written with its writer; the layout changes llama.cpp's kernels need (rotary rows of Llama q/k,
the fused GPT-NeoX qkv, Gemma's RMSNorm weights stored as 1 + w) are done here because
transformers' layout is what we hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from jalora.data.prompts import Prompter, load_template
from jalora.errors import UserError, friendly_errors
from jalora.export.gguf_vocab import gguf_file_vocab, hf_vocab
from jalora.export.merge import merged_model
from jalora.export.ollama import MODELFILE, jinja_chat_template, modelfile
from jalora.model.loading import load_config, load_tokenizer, resolve_source
from jalora.outputs import read_run_record, reported_write_failures, write_atomic
from jalora.presets import Preset, get_preset
from jalora.quiet import quiet_third_party
from jalora.run_lock import locks_output, refuse_if_locked

OUTTYPES = ("f16", "q8_0")


@dataclass(frozen=True)
class Architecture:
    """How one transformers model_type maps onto a llama.cpp architecture."""

    gguf_arch: str
    rope_rows_interleaved: bool = False  # Llama: llama.cpp rotates adjacent pairs, HF rotates halves
    fused_qkv_per_head: bool = False  # GPT-NeoX: HF interleaves q,k,v per head; llama.cpp wants q|k|v
    norms_plus_one: bool = False  # Gemma: HF's RMSNorm computes x * (1 + w); llama.cpp multiplies by w
    # Gemma: the period of sliding-window layers llama.cpp assumes when the GGUF names no pattern, and
    # the depth of the "27B" size whose attention llama.cpp scales by hidden/heads instead of head_dim
    sliding_period: int | None = None
    scale_by_hidden_at_depth: int | None = None
    space_prefix: bool = True  # Gemma's SentencePiece adds no dummy "▁" before the text
    trim_padded_vocab: bool = False  # Gemma 3 (4B+) pads its embedding past the vocabulary


GEMMA = {"norms_plus_one": True, "space_prefix": False, "trim_padded_vocab": True}
ARCHITECTURES = {
    "llama": Architecture("LLAMA", rope_rows_interleaved=True),
    "qwen2": Architecture("QWEN2"),
    "gpt_neox": Architecture("GPTNEOX", fused_qkv_per_head=True),
    "gemma3_text": Architecture("GEMMA3", sliding_period=6, scale_by_hidden_at_depth=62, **GEMMA),
    "gemma2": Architecture("GEMMA2", sliding_period=2, scale_by_hidden_at_depth=46, **GEMMA),
}
UNSUPPORTED_PRESETS = {
    "rinna": "llama.cpp's SentencePiece tokenizer applies neither rinna's NFKC normalisation nor its <NL> "
    "newlines, so the GGUF would read other tokens than training did; use `jalora merge` and a transformers server",
}
UNSUPPORTED_MODEL_TYPES = {
    "gemma3": "this Gemma 3 checkpoint has a vision tower (Gemma3ForConditionalGeneration); exporting its text "
    "tower is not supported yet: use `jalora merge` and a transformers server",
}


# ------------------------------------------------------------------ layout changes
def interleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (or LoRA B) for llama.cpp's Llama rope.

    transformers rotates dimension i with i + head_dim/2 inside each head; llama.cpp's Llama kernel
    rotates 2i with 2i+1. Interleaving the two halves of every head makes both compute the same.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def split_fused_qkv(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-NeoX's fused qkv rows go head by head (q, k, v of head 0, then head 1, ...); llama.cpp
    reads all q rows first, then all k, then all v."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 3, rows // n_head // 3, *weight.shape[1:]).swapaxes(0, 1).reshape(weight.shape)


def to_llama_cpp_layout(name: str, weight: torch.Tensor, arch: Architecture, config) -> torch.Tensor:
    """The tensor as llama.cpp expects it; `name` is the transformers parameter name."""
    if arch.rope_rows_interleaved and name.endswith(("q_proj.weight", "q_proj.bias")):
        return interleave_rope_rows(weight, config.num_attention_heads)
    if arch.rope_rows_interleaved and name.endswith(("k_proj.weight", "k_proj.bias")):
        return interleave_rope_rows(weight, config.num_key_value_heads)
    if arch.fused_qkv_per_head and ".query_key_value." in name:
        return split_fused_qkv(weight, config.num_attention_heads)
    if arch.norms_plus_one and name.endswith("norm.weight"):  # LoRA never adapts a norm: adapters keep theirs
        return weight + 1
    return weight


# ------------------------------------------------------------------ writing
def tensor_data(weight: torch.Tensor, outtype: str):
    """(array, raw dtype) as stored: norms and biases in f32 (as llama.cpp keeps them), matrices in
    f16, or in q8_0 where a row splits into whole 32-value blocks."""
    import gguf

    data = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    if data.ndim < 2:
        return data, None
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def gguf_name(name_map, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise UserError(f"tensor {hf_name} has no llama.cpp counterpart in gguf's name map; cannot export it")
    return found


def rope_of(config, layer_type: str = "full_attention") -> dict:
    """The rope parameters of one kind of layer (Gemma 3 keeps one set per layer type, others one)."""
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    return rope.get(layer_type, rope)


def write_hyperparameters(writer, config, arch: Architecture, n_tokens: int) -> None:
    """The architecture keys llama.cpp reads for Llama, Qwen2, GPT-NeoX, Gemma 3 and Gemma 2."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = rope_of(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(min(config.vocab_size, n_tokens))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} is not exported yet; only default and linear rope are")
    if config.model_type == "gpt_neox":  # partial rotary, parallel residual, LayerNorm with bias
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_parallel_residual(bool(config.use_parallel_residual))
        writer.add_layer_norm_eps(config.layer_norm_eps)
    else:
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)  # Gemma's head_dim is not hidden / heads
        writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch.sliding_period:
        write_gemma_attention(writer, config, arch)


def sliding_layers(config) -> list[bool]:
    return [kind == "sliding_attention" for kind in getattr(config, "layer_types", None) or []]


def write_gemma_attention(writer, config, arch: Architecture) -> None:
    """Sliding windows (size, which layers, their own rope base) and soft-caps; llama.cpp fixes the
    attention scale itself, so a config whose query_pre_attn_scalar it would not use is refused."""
    head_dim, n_layers = config.head_dim, config.num_hidden_layers
    llama_cpp_scalar = config.hidden_size / config.num_attention_heads
    if n_layers != arch.scale_by_hidden_at_depth:
        llama_cpp_scalar = head_dim
    if config.query_pre_attn_scalar != llama_cpp_scalar:
        raise UserError(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar} in the config: llama.cpp scales this model's "
            f"attention by 1/sqrt({llama_cpp_scalar:g}) and cannot be told otherwise; export is refused"
        )
    sliding = sliding_layers(config)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if arch.gguf_arch == "GEMMA2" and not (any(sliding) and softcap):
        raise UserError(
            "llama.cpp runs every Gemma 2 with sliding windows and attention soft-capping; "
            "this config lacks one of them, so its GGUF would compute other logits"
        )
    if any(sliding):
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base_swa(float(rope_of(config, "sliding_attention")["rope_theta"]))
        period = arch.sliding_period
        if sliding != [i % period < period - 1 for i in range(n_layers)]:  # not the layout llama.cpp assumes
            writer.add_sliding_window_pattern(sliding)
    if softcap:
        writer.add_attn_logit_softcapping(float(softcap))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def write_tokenizer(writer, tokenizer, prompter: Prompter, vocab, chat_template: str) -> None:
    """Vocabulary, special ids (eos = the family's end of turn, as in training), BOS rule, template."""
    vocab.add_to(writer)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    ids["unk"] = tokenizer.unk_token_id
    if tokenizer.eos_token == prompter.preset.eos_token:  # eos is the family's end of turn, as eot for llama.cpp
        ids["eot"] = tokenizer.eos_token_id
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(prompter.add_bos))
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)


def write_gguf(path: Path, fill) -> None:
    """Write through gguf's writer into a temporary file beside `path`, then rename: a failed or
    interrupted export leaves no half-written GGUF behind."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    writer = fill(partial, gguf)
    tensor_bytes = sum(info.nbytes for shard in writer.tensors for info in shard.values())
    try:
        with reported_write_failures(path, lambda: tensor_bytes, lambda: partial.unlink(missing_ok=True)):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def new_writer(path, gguf, arch: Architecture, kind: str):
    """gguf's writer for one file; tensors spill to a temporary file as they are added, so a 7B
    export holds the model once in memory, not twice."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]], use_temp_file=True)
    writer.add_type(kind)
    return writer


def model_writer(path, gguf, model, arch: Architecture, outtype: str, name: str, tokenizer_parts: tuple):
    """The merged model: hyperparameters, tokenizer, every tensor under llama.cpp's name."""
    config = model.config
    writer = new_writer(path, gguf, arch, gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    n_tokens = len(tokenizer_parts[2].tokens)
    write_hyperparameters(writer, config, arch, n_tokens)
    write_tokenizer(writer, *tokenizer_parts)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, weight in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if arch.trim_padded_vocab and hf_name.endswith("embed_tokens.weight"):
            weight = weight[:n_tokens]  # llama.cpp wants one row per token
        data, raw_dtype = tensor_data(to_llama_cpp_layout(hf_name, weight, arch, config), outtype)
        writer.add_tensor(gguf_name(name_map, hf_name), data, raw_dtype=raw_dtype)
    return writer


def adapter_tensors(lora_weights: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA A/B matrices by transformers parameter name, and the adapter config."""
    from safetensors.torch import load_file

    folder = Path(lora_weights)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{folder}: DoRA or per-layer ranks cannot be expressed as a llama.cpp LoRA; export merged")
    tensors = {}
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        if "trainable_tokens_delta" in key:
            raise UserError(
                f"{folder}: the adapter trains the turn tokens' embedding rows (a base checkpoint's, see "
                "`trainable_tokens` in jalora.json), which a llama.cpp LoRA cannot hold; export merged "
                "(without --adapter_only)"
            )
        if ".lora_A." not in key and ".lora_B." not in key:
            raise UserError(f"{folder}: {key} is not a LoRA matrix; llama.cpp adapters hold LoRA A/B only")
        tensors[key.removeprefix("base_model.model.")] = value
    return tensors, config


def adapter_writer(path, gguf, lora_weights: str, config, arch: Architecture, outtype: str):
    """A llama.cpp LoRA adapter: `<tensor>.lora_a` (r x in) and `<tensor>.lora_b` (out x r) per
    adapted matrix; llama.cpp scales B·A by alpha / r, so rsLoRA's alpha / sqrt(r) is folded into alpha."""
    tensors, lora = adapter_tensors(lora_weights)
    writer = new_writer(path, gguf, arch, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    alpha = float(lora["lora_alpha"]) * (float(lora["r"]) ** 0.5 if lora.get("use_rslora") else 1.0)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    for key, value in sorted(tensors.items()):
        which = "lora_a" if ".lora_A." in key else "lora_b"
        hf_name = key.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        if which == "lora_b":  # A acts on the input side, whose order llama.cpp keeps
            value = to_llama_cpp_layout(hf_name, value, arch, config)
        data, raw_dtype = tensor_data(value, outtype)
        writer.add_tensor(f"{gguf_name(name_map, hf_name)}.{which}", data, raw_dtype=raw_dtype)
    return writer


# ------------------------------------------------------------------ the command
def architecture_of(config, preset: Preset) -> Architecture:
    if preset.name in UNSUPPORTED_PRESETS:
        raise UserError(f"preset {preset.name!r} cannot be exported to GGUF: {UNSUPPORTED_PRESETS[preset.name]}")
    if config.model_type in UNSUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type {config.model_type!r}: {UNSUPPORTED_MODEL_TYPES[config.model_type]}")
    if config.model_type not in ARCHITECTURES:
        raise UserError(
            f"model_type {config.model_type!r} is not an architecture jalora exports for llama.cpp "
            f"(exported: {', '.join(ARCHITECTURES)}); use `jalora merge` for a transformers model instead"
        )
    return ARCHITECTURES[config.model_type]


def gguf_base_config(source):
    """The config of a GGUF base, or a one-line error when transformers cannot dequantise it (then the
    adapter must be merged into the original checkpoint, which this command can do from its folder)."""
    try:
        return load_config(source)
    except ValueError as err:
        raise UserError(
            f"{source.gguf_file}: transformers cannot read this GGUF base ({err}); export from the original "
            "safetensors checkpoint instead: jalora export --base_model <its hub id or folder> --lora_weights ..."
        ) from None


def tokenizer_folder(base_model: str, source) -> Path:
    """Where the base tokenizer's files are: the local folder, or the hub cache (tokenizer files only)."""
    if Path(source.path).is_dir():
        return Path(source.path)
    from huggingface_hub import snapshot_download

    patterns = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(base_model, allow_patterns=patterns))
    except Exception as err:  # network, auth or missing repo: one line naming the model
        raise UserError(f"cannot fetch the tokenizer files of {base_model!r}: {err}") from None


def end_of_turn_strings(tokenizer, generation_eos) -> list[str]:
    """The tokenizer's eos and every eos id of the model's generation config, as text."""
    ids = generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos is not None else []
    stops = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(i) for i in ids]
    return list(dict.fromkeys(s for s in stops if s))


@friendly_errors
@locks_output("output_dir")
def export(
    lora_weights: str,
    output_dir: str = "./gguf",
    format: str = "gguf",
    outtype: str = "f16",
    adapter_only: bool = False,
    base_model: str | None = None,
    verbose: bool = False,
) -> str:
    """Write the merged model as one GGUF (tokenizer, chat template = the training prompt) and an
    Ollama Modelfile into --output_dir. --outtype f16 or q8_0. --adapter_only writes a llama.cpp LoRA
    GGUF (`llama-cli -m BASE.gguf --lora ADAPTER.gguf`) instead. Returns the path of the GGUF.
    --verbose shows the libraries' warnings and log lines."""
    quiet_third_party(verbose)
    if format != "gguf":
        raise UserError(f"unknown --format {format!r}; jalora exports gguf (for a transformers model: jalora merge)")
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    refuse_if_locked(lora_weights, "--lora_weights")
    record = read_run_record(lora_weights)
    base_model = base_model or record["base_model"]
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{output_dir}: output folder exists and is not empty; choose another --output_dir")
    preset = get_preset(record["preset"])
    source = resolve_source(base_model)
    config = gguf_base_config(source) if source.gguf_file else load_config(source)
    arch = architecture_of(config, preset)
    name = Path(lora_weights).resolve().name

    if adapter_only:
        path = out / f"{name}-lora-{outtype}.gguf"
        write_gguf(path, lambda p, gguf: adapter_writer(p, gguf, lora_weights, config, arch, outtype))
        print(f"wrote the LoRA adapter to {path}; run it on the base GGUF: llama-cli -m BASE.gguf --lora {path}")
        return str(path)

    tokenizer = load_tokenizer(source, preset)
    template = load_template(record.get("template") or preset.template)
    prompter = Prompter(template, tokenizer, preset, record.get("system_prompt"))
    if source.gguf_file:
        vocab = gguf_file_vocab(Path(source.path) / source.gguf_file)
    else:
        vocab = hf_vocab(tokenizer, tokenizer_folder(base_model, source))
    if not arch.space_prefix:
        vocab = replace(vocab, add_space_prefix=False)
    chat_template = tokenizer.chat_template if template.use_chat_template else jinja_chat_template(prompter)
    if record.get("quantization", "none") != "none":
        print(f"the run trained on a {record['quantization']} base: merging into its 16-bit weights instead")
    if source.gguf_file:
        print(f"the base is the GGUF {source.gguf_file}: merging into its weights as transformers dequantises them")
    # never the 4-bit weights: float16, or float32 for a GGUF base (transformers' path to dequantise it)
    model = merged_model(base_model, lora_weights, "none", torch.float32 if source.gguf_file else torch.float16)
    path = out / f"{name}-{outtype}.gguf"
    parts = (tokenizer, prompter, vocab, chat_template)
    write_gguf(path, lambda p, gguf: model_writer(p, gguf, model, arch, outtype, name, parts))
    stops = end_of_turn_strings(tokenizer, model.generation_config.eos_token_id)
    write_atomic(out / MODELFILE, modelfile(prompter, path.name, stops).encode("utf-8"))
    print(f"wrote {path} and {out / MODELFILE}")
    print(f"  ollama create {name} -f {out / MODELFILE}   |   llama-cli -m {path} -cnv")
    return str(path)
