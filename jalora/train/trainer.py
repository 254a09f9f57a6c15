"""The Trainer every stage runs on: jalora's for sft and pt, trl's for dpo and orpo, with the same
training arguments, speed/memory settings and TensorBoard folder."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from jalora.data.collate import PackCollator, PadCollator
from jalora.data.pretrain import DocumentPackCollator
from jalora.data.stages import PREFERENCE_STAGES
from jalora.errors import UserError
from jalora.model.architectures import architecture, types_with
from jalora.train.checkpoints import CheckpointingTrainer
from jalora.train.lean_trainer import LeanTrainer
from jalora.train.loss import supports_supervised_head, wants_chunked_ce
from jalora.train.nan_guard import NanGuarded


class JaloraTrainer(NanGuarded, CheckpointingTrainer, LeanTrainer):
    """Whole-or-nothing checkpoints and Ctrl-C saves (checkpoints.py), token counting and the loss
    from supervised positions only (lean_trainer.py), and a stop at the first NaN/inf loss (nan_guard.py)."""


def build_stage_trainer(
    stage, model, tokenizer, train_set, val_set, lean, run_info, *, fresh_adapter, preference, **args
):
    """jalora's Trainer for sft and pt, trl's for dpo and orpo, on the same training arguments."""
    if stage not in PREFERENCE_STAGES:
        collator = DocumentPackCollator() if stage == "pt" and lean["packing"] else None
        return _build_trainer(
            model, tokenizer, train_set, val_set, lean=lean, run_info=run_info, collator=collator, **args
        )
    from jalora.train.preference import build_preference_trainer, config_class

    if stage == "orpo":
        stage_args = {"beta": preference["beta"], "max_length": preference["max_length"]}
    else:  # the pairs are cut to cutoff_len already, eos kept
        stage_args = {"beta": preference["beta"], "loss_type": preference["loss_type"], "max_length": None}
    config = training_arguments(config_class(stage), val_set, lean, train_examples=len(train_set), **stage_args, **args)
    trainer = build_preference_trainer(stage, model, tokenizer, train_set, val_set, config, run_info, fresh_adapter)
    log_tensorboard_to(trainer, Path(config.output_dir))
    return trainer


def lean_settings(
    config, quantization: str, packing: bool | None, gradient_checkpointing: bool | None, chunked_ce: bool | None
) -> dict:
    """Resolve the speed/memory flags: None means the default for this model and quantization."""
    exact = architecture(config).packing_exact
    if packing and not exact:
        raise UserError(
            f"--packing is exact only for model types {', '.join(types_with('packing_exact'))} "
            f"(this is {config.model_type}); "
            "pass --packing False or --group_by_length True"
        )
    return {
        "packing": exact if packing is None else packing,
        "gradient_checkpointing": quantization != "none" if gradient_checkpointing is None else gradient_checkpointing,
        # the head on supervised positions only calls the decoder directly: not under DDP
        "supervised_head": world_size() == 1 and supports_supervised_head(config),
        "chunked_ce": world_size() == 1 and wants_chunked_ce(config, chunked_ce),
    }


def world_size() -> int:
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
    examples_per_step = micro_batch_size * gradient_accumulation_steps * world_size()
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
        ddp_find_unused_parameters=False if world_size() > 1 else None,
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
