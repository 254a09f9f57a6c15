"""`finetune()`: preset → tokenizer → records → tokenized examples → model + LoRA → Trainer → output dir.

Its signature is the command line of finetune.py (alpaca-lora's flags plus jalora's own).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from jalora.card import write_model_card
from jalora.checkpoints import CheckpointingTrainer
from jalora.collate import PACKING_EXACT, PackCollator, PadCollator
from jalora.data import fingerprint
from jalora.errors import UserError, friendly_errors
from jalora.lean_trainer import LeanTrainer
from jalora.loss import supports_supervised_head, wants_chunked_ce
from jalora.modeling import DEFAULT_BASE_MODEL, compute_dtype, load_config, load_tokenizer, resolve_source
from jalora.nan_guard import StopOnNonFiniteLoss
from jalora.outputs import (
    RUN_RECORD,
    check_resume_matches,
    clear_previous_run,
    prepare_output_dir,
    save_pretrained_atomic,
    write_json,
)
from jalora.plots import LOSS_PLOT, save_loss_plot
from jalora.preflight import check_training_flags
from jalora.presets import detect_preset, get_preset, presets_table, special_tokens_in
from jalora.pretrain_data import DocumentPackCollator
from jalora.prompts import Prompter, load_template
from jalora.quiet import quiet_third_party
from jalora.run_record import DEFAULT_DPO_LOSS, run_record, stage_metrics
from jalora.stage_data import PREFERENCE_STAGES, check_data_fits_stage
from jalora.training_data import check_stage_flags, read_data, tokenize_data
from jalora.training_model import build_model

log = logging.getLogger(__name__)
# finetune flags that go to the training arguments as they are
TRAINER_FLAGS = (
    "output_dir", "micro_batch_size", "num_epochs", "max_steps", "learning_rate", "warmup_steps",
    "group_by_length", "eval_steps", "save_steps", "logging_steps", "seed",
)  # fmt: skip


class JaloraTrainer(CheckpointingTrainer, LeanTrainer):
    """Whole-or-nothing checkpoints and Ctrl-C saves (checkpoints.py), token counting and the loss
    from supervised positions only (lean_trainer.py), and a stop at the first NaN/inf loss (nan_guard.py)."""

    def __init__(self, *args, **kwargs):
        self.nan_guard = StopOnNonFiniteLoss()
        super().__init__(*args, callbacks=[self.nan_guard], **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.nan_guard.observe(result[0] if return_outputs else result)
        return result


SAMPLE_DATA = Path(__file__).resolve().parent.parent / "data" / "dolly_ja_sample.jsonl"


def resolve_preset(preset: str | None, base_model: str, trust_remote_code: bool = False):
    """The preset named, else the one detected from the model id / path, its config and tokenizer."""
    if preset:
        return get_preset(preset)
    source = resolve_source(base_model)
    config = load_config(source, trust_remote_code)
    return detect_preset(base_model, config, None if source.gguf_file else special_tokens_in(source.path))


@friendly_errors
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
    """
    quiet_third_party(verbose)
    if preset == "list":
        print(presets_table())
        return {}
    flags = dict(locals())
    check_training_flags(flags)
    check_stage_flags(stage, packing, loss_type, base_adapter, lora_target_modules)
    resume = prepare_output_dir(output_dir, resume_from_checkpoint, overwrite_output_dir)
    the_preset = resolve_preset(preset, base_model, trust_remote_code)
    template = load_template(prompt_template_name or the_preset.template)
    source = resolve_source(base_model)

    # data first: every record is validated before any weights are loaded
    check_data_fits_stage(data_path, stage)
    train_records, val_records = read_data(stage, data_path, val_data_path, val_set_size, seed, data_format)
    lean = lean_settings(
        load_config(source, trust_remote_code), quantization, packing, gradient_checkpointing, chunked_ce
    )
    lean["packing"] = lean["packing"] and stage not in PREFERENCE_STAGES  # trl's preference collators pad
    tokenizer = load_tokenizer(source, the_preset, trust_remote_code)
    prompter = Prompter(template, tokenizer, the_preset, system_prompt)
    train_set, val_set, stats = tokenize_data(
        stage, train_records, val_records, prompter, cutoff_len, train_on_inputs, add_eos_token, lean["packing"]
    )
    if not train_set:
        raise UserError(f"{data_path}: every record is longer than --cutoff_len {cutoff_len} in its prompt alone")

    gradient_accumulation_steps = max(1, batch_size // micro_batch_size // _world_size())
    run_info = {
        "data_fingerprint": fingerprint(data_path),
        "train_examples": len(train_set),
        "micro_batch_size": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "seed": seed,
    }
    if resume:
        check_resume_matches(resume, run_info)
    elif overwrite_output_dir:
        clear_previous_run(output_dir)

    dtype = compute_dtype(bf16, fp16)
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
        **{name: flags[name] for name in TRAINER_FLAGS},
    )  # fmt: skip
    if wandb_project:
        os.environ["WANDB_PROJECT"] = wandb_project
    metrics = train_and_evaluate(trainer, stage, eval_before_training, resume)

    record = run_record(flags, the_preset, prompter, model, trainer, lean, lora, train_set, val_set, stats, metrics)
    if trainer.is_world_process_zero():
        if stage in PREFERENCE_STAGES:
            from jalora.preference_trainer import drop_reference_adapter

            drop_reference_adapter(model)
        save_run(model, tokenizer, record, Path(output_dir))
    return record


