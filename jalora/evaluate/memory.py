"""Predict the peak GPU memory of a LoRA/QLoRA run from the model config alone.

No weights are loaded: parameter counts come from the config's shapes, bytes from the
quantization, activations and logits from the token count of one micro-batch. The figures
are what torch allocates at the peak (`torch.cuda.max_memory_allocated`); the CUDA context
comes on top and is listed separately. Assumes sdpa or flash attention (no T² score matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

from jalora.errors import UserError, friendly_errors
from jalora.model.architectures import text_config, tied_embeddings

GB = 1024**3
CUDA_CONTEXT_GB = 0.5  # driver context, cuBLAS workspace: outside torch's allocator
NF4_BYTES = 0.5 + (1 + 4 / 256) / 64  # 4-bit values + 8-bit absmax per 64 (double quant: fp32 per 256 absmax)
INT8_BYTES = 1.0
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, fp32 grad, AdamW's two fp32 moments
CE_CHUNK = 1024
SUPPORTED = ("llama", "mistral", "qwen2", "gpt_neox", "gemma2", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class Shapes:
    """What memory depends on, read from a config."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    linears: dict[str, tuple[int, int, bool]]  # per layer: name -> (in, out, has bias)
    gated_mlp: bool
    norms_per_layer: int  # norm weights per layer
    frozen_extra: int = 0  # parameters outside the text tower (a vision tower), loaded but never trained


def shapes(config) -> Shapes:
    """The text tower's shapes; a multimodal checkpoint's (Gemma 3 4B+) vision tower counts as frozen weights."""
    kind = config.model_type
    if kind not in SUPPORTED:
        raise UserError(f"jalora estimate knows model types {', '.join(SUPPORTED)}; this config is {kind!r}")
    full, config = config, text_config(config)
    d, inter = config.hidden_size, config.intermediate_size
    if kind == "gpt_neox":
        linears = {
            "query_key_value": (d, 3 * d, True),
            "dense": (d, d, True),
            "dense_h_to_4h": (d, inter, True),
            "dense_4h_to_h": (inter, d, True),
        }
    else:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        qkv_bias = kind == "qwen2" or bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        linears = {
            "q_proj": (d, heads * head_dim, qkv_bias),
            "k_proj": (d, kv * head_dim, qkv_bias),
            "v_proj": (d, kv * head_dim, qkv_bias),
            "o_proj": (heads * head_dim, d, bool(getattr(config, "attention_bias", False))),
            "gate_proj": (d, inter, mlp_bias),
            "up_proj": (d, inter, mlp_bias),
            "down_proj": (inter, d, mlp_bias),
        }
    if kind == "gpt_neox":  # two LayerNorms with biases
        norms = 4 * d
    elif kind.startswith("gemma"):  # four RMSNorms around attention and MLP, Gemma 3 also q_norm and k_norm
        norms = 4 * d + (2 * head_dim if kind != "gemma2" else 0)
    else:
        norms = 2 * d
    return Shapes(
        model_type=kind,
        layers=config.num_hidden_layers,
        hidden=d,
        intermediate=inter,
        vocab=config.vocab_size,
        tied=tied_embeddings(full),
        linears=linears,
        gated_mlp=kind != "gpt_neox",
        norms_per_layer=norms,
        frozen_extra=_vision_parameters(getattr(full, "vision_config", None)),
    )


