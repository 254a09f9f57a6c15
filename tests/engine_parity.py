"""One engine's parity run on the CPU: the model exactly as jalora builds it, sharded by FSDP2, FSDP1 or
DeepSpeed ZeRO-2/3 with the options of a shipped accelerate config, trained a few steps; or, with
`--engine none`, the single-process full-batch reference (run as plain `python`).

    torchrun --nproc_per_node 2 tests/engine_parity.py --engine fsdp2 --model DIR --out DIR

The accelerate config goes through accelerate's own launcher code (YAML → launch variables →
FullyShardedDataParallelPlugin / DeepSpeedPlugin), as `accelerate launch` does on GPUs. accelerate
then refuses to apply the engine without a GPU, so this script applies it the way accelerate and
transformers' Trainer do (peft's FSDP1 wrap policy for LoRA, accelerate's FSDP2 wrap policy,
`deepspeed.initialize` with the plugin's config and a torch AdamW). What runs only here, on CPU
process groups, is said in CPU_OVERRIDES. jalora's own code does the rest: the model build
(preset targets, LoRA, QLoRA with the quant storage a sharded launch gets), `gather_adapter` and the
rank-0 save.

Writes OUT/<quantization>/result.json (per-step losses, this run's shard fractions, whether the
base weights were left unchanged) and the saved adapter in OUT/<quantization>/adapter.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "fsdp2": "configs/accelerate/fsdp2_qlora.yaml",
    "fsdp1": "configs/accelerate/fsdp_qlora.yaml",
    "zero2": "configs/accelerate/deepspeed_zero2.yaml",
    "zero3": "configs/accelerate/deepspeed_zero3.yaml",
}
# launch variables of the shipped configs that cannot work on CPU process groups, and what runs instead
CPU_OVERRIDES = {
    "ACCELERATE_MIXED_PRECISION": "no",  # bf16 → fp32, the CPU compute dtype jalora picks; parity to 1e-5 needs it
    "FSDP_SYNC_MODULE_STATES": "false",  # raises on CPU; every rank loads the same weights here
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",  # needs sync_module_states
}
# and what differs from a GPU launch beyond them
CPU_NOTES = [
    "FSDP1 device_id=torch.device('cpu') (a GPU launch gives the rank's GPU)",
    "ZeRO-3 zero3_init_flag has no effect, as on GPUs: jalora loads the base before the Trainer makes the plugin",
]
# lr 1e-3: in its first steps AdamW turns rounding noise in near-zero gradients into lr-sized updates
# (at 1e-2 one ZeRO-3 lora_B element differed by 4e-5 while the losses agreed to 1e-6)
STEPS, BATCH, LENGTH, LR, CLIP = 3, 4, 16, 1e-3, 1.0


def launch_variables(config_file: str) -> dict[str, str]:
    """The FSDP_* / ACCELERATE_* variables `accelerate launch --config_file` exports to each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / config_file), "finetune.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def build(model_dir: str, preset_name: str, quantization: str):
    """The model as finetune builds it: the preset's LoRA targets, r=8, seed 0, fp32 on CPU."""
    from jalora.model.loading import load_config, load_tokenizer, resolve_preset, resolve_source
    from jalora.model.lora import build_model
    from jalora.train.trainer import lean_settings

    source = resolve_source(model_dir)
    preset = resolve_preset(preset_name, model_dir)
    tokenizer = load_tokenizer(source, preset)
    lean = lean_settings(load_config(source), quantization, False, None, None)
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}
    model, _ = build_model(
        source, quantization, torch.float32, False, tokenizer, lean, None, lora=lora, preset=preset, seed=0
    )
    return model


def batch(vocab: int) -> torch.Tensor:
    """The global batch: BATCH rows of LENGTH random ids, the same in every process."""
    return torch.randint(3, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def full_frozen(model) -> dict[str, torch.Tensor]:
    """Every frozen weight of the (possibly sharded) model as a full tensor; a collective."""
    from jalora.train.distributed import is_sharded

    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in frozen):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in frozen]):
            return {n: p.detach().clone() for n, p in frozen}
    if not is_sharded(model):
        return {n: p.detach().clone() for n, p in frozen}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {n: t for n, t in full.items() if "lora_" not in n}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: 4-bit weights stored as floats hold bit patterns that read as NaN."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def fsdp2(model, rank: int):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2, plugin.fsdp_version
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    blocks = [m for m in model.modules() if m is not model and policy(m)]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward)
    local = sum(p.to_local().numel() for p in model.parameters())
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0), local, len(blocks)


