"""`finetune()`: preset → tokenizer → records → tokenized examples → model + LoRA → Trainer → output dir.

Its signature is the command line of finetune.py (alpaca-lora's flags plus jalora's own).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from jalora.data.prompts import Prompter, load_template
from jalora.data.records import SAMPLE_DATA, fingerprint
from jalora.data.stages import PREFERENCE_STAGES, check_data_fits_stage
from jalora.errors import UserError, friendly_errors
from jalora.evaluate.card import write_model_card
from jalora.evaluate.plots import LOSS_PLOT, save_loss_plot
from jalora.flags import checked_settings
from jalora.model.loading import (
    DEFAULT_BASE_MODEL,
    compute_dtype,
    load_config,
    load_tokenizer,
    resolve_preset,
    resolve_source,
)
from jalora.model.lora import build_model
from jalora.model.preflight import check_training_flags
from jalora.outputs import (
    RUN_RECORD,
    check_resume_matches,
    clear_previous_run,
    prepare_output_dir,
    save_pretrained_atomic,
    write_json,
)
from jalora.presets import presets_table
from jalora.quiet import quiet_third_party
from jalora.run_lock import locks_output
from jalora.train.datasets import check_stage_flags, read_data, tokenize_data
from jalora.train.distributed import GatheredAdapter, check_engine_enabled, gather_adapter
from jalora.train.record import DEFAULT_DPO_LOSS, run_record, stage_metrics
from jalora.train.trainer import build_stage_trainer, lean_settings, world_size

log = logging.getLogger(__name__)
# finetune flags that go to the training arguments as they are
TRAINER_FLAGS = (
    "output_dir", "micro_batch_size", "num_epochs", "max_steps", "learning_rate", "warmup_steps",
    "group_by_length", "eval_steps", "save_steps", "logging_steps", "seed",
)  # fmt: skip


@friendly_errors
@locks_output("output_dir")
def finetune(
    base_model: str = DEFAULT_BASE_MODEL,
    data_path: str = str(SAMPLE_DATA),
    output_dir: str = "./lora-out",
    # training hyper-parameters (alpaca-lora names and reference-recipe defaults)
    batch_size: int = 128,
    micro_batch_size: int = 4,
    num_epochs: float = 3,
    learning_rate: float = 3e-4,
    cutoff_len: int = 512,
    val_set_size: float = 0.05,
    val_data_path: str | None = None,
    warmup_steps: int = 100,
    max_steps: int = -1,
    seed: int = 42,
    # LoRA
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | str | None = None,
    # data and prompts
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
    group_by_length: bool = False,
    packing: bool | None = None,
    prompt_template_name: str | None = None,
    system_prompt: str | None = None,
    data_format: str | None = None,
    # model
    preset: str | None = None,
    quantization: str = "none",
    bf16: bool | None = None,
    fp16: bool | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool | None = None,
    chunked_ce: bool | None = None,
    # bookkeeping
    resume_from_checkpoint: str | bool | None = None,
    overwrite_output_dir: bool = False,
    eval_steps: int = 200,
    save_steps: int = 200,
    logging_steps: int = 10,
    eval_before_training: bool = True,
    wandb_project: str = "",
    report_to: str = "none",
    verbose: bool = False,
    # training stage (docs/training.md)
    stage: str = "sft",
    base_adapter: str | None = None,
    beta: float = 0.1,
    loss_type: str | None = None,
) -> dict:
    """Fine-tune a LoRA adapter and save it with its run record.

    --stage: sft (instructions, the default), pt (continued pre-training on plain text), dpo or
    orpo (preference pairs, on trl's trainers; --beta and --loss_type pass through to them).
    --base_adapter DIR goes on training a saved adapter (SFT → DPO) instead of a fresh one.
    The prompt is masked out of the loss by default (train_on_inputs=False): learning to
    reproduce the instruction wastes capacity and makes answers echo the question.
    val_set_size is a count, or a fraction when below 1 (alpaca-lora's fixed 2000 does not
    fit small Japanese datasets). Warmup is capped at a tenth of the run so short runs learn.
    Checkpoints (every save_steps and each epoch end, and on Ctrl-C) resume exactly with
    --resume_from_checkpoint PATH or True (the latest in output_dir).
    Speed and memory (docs/training.md): `packing` puts a micro-batch's examples in one row
    with no padding (default on where it is exact); `gradient_checkpointing` defaults to on
    for 8/4-bit training; `chunked_ce` (default on for vocabularies of 64k+) never builds the
    full logits. Tokenized data is cached (JALORA_CACHE_DIR). Returns the run record.
    --verbose shows the libraries' warnings and log lines (hidden by default).
    On the command line, --config RECIPE.yaml reads these flags from a file (configs/recipes/).
    """
    quiet_third_party(verbose)
    if preset == "list":
        print(presets_table())
        return {}
    settings = checked_settings(finetune, locals())  # every flag typed and in range, frozen
    flags = settings.as_dict()
    check_training_flags(flags)
    check_engine_enabled()  # FSDP / DeepSpeed asked for but not enabled: stop before anything loads
    check_stage_flags(stage, packing, loss_type, base_adapter, lora_target_modules)
    resume = prepare_output_dir(output_dir, resume_from_checkpoint, overwrite_output_dir)
    the_preset = resolve_preset(preset, base_model, trust_remote_code)
    template = load_template(prompt_template_name or the_preset.template)
    source = resolve_source(base_model)

    # data first: every record is validated before any weights are loaded
    tokenizer, prompter, lean, (train_set, val_set, stats) = prepare_data(settings, the_preset, template, source)
    gradient_accumulation_steps = max(1, batch_size // micro_batch_size // world_size())
    run_info = start_run(settings, len(train_set), gradient_accumulation_steps, resume)

    dtype = compute_dtype(bf16, fp16, load_config(source, trust_remote_code))
    model, lora = build_model(
        source, quantization, dtype, trust_remote_code, tokenizer, lean, base_adapter,
        lora={"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target_modules": lora_target_modules},
        preset=the_preset, seed=seed,
    )  # fmt: skip
    trainer = build_stage_trainer(
        stage, model, tokenizer, train_set, val_set, lean, run_info,
        fresh_adapter=base_adapter is None,
        preference={"beta": beta, "loss_type": loss_type or DEFAULT_DPO_LOSS, "max_length": cutoff_len},
        gradient_accumulation_steps=gradient_accumulation_steps,
        dtype=dtype,
        report_to="wandb" if wandb_project else report_to,
        **{name: getattr(settings, name) for name in TRAINER_FLAGS},
    )  # fmt: skip
    if wandb_project:
        os.environ["WANDB_PROJECT"] = wandb_project
    metrics = train_and_evaluate(trainer, stage, eval_before_training, resume)

    record = run_record(flags, the_preset, prompter, model, trainer, lean, lora, train_set, val_set, stats, metrics)
    record["flags"] = flags  # the resolved flags: `finetune.py --config OUT/jalora.json` repeats the run
    adapter = gather_adapter(trainer.model)  # FSDP / ZeRO-3 shards: every rank takes part, rank 0 writes
    if trainer.is_world_process_zero():
        if stage in PREFERENCE_STAGES:
            from jalora.train.preference import drop_reference_adapter

            drop_reference_adapter(model)
        save_run(model, tokenizer, record, Path(output_dir), adapter)
    return record


def prepare_data(settings, preset, template, source) -> tuple:
    """Read and check every record, then tokenize it as the stage trains on it (before any weights load)."""
    stage, data_path, cutoff_len = settings.stage, settings.data_path, settings.cutoff_len
    check_data_fits_stage(data_path, stage)
    train_records, val_records = read_data(
        stage, data_path, settings.val_data_path, settings.val_set_size, settings.seed, settings.data_format
    )
    config = load_config(source, settings.trust_remote_code)
    lean = lean_settings(
        config, settings.quantization, settings.packing, settings.gradient_checkpointing, settings.chunked_ce
    )
    lean["packing"] = lean["packing"] and stage not in PREFERENCE_STAGES  # trl's preference collators pad
    tokenizer = load_tokenizer(source, preset, settings.trust_remote_code)
    prompter = Prompter(template, tokenizer, preset, settings.system_prompt)
    sets = tokenize_data(
        stage, train_records, val_records, prompter, cutoff_len,
        settings.train_on_inputs, settings.add_eos_token, lean["packing"],
    )  # fmt: skip
    if not sets[0]:
        raise UserError(f"{data_path}: every record is longer than --cutoff_len {cutoff_len} in its prompt alone")
    return tokenizer, prompter, lean, sets


def start_run(settings, train_examples: int, gradient_accumulation_steps: int, resume) -> dict:
    """What a resumed run must match (data, batch shape, seed); --overwrite_output_dir clears a finished run."""
    run_info = {
        "data_fingerprint": fingerprint(settings.data_path),
        "train_examples": train_examples,
        "micro_batch_size": settings.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "seed": settings.seed,
    }
    if resume:
        check_resume_matches(resume, run_info)
    elif settings.overwrite_output_dir:
        clear_previous_run(settings.output_dir)
    return run_info


def train_and_evaluate(trainer, stage: str, evaluate_first: bool, resume) -> dict:
    """Train, with the held-out figures of the stage before and after."""
    metrics: dict = {}
    has_val = trainer.eval_dataset is not None and len(trainer.eval_dataset) > 0
    if evaluate_first and has_val:
        metrics |= {f"{k}_before": v for k, v in stage_metrics(stage, trainer.evaluate()).items()}
        print(f"held-out loss before training: {metrics['eval_loss_before']:.4f}")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics |= {"train_loss": result.training_loss, "steps": result.global_step, "seconds": time.time() - started}
    if hasattr(trainer, "throughput"):
        metrics |= trainer.throughput.summary()
    if has_val:
        metrics |= stage_metrics(stage, final_evaluation(trainer))
        print(f"held-out loss after training: {metrics['eval_loss']:.4f}")
    return metrics


def final_evaluation(trainer) -> dict:
    """Held-out figures of the trained adapter: the Trainer's own evaluation when it ran one at the
    last step (eval_steps dividing the step count), else a new one."""
    step = trainer.state.global_step
    done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    return done[-1] if done else trainer.evaluate()


def final_eval_loss(trainer) -> float:
    return final_evaluation(trainer)["eval_loss"]


def check_adapter_trained(weights: dict[str, torch.Tensor]) -> None:
    """An adapter whose LoRA B matrices are all zero is the base model: never call that a success."""
    lora_b = [p for name, p in weights.items() if "lora_B" in name]
    if not lora_b:
        raise UserError("the model has no LoRA weights to save")
    if all(torch.count_nonzero(p) == 0 for p in lora_b):
        raise UserError("training left every LoRA weight at zero (no step was taken?); nothing was saved")


def save_run(model, tokenizer, record: dict, out_dir: Path, adapter: dict | None = None) -> None:
    """Adapter, tokenizer, loss plot, model card and run record; the run record is written last
    and marks the run finished. `adapter`: the LoRA weights gathered from a sharded model."""
    check_adapter_trained(adapter if adapter is not None else dict(model.named_parameters()))
    save_pretrained_atomic(model if adapter is None else GatheredAdapter(model, adapter), out_dir)
    save_pretrained_atomic(tokenizer, out_dir)
    if save_loss_plot(record.get("losses", {}), out_dir / LOSS_PLOT, title=str(record.get("base_model", ""))):
        print(f"loss curve: {out_dir / LOSS_PLOT}")
    write_model_card(out_dir, record)  # replaces peft's README stub
    write_json(out_dir / RUN_RECORD, record)
    print(f"saved adapter and run record to {out_dir}")