def _vision_parameters(vision) -> int:
    """A SigLIP tower's parameters: per layer attention (4 d²) and MLP (2 d·inter) weights, plus patch embeddings."""
    if vision is None:
        return 0
    d, inter = vision.hidden_size, vision.intermediate_size
    patches = (vision.image_size // vision.patch_size) ** 2
    per_layer = 4 * d * d + 2 * d * inter
    return vision.num_hidden_layers * per_layer + vision.num_channels * vision.patch_size**2 * d + patches * d


def parameter_counts(s: Shapes) -> dict[str, int]:
    """Parameters in the layers' linear weights (what bitsandbytes quantizes) and all the rest."""
    linear = s.layers * sum(i * o for i, o, _ in s.linears.values())
    biases = s.layers * sum(o for _, o, bias in s.linears.values() if bias)
    final_norm = 2 * s.hidden if s.model_type == "gpt_neox" else s.hidden
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    other = biases + s.layers * s.norms_per_layer + final_norm + embeddings + s.frozen_extra
    return {"linear": linear, "other": other}


def lora_parameters(s: Shapes, targets: list[str] | str, r: int) -> int:
    names = list(s.linears) if targets == "all-linear" else targets
    unknown = [t for t in names if t not in s.linears]
    if unknown:
        raise UserError(
            f"--lora_target_modules {','.join(unknown)} not in this model; "
            f"its linear layers are: {', '.join(s.linears)}"
        )
    return s.layers * sum(r * (s.linears[t][0] + s.linears[t][1]) for t in names)


def activation_bytes_per_token_layer(s: Shapes, dtype_bytes: int) -> float:
    """Tensors autograd keeps per token in one decoder layer: norm inputs/outputs (norms run in
    fp32), the attention's q, k, v, output and rotary copies, projection inputs, and the MLP's
    hidden states (three for a gated MLP: gate, up, their product; two for GELU)."""
    mlp = (3 if s.gated_mlp else 2) * s.intermediate
    return dtype_bytes * (10 * s.hidden + mlp) + 4 * 2 * s.hidden


def estimate_memory(
    config,
    quantization: str = "4bit",
    cutoff_len: int = 512,
    micro_batch_size: int = 4,
    lora_target_modules: list[str] | str = "all-linear",
    lora_r: int = 8,
    gradient_checkpointing: bool | None = None,
    chunked_ce: bool | None = None,
    dtype_bytes: int = 2,
    stage: str = "sft",
) -> dict[str, float]:
    """Peak bytes by component for one training step, worst case (every example cutoff_len long).

    DPO and ORPO run chosen and rejected replies of each pair in one forward pass: twice the
    tokens of an SFT micro-batch. DPO's reference pass (adapter off, no gradients) runs before the
    policy pass and keeps nothing, so it adds no peak; trl's DPO computes log-probs in chunks."""
    s = shapes(config)
    counts = parameter_counts(s)
    checkpointing = quantization != "none" if gradient_checkpointing is None else gradient_checkpointing
    chunked = s.vocab >= 65536 if chunked_ce is None else chunked_ce
    chunked = chunked or stage == "dpo"
    if quantization == "none":
        weights = (counts["linear"] + counts["other"]) * dtype_bytes
    else:
        # peft's prepare_model_for_kbit_training upcasts every non-quantized parameter to fp32
        per_linear = NF4_BYTES if quantization == "4bit" else INT8_BYTES
        weights = counts["linear"] * per_linear + counts["other"] * 4
    lora = lora_parameters(s, lora_target_modules, lora_r) * LORA_BYTES_PER_PARAM
    tokens = micro_batch_size * cutoff_len * (2 if stage in ("dpo", "orpo") else 1)
    per_layer = activation_bytes_per_token_layer(s, dtype_bytes) * tokens
    if checkpointing:  # one input per layer kept, one layer recomputed (with its gradients) at a time
        activations = s.layers * tokens * s.hidden * dtype_bytes + 2 * per_layer
    else:
        activations = s.layers * per_layer
    logit_rows = min(tokens, CE_CHUNK) if chunked else tokens
    head_bytes = 4 if quantization != "none" else dtype_bytes  # k-bit preparation leaves the head in fp32
    logits = logit_rows * s.vocab * (head_bytes + 4 + 4)  # logits, their fp32 copy, fp32 log-softmax / its grad
    if quantization != "none":  # bitsandbytes dequantizes the largest weight to the compute dtype on the fly
        largest = max(i * o for i, o, _ in s.linears.values())
        activations += largest * dtype_bytes
    return {
        "parameters": counts["linear"] + counts["other"],
        "lora_parameters": lora // LORA_BYTES_PER_PARAM,
        "weights": weights,
        "lora_and_optimizer": lora,
        "activations": activations,
        "logits": logits,
        "total": weights + lora + activations + logits,
        "gradient_checkpointing": checkpointing,
        "chunked_ce": chunked,
    }


SHARDINGS = ("ddp", "fsdp", "zero3")


def decoder_block_bytes(s: Shapes, linear_bytes: float, other_bytes: int) -> float:
    """One decoder layer's weights as stored: its linears (quantized or not) and its norms."""
    norms = (4 if s.model_type == "gpt_neox" else 2) * s.hidden
    return sum(i * o for i, o, _ in s.linears.values()) * linear_bytes + norms * other_bytes


def sharded_memory(config, num_gpus: int, sharding: str, quantization: str = "4bit", dtype_bytes: int = 2, **kwargs):
    """Peak bytes on each of num_gpus GPUs, by the engine's rules (a prediction, like estimate_memory).

    ddp: every GPU holds the whole model, LoRA and optimizer state, plus DDP's gradient buckets.
    fsdp (FULL_SHARD) and zero3: weights, LoRA weights, their gradients and AdamW state are split
    num_gpus ways; on top comes what is gathered whole during a step: for fsdp the root unit
    (embeddings, final norm, head), which stays gathered from forward to backward, and two decoder
    blocks (the one computing and the prefetched next); for zero3 the largest single module (head
    or embeddings) and two decoder blocks. Under fsdp/zero3 jalora keeps a 4-bit base's other
    weights in the compute dtype (no fp32 upcast: a block is one flat tensor of one dtype).
    Activations and logits are per rank, as one GPU's; with more than one process jalora turns the
    chunked loss off (it calls the decoder outside the engine's wrapper), so every run here builds
    the full logits.
    """
    if sharding not in SHARDINGS:
        raise UserError(f"unknown --sharding {sharding!r}; choose one of: {', '.join(SHARDINGS)}")
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise UserError(f"--num_gpus must be a whole number of at least 1, not {num_gpus!r}")
    if num_gpus > 1:
        kwargs["chunked_ce"] = kwargs.get("stage") == "dpo"  # trl's DPO computes log-probs in chunks itself
    result = estimate_memory(config, quantization, dtype_bytes=dtype_bytes, **kwargs)
    result |= {"num_gpus": num_gpus, "sharding": sharding, "all_gather": 0.0}
    if sharding == "ddp":
        result["lora_and_optimizer"] += result["lora_parameters"] * 4  # DDP's bucket copy of the fp32 gradients
    else:
        s = shapes(config)
        counts = parameter_counts(s)
        quantized = quantization != "none"
        linear_bytes = {"4bit": NF4_BYTES, "8bit": INT8_BYTES}.get(quantization, dtype_bytes)
        if quantized:  # no fp32 upcast of norms, embeddings and head: they stay in the compute dtype
            result["weights"] = counts["linear"] * linear_bytes + counts["other"] * dtype_bytes
            head_rows = result["logits"] / (s.vocab * (4 + 4 + 4))
            result["logits"] = head_rows * s.vocab * (dtype_bytes + 4 + 4)
        embeddings = s.vocab * s.hidden * dtype_bytes
        block = decoder_block_bytes(s, linear_bytes, dtype_bytes)
        root_unit = embeddings * (1 if s.tied else 2) + s.hidden * dtype_bytes  # with the final norm
        gathered_whole = root_unit if sharding == "fsdp" else embeddings
        result["weights"] /= num_gpus
        result["lora_and_optimizer"] /= num_gpus
        result["all_gather"] = gathered_whole + 2 * block
    result["total"] = sum(result[k] for k in ("weights", "lora_and_optimizer", "activations", "logits", "all_gather"))
    return result


def report(estimate: dict, gpu_gb: float) -> str:
    """The breakdown `jalora estimate` prints, ending in whether it fits."""
    rows = [
        ("weights", estimate["weights"]),
        ("LoRA + optimizer", estimate["lora_and_optimizer"]),
        ("activations", estimate["activations"]),
        ("logits / loss", estimate["logits"]),
    ]
    if estimate.get("all_gather"):
        rows.append(("all-gather buffer", estimate["all_gather"]))
    lines = [f"{name:<18}{value / GB:7.2f} GB" for name, value in rows]
    peak = estimate["total"] / GB
    lines.append(f"{'peak (torch)':<18}{peak:7.2f} GB")
    needed = peak + CUDA_CONTEXT_GB
    verdict = "fits" if needed <= gpu_gb else "does NOT fit"
    lines.append(f"{'+ CUDA context':<18}{CUDA_CONTEXT_GB:7.2f} GB")
    gpus = estimate.get("num_gpus", 1)
    cards = f"each of {gpus} {gpu_gb:g} GB cards" if gpus > 1 else f"a {gpu_gb:g} GB card"
    lines.append(f"{verdict} on {cards} ({needed:.1f} GB needed, {gpu_gb - needed:+.1f} GB to spare)")
    if gpus > 1:
        lines.append("a prediction from the config, not a measurement: no multi-GPU run has checked it")
    return "\n".join(lines)


@friendly_errors
def estimate(
    base_model: str,
    quantization: str = "4bit",
    cutoff_len: int = 512,
    micro_batch_size: int = 4,
    lora_target_modules: list[str] | str | None = None,
    lora_r: int = 8,
    gpu_gb: float = 24,
    gradient_checkpointing: bool | None = None,
    chunked_ce: bool | None = None,
    bf16: bool = True,
    preset: str | None = None,
    trust_remote_code: bool = False,
    stage: str = "sft",
    num_gpus: int = 1,
    sharding: str = "ddp",
) -> dict:
    """Print the predicted peak GPU memory of `finetune` with these flags, and whether it fits `gpu_gb`.

    --stage dpo / orpo: each pair is two sequences in one forward pass (chosen and rejected).
    --num_gpus N --sharding ddp|fsdp|zero3: the peak on each GPU of an N-process launch
    (README, Multi-GPU; the rules are in `sharded_memory`). Predictions, not measurements.

    Reads only the model config (a local folder, or a hub id: config.json alone is fetched).
    LoRA targets default to the preset's, as in finetune.
    """
    from jalora.data.stages import STAGES
    from jalora.model.loading import load_config, resolve_preset, resolve_source
    from jalora.model.preflight import check_quantization

    check_quantization(quantization)
    if stage not in STAGES:
        raise UserError(f"unknown --stage {stage!r}; choose one of: {', '.join(STAGES)}")
    config = load_config(resolve_source(base_model), trust_remote_code)
    targets = lora_target_modules or list(resolve_preset(preset, base_model, trust_remote_code).target_modules)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if targets == ["all-linear"]:
        targets = "all-linear"
    settings = {
        "cutoff_len": cutoff_len,
        "micro_batch_size": micro_batch_size,
        "lora_target_modules": targets,
        "lora_r": lora_r,
        "gradient_checkpointing": gradient_checkpointing,
        "chunked_ce": chunked_ce,
        "stage": stage,
    }
    dtype_bytes = 2 if bf16 else 4
    if num_gpus == 1 and sharding == "ddp":
        result = estimate_memory(config, quantization, dtype_bytes=dtype_bytes, **settings)
    else:
        result = sharded_memory(config, num_gpus, sharding, quantization, dtype_bytes, **settings)
    print(
        f"{base_model}: {config.model_type}, {result['parameters'] / 1e9:.2f}B parameters, "
        f"LoRA r={lora_r} on {targets if isinstance(targets, str) else ','.join(targets)} "
        f"({result['lora_parameters'] / 1e6:.1f}M); {quantization}, micro-batch {micro_batch_size} × {cutoff_len} "
        f"tokens, gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'}, "
        f"chunked CE {'on' if result['chunked_ce'] else 'off'}, stage {stage}"
        + (f"; {sharding} across {num_gpus} GPUs, per GPU" if "num_gpus" in result else "")
    )
    print(report(result, gpu_gb))
    return result
