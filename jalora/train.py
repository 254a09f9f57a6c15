"""`finetune()`: preset → tokenizer → records → tokenized examples → model + LoRA → Trainer → output dir.

Its signature is the command line of finetune.py (alpaca-lora's flags plus jalora's own).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import set_seed

from jalora import __version__
from jalora.cache import tokenize_cached
from jalora.card import write_model_card
from jalora.checkpoints import CheckpointingTrainer
from jalora.collate import PACKING_EXACT, PackCollator, PadCollator
from jalora.data import fingerprint, load_records, split_records
from jalora.errors import UserError, friendly_errors
from jalora.lean_trainer import LeanTrainer
from jalora.loss import supports_supervised_head, wants_chunked_ce
from jalora.modeling import (
    DEFAULT_BASE_MODEL,
    attach_lora,
    compute_dtype,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
    resolve_targets,
)
from jalora.nan_guard import StopOnNonFiniteLoss
from jalora.outputs import (
    RUN_RECORD,
    check_resume_matches,
    clear_previous_run,
    prepare_output_dir,
    save_pretrained_atomic,
    write_json,
)
from jalora.packed_attention import use_packed_attention
from jalora.plots import LOSS_PLOT, loss_curves, save_loss_plot
from jalora.preflight import base_config_summary, check_training_flags
from jalora.presets import detect_preset, get_preset, presets_table, special_tokens_in
from jalora.prompts import Prompter, load_template
from jalora.quiet import quiet_third_party

log = logging.getLogger(__name__)


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
) -> dict:
    """Fine-tune a LoRA adapter on instruction data and save it with its run record.

    The prompt is masked out of the loss by default (train_on_inputs=False): learning to
    reproduce the instruction wastes capacity and makes answers echo the question.
    val_set_size is a count, or a fraction when below 1 (alpaca-lora's fixed 2000 does not
    fit small Japanese datasets). Warmup is capped at a tenth of the run so short runs learn.
    Checkpoints (every save_steps and each epoch end, and on Ctrl-C) resume exactly with
    --resume_from_checkpoint PATH or True (the latest in output_dir). Returns the run record.
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
    check_training_flags(locals())
    resume = prepare_output_dir(output_dir, resume_from_checkpoint, overwrite_output_dir)
    the_preset = resolve_preset(preset, base_model, trust_remote_code)
    template = load_template(prompt_template_name or the_preset.template)
    source = resolve_source(base_model)

    # data first: every record is validated before any weights are loaded
    records = load_records(data_path, data_format)
    if val_data_path:
        train_records, val_records = records, load_records(val_data_path, data_format)
    else:
        train_records, val_records = split_records(records, val_set_size, seed)

    tokenizer = load_tokenizer(source, the_preset, trust_remote_code)
    prompter = Prompter(template, tokenizer, the_preset, system_prompt)
    started = time.time()
    train_set, stats, hit = tokenize_cached(train_records, prompter, cutoff_len, train_on_inputs, add_eos_token)
    val_set, _, _ = tokenize_cached(val_records, prompter, cutoff_len, train_on_inputs, add_eos_token)
    print(f"tokenized {len(train_set) + len(val_set)} examples in {time.time() - started:.1f}s" + (" (cache)" * hit))
    if not train_set:
        raise UserError(f"{data_path}: every record is longer than --cutoff_len {cutoff_len} in its prompt alone")
    if stats.truncated or stats.dropped:
        print(f"cutoff_len {cutoff_len}: {stats.truncated} records truncated (eos kept), {stats.dropped} dropped")

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
    model = load_model(source, quantization, dtype, trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    lean = lean_settings(model.config, quantization, packing, gradient_checkpointing, chunked_ce)
    if lean["packing"]:
        use_packed_attention(model)
    targets = resolve_targets(model, lora_target_modules, the_preset)
    set_seed(seed)  # LoRA's A matrices are random: the same seed must give the same adapter
    model = attach_lora(
        model,
        targets,
        lora_r,
        lora_alpha,
        lora_dropout,
        quantized=quantization != "none",
        gradient_checkpointing=lean["gradient_checkpointing"],
    )
    model.print_trainable_parameters()

    trainer = _build_trainer(
        model,
        tokenizer,
        train_set,
        val_set,
        run_info=run_info,
        output_dir=output_dir,
        gradient_accumulation_steps=gradient_accumulation_steps,
        micro_batch_size=micro_batch_size,
        num_epochs=num_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        dtype=dtype,
        group_by_length=group_by_length,
        lean=lean,
        eval_steps=eval_steps,
        save_steps=save_steps,
        logging_steps=logging_steps,
        seed=seed,
        report_to="wandb" if wandb_project else report_to,
    )
    if wandb_project:
        os.environ["WANDB_PROJECT"] = wandb_project
    metrics: dict = {}
    if val_set and eval_before_training:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        print(f"held-out loss before training: {metrics['eval_loss_before']:.4f}")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics |= {"train_loss": result.training_loss, "steps": result.global_step, "seconds": time.time() - started}
    metrics |= trainer.throughput.summary()
    if val_set:
        metrics["eval_loss"] = final_eval_loss(trainer)
        print(f"held-out loss after training: {metrics['eval_loss']:.4f}")

    record = {
        "jalora_version": __version__,
        "base_model": base_model,
        "base_config": base_config_summary(model.config),
        "preset": the_preset.name,
        "template": template.name,
        "system_prompt": prompter.system_prompt,
        "quantization": quantization,
        "cutoff_len": cutoff_len,
        "train_on_inputs": train_on_inputs,
        "add_eos_token": add_eos_token,
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target_modules": targets},
        "hyperparameters": {
            "batch_size": batch_size,
            "micro_batch_size": micro_batch_size,
            "num_epochs": num_epochs,
            "max_steps": max_steps,
            "learning_rate": learning_rate,
            "warmup_steps": trainer.args.warmup_steps,
            "seed": seed,
            "dtype": str(dtype).removeprefix("torch."),
            "attention": model.config._attn_implementation,
            **lean,
        },
        "data": {
            "path": data_path,
            "val_path": val_data_path,
            "fingerprint": run_info["data_fingerprint"],
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            **asdict(stats),
        },
        "metrics": metrics,
        "losses": loss_curves(trainer.state.log_history, metrics.get("eval_loss_before")),
    }
    if trainer.is_world_process_zero():
        save_run(model, tokenizer, record, Path(output_dir))
    return record


def final_eval_loss(trainer) -> float:
    """Held-out loss of the trained adapter: the Trainer's own evaluation when it ran one at the
    last step (eval_steps dividing the step count), else a new one."""
    step = trainer.state.global_step
    done = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    return done[-1] if done else trainer.evaluate()["eval_loss"]


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


def _build_trainer(
    model,
    tokenizer,
    train_set,
    val_set,
    *,
    output_dir,
    gradient_accumulation_steps,
    micro_batch_size,
    num_epochs,
    max_steps,
    warmup_steps,
    dtype,
    group_by_length,
    lean,
    eval_steps,
    save_steps,
    logging_steps,
    run_info,
    **kwargs,
):
    from transformers import TrainingArguments

    examples_per_step = micro_batch_size * gradient_accumulation_steps * _world_size()
    steps_per_epoch = math.ceil(len(train_set) / examples_per_step)
    total_steps = max_steps if max_steps > 0 else math.ceil(steps_per_epoch * num_epochs)
    args = TrainingArguments(
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
    trainer = JaloraTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=PackCollator() if lean["packing"] else PadCollator(tokenizer.pad_token_id),
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