def fsdp1(model, rank: int):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1, plugin.fsdp_version
    wrapped = FullyShardedDataParallel(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),  # what transformers' Trainer sets for a peft model
        sharding_strategy=plugin.sharding_strategy,
        backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch,
        use_orig_params=plugin.use_orig_params,
        limit_all_gathers=plugin.limit_all_gathers,
        sync_module_states=False,
        device_id=torch.device("cpu"),
    )
    units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
    local = sum(p.numel() for p in wrapped.parameters())
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    return wrapped, optimizer, local, units


def zero(model, rank: int):
    import deepspeed
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    config = dict(plugin.deepspeed_config)
    world = torch.distributed.get_world_size()
    config |= {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "train_batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_allow_untested_optimizer": True,  # accelerate sets it for a client optimizer
        "steps_per_print": 10**9,
    }
    config.pop("bf16", None)
    config.pop("fp16", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if plugin.zero_stage == 3:
        local = sum(p.ds_tensor.numel() for p in model.parameters())
    else:  # ZeRO-2 shards the fp32 master weights, gradients and optimizer state of the trainable ones
        local = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    return engine, None, local, plugin.zero_stage


def train(model_dir: str, preset: str, engine: str, quantization: str, out: Path, overridden: dict) -> None:
    from jalora.outputs import save_pretrained_atomic
    from jalora.train.distributed import GatheredAdapter, gather_adapter

    distributed = engine != "none"
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    model = build(model_dir, preset, quantization)
    before = full_frozen(model)
    full_numel = {
        "all": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    ids = batch(model.config.vocab_size)
    rows = ids.chunk(world)[rank]
    shard = {"fsdp2": fsdp2, "fsdp1": fsdp1, "zero2": zero, "zero3": zero}.get(engine)
    if shard:
        runner, optimizer, local, units = shard(model, rank)
    else:
        runner, local, units = model, full_numel["all"], 0
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = runner(input_ids=rows, labels=rows).loss
        if engine.startswith("zero"):
            runner.backward(loss)
            runner.step()
        else:
            loss.backward()
            if engine == "fsdp1":
                runner.clip_grad_norm_(CLIP)
            else:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
            optimizer.step()
            optimizer.zero_grad()
        mean = loss.detach().clone()
        if distributed:  # equal tokens per row: the mean of the ranks' means is the full batch's mean
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    after = full_frozen(runner if engine == "fsdp1" else model)
    changed = sorted(n for n, t in before.items() if n in after and not same_bytes(t, after[n]))
    missing = sorted(set(before) - set(after))
    adapter = gather_adapter(runner if engine == "fsdp1" else model)
    sharded_total = full_numel["trainable"] if engine == "zero2" else full_numel["all"]
    fractions = [local / sharded_total]
    if distributed:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, fractions[0])
        fractions = gathered
    if rank == 0:
        target = out / quantization
        target.mkdir(parents=True, exist_ok=True)
        save_pretrained_atomic(model if adapter is None else GatheredAdapter(model, adapter), target / "adapter")
        result = {
            "engine": engine, "quantization": quantization, "world_size": world, "losses": losses,
            "shard_fractions": fractions, "wrapped_units": units, "base_changed": changed, "base_missing": missing,
            "cpu_overrides": overridden, "cpu_notes": CPU_NOTES if shard else [],
        }  # fmt: skip
        (target / "result.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["none", *CONFIGS], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quantization", nargs="+", default=["none", "4bit"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    overridden: dict[str, str] = {}
    if args.engine != "none":
        variables = launch_variables(CONFIGS[args.engine])
        overridden = {k: f"{variables[k]} → {v}" for k, v in CPU_OVERRIDES.items() if variables.get(k, v) != v}
        os.environ.update(variables | {k: v for k, v in CPU_OVERRIDES.items() if k in variables})
        if args.engine.startswith("zero"):
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            torch.distributed.init_process_group("gloo")
    from jalora.quiet import quiet_third_party

    quiet_third_party(False)
    for quantization in args.quantization:
        train(args.model, args.preset, args.engine, quantization, Path(args.out), overridden)
    if args.engine != "none":
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