def build_stage_trainer(
    stage, model, tokenizer, train_set, val_set, lean, run_info, *, fresh_adapter, preference, **args
):
    """jalora's Trainer for sft and pt, trl's for dpo and orpo, on the same training arguments."""
    if stage not in PREFERENCE_STAGES:
        collator = DocumentPackCollator() if stage == "pt" and lean["packing"] else None
        return _build_trainer(
            model, tokenizer, train_set, val_set, lean=lean, run_info=run_info, collator=collator, **args
        )
    from jalora.preference_trainer import build_preference_trainer, config_class

    if stage == "orpo":
        stage_args = {"beta": preference["beta"], "max_length": preference["max_length"]}
    else:  # the pairs are cut to cutoff_len already, eos kept
        stage_args = {"beta": preference["beta"], "loss_type": preference["loss_type"], "max_length": None}
    config = training_arguments(config_class(stage), val_set, lean, train_examples=len(train_set), **stage_args, **args)
    trainer = build_preference_trainer(stage, model, tokenizer, train_set, val_set, config, run_info, fresh_adapter)
    log_tensorboard_to(trainer, Path(config.output_dir))
    return trainer


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


def lean_settings(
    config, quantization: str, packing: bool | None, gradient_checkpointing: bool | None, chunked_ce: bool | None
) -> dict:
    """Resolve the speed/memory flags: None means the default for this model and quantization."""
    exact = config.model_type in PACKING_EXACT
    if packing and not exact:
        raise UserError(
            f"--packing is exact only for model types {', '.join(PACKING_EXACT)} (this is {config.model_type}); "
            "pass --packing False or --group_by_length True"
        )
    return {
        "packing": exact if packing is None else packing,
        "gradient_checkpointing": quantization != "none" if gradient_checkpointing is None else gradient_checkpointing,
        # the head on supervised positions only calls the decoder directly: not under DDP
        "supervised_head": _world_size() == 1 and supports_supervised_head(config),
        "chunked_ce": _world_size() == 1 and wants_chunked_ce(config, chunked_ce),
    }


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(
    config_class,
    val_set,
    lean: dict,
    *,
    output_dir,
    gradient_accumulation_steps,
    micro_batch_size,
    num_epochs,
    max_steps,
    warmup_steps,
    dtype,
    group_by_length,
    eval_steps,
    save_steps,
    logging_steps,
    **kwargs,
):
    """TrainingArguments (or trl's DPOConfig / ORPOConfig, its subclasses) with jalora's settings."""
    examples_per_step = micro_batch_size * gradient_accumulation_steps * _world_size()
    steps_per_epoch = math.ceil(kwargs.pop("train_examples") / examples_per_step)
    total_steps = max_steps if max_steps > 0 else math.ceil(steps_per_epoch * num_epochs)
    return config_class(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch_size,
        per_device_eval_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_train_epochs=num_epochs,
        max_steps=max_steps,
        warmup_steps=min(warmup_steps, total_steps // 10),
        bf16=dtype == torch.bfloat16,  # torch's CPU autocast runs bf16 too
        fp16=dtype == torch.float16,
        logging_steps=min(logging_steps, max(1, total_steps // 10)),
        eval_strategy="steps" if val_set else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=3,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False if _world_size() > 1 else None,
        disable_tqdm=False,
        gradient_checkpointing=lean["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **kwargs,
    )


def _build_trainer(model, tokenizer, train_set, val_set, *, lean, run_info, collator=None, **kwargs):
    from transformers import TrainingArguments

    args = training_arguments(TrainingArguments, val_set, lean, train_examples=len(train_set), **kwargs)
    trainer = JaloraTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=collator or (PackCollator() if lean["packing"] else PadCollator(tokenizer.pad_token_id)),
        processing_class=tokenizer,
        run_info=run_info,
        supervised_head=lean["supervised_head"],
        ce_chunk_size=1024 if lean["chunked_ce"] else None,
    )
    log_tensorboard_to(trainer, Path(args.output_dir))
    return trainer


def log_tensorboard_to(trainer, output_dir: Path) -> None:
    """TensorBoard events under the output dir. transformers picks that folder only when training
    begins, so the evaluation before training would otherwise open its writer in ./runs of
    whatever directory the command was started from (TENSORBOARD_LOGGING_DIR still wins)."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(output_dir / default_logdir())


def check_adapter_trained(model) -> None:
    """An adapter whose LoRA B matrices are all zero is the base model: never call that a success."""
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    if not lora_b:
        raise UserError("the model has no LoRA weights to save")
    if all(torch.count_nonzero(p) == 0 for p in lora_b):
        raise UserError("training left every LoRA weight at zero (no step was taken?); nothing was saved")


def save_run(model, tokenizer, record: dict, out_dir: Path) -> None:
    """Adapter, tokenizer, loss plot, model card and run record; the run record is written last
    and marks the run finished."""
    check_adapter_trained(model)
    save_pretrained_atomic(model, out_dir)
    save_pretrained_atomic(tokenizer, out_dir)
    if save_loss_plot(record.get("losses", {}), out_dir / LOSS_PLOT, title=str(record.get("base_model", ""))):
        print(f"loss curve: {out_dir / LOSS_PLOT}")
    write_model_card(out_dir, record)  # replaces peft's README stub
    write_json(out_dir / RUN_RECORD, record)
    print(f"saved adapter and run record to {out_dir}")
