"""What jalora itself does for a sharded launch (FSDP, DeepSpeed), shared by finetune on GPUs and the
CPU engine tests (tests/test_engines.py):

- `check_engine_enabled`: stop before any weights load when the launch asked for FSDP or DeepSpeed
  and accelerate will not enable it, or when several processes would each train alone;
- `gather_adapter`: the full LoRA weights from sharded parameters, gathered on every rank (a
  collective), so that rank 0 can write them.

The other two things a sharded base needs, float quant storage and no `device_map`, are decided in
jalora/model/loading.py from the same launch variables (`sharded_launch`).
"""

from __future__ import annotations

import os

import torch

from jalora.errors import UserError

# what `accelerate launch` exports for a config's distributed_type
ENGINE_VARIABLES = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}


def requested_engine(env: dict[str, str] | None = None) -> str | None:
    """FSDP or DeepSpeed when the launcher asked for one, else None."""
    env = os.environ if env is None else env
    return next((name for name, var in ENGINE_VARIABLES.items() if env.get(var, "").lower() == "true"), None)


def expected_distributed_type(env: dict[str, str] | None = None, gpu: bool | None = None) -> str:
    """The distributed type accelerate 1.16 will give this process when jalora's Trainer builds its state.

    accelerate decides only then, after the weights are loaded; this repeats its rule
    (`PartialState._prepare_backend` and `AcceleratorState.__init__`) for the arguments jalora passes
    (`use_cpu` exactly when no GPU is visible), so that a wrong launch costs seconds, not a model load.
    FSDP and DeepSpeed are enabled only on GPUs and only under a launcher that sets LOCAL_RANK.
    """
    env = os.environ if env is None else env
    gpu = torch.cuda.is_available() if gpu is None else gpu
    launched = int(env.get("LOCAL_RANK", "-1")) != -1
    world = int(env.get("WORLD_SIZE", "1"))
    if not gpu:
        return "MULTI_CPU" if launched or world > 1 else "NO"
    if not launched:
        return "NO"
    engine = requested_engine(env)
    return {"FSDP": "FSDP", "DeepSpeed": "DEEPSPEED"}.get(engine or "", "MULTI_GPU")


def check_engine_enabled(env: dict[str, str] | None = None, gpu: bool | None = None) -> None:
    """One line, before any weights load, when the run would not be what the launch asked for
    (from rank 0; the other ranks exit with the same status without repeating it)."""
    env = os.environ if env is None else env
    gpu = torch.cuda.is_available() if gpu is None else gpu
    try:
        _check_engine(env, gpu)
    except UserError:
        if int(env.get("RANK", "0")) != 0:
            raise SystemExit(2) from None
        raise


def _check_engine(env, gpu: bool) -> None:
    engine, running = requested_engine(env), expected_distributed_type(env, gpu)
    world = int(env.get("WORLD_SIZE", "1"))
    if engine and running not in ("FSDP", "DEEPSPEED"):
        why = (
            "no GPU is visible to this process, and accelerate enables FSDP and DeepSpeed only on GPUs"
            if not gpu
            else "LOCAL_RANK is not set: start it with `accelerate launch` or `torchrun`, not plain python"
        )
        what = "plain data parallelism, every rank holding the whole model" if running == "MULTI_CPU" else "one process"
        raise UserError(
            f"the launch asked for {engine} ({ENGINE_VARIABLES[engine]}=true) but accelerate would run "
            f"{running} ({what}): {why}; nothing was loaded"
        )
    if world > 1 and running == "NO":
        raise UserError(
            f"WORLD_SIZE is {world} but accelerate would run NO (each of the {world} processes training alone on "
            "all the data): LOCAL_RANK is not set; start it with `accelerate launch` or `torchrun`; nothing was loaded"
        )


def gather_adapter(model) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA) weights as full tensors, whatever shards them; every rank must call this.

    FSDP2 goes through torch's `get_model_state_dict` with frozen weights left out, so the base is
    never gathered; FSDP1 gathers the whole model one unit at a time and keeps the LoRA weights. On a
    GPU the result is offloaded to rank 0's CPU memory (torch's rank-0-only full state dict crashes
    on CPU-only process groups, so there every rank keeps it).
    DeepSpeed ZeRO-3 parameters are gathered with its own `GatheredParameters`. Returns None for a
    model that nothing shards (one process, DDP, ZeRO-2), whose own parameters are already whole.
    """
    if not is_sharded(model):
        return None
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in trainable):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            return {name: p.detach().to("cpu", copy=True) for name, p in trainable}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    on_gpu = any(p.is_cuda for _, p in trainable)
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        # FSDP1's flat parameters hide which weights are frozen (ignore_frozen_params drops them all):
        # gather unit by unit, then keep the LoRA weights
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))
        return {name: tensor for name, tensor in full.items() if "lora_" in name}
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def is_sharded(model) -> bool:
    """Whether an engine split this model's parameters: FSDP1 wrappers, FSDP2 DTensors, ZeRO-3 partitions."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


class GatheredAdapter:
    """A LoRA adapter gathered from a sharded model, saved as `PeftModel.save_pretrained` saves one
    (adapter_model.safetensors without the adapter name in the keys, adapter_config.json).

    `PeftModel.save_pretrained(state_dict=...)` picks the adapter's weights by walking the model's
    modules, whose names under FSDP1 carry `_fsdp_wrapped_module` in the middle: it writes an empty
    adapter. This writes the gathered weights itself.
    """

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        self.model, self.weights = model, weights

    def save_pretrained(self, folder) -> None:
        import copy
        from pathlib import Path

        from safetensors.torch import save_file

        name = self.model.active_adapter
        tensors = {key.replace(f".{name}.", "."): t.contiguous() for key, t in self.weights.items()}
        save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.copy(self.model.peft_config[name])
        config.inference_mode = True
        config.save_pretrained(str(folder))
