"""The run record (jalora.json) of a finished training run, built from finetune's flags and results."""

from __future__ import annotations

import math
from dataclasses import asdict

from jalora import __version__
from jalora.data.stages import PREFERENCE_STAGES
from jalora.evaluate.plots import loss_curves
from jalora.model.preflight import base_config_summary

DEFAULT_DPO_LOSS = "sigmoid"  # trl's DPOConfig default: the DPO paper's loss
# trl's held-out preference figures under the run record's names
PAIR_METRICS = {
    "eval_rewards/accuracies": "eval_reward_accuracy",
    "eval_rewards/margins": "eval_reward_margin",
    "eval_logps/chosen": "eval_logp_chosen",
    "eval_logps/rejected": "eval_logp_rejected",
}


def run_record(
    flags: dict, preset, prompter, model, trainer, lean: dict, lora: dict, train_set, val_set, stats, metrics: dict
) -> dict:
    """The run record (jalora.json): what was trained, on what, how, and how well."""
    stage = flags["stage"]
    preference = {"beta": flags["beta"]} if stage in PREFERENCE_STAGES else {}
    if stage == "dpo":
        preference["loss_type"] = flags["loss_type"] or DEFAULT_DPO_LOSS
    hyper = ("batch_size", "micro_batch_size", "num_epochs", "max_steps", "learning_rate")
    return {
        "jalora_version": __version__,
        "stage": stage,
        "base_model": flags["base_model"],
        "base_adapter": flags["base_adapter"],
        "base_config": base_config_summary(model.config),
        "preset": preset.name,
        "template": prompter.template.name,
        "system_prompt": prompter.system_prompt,
        "quantization": flags["quantization"],
        "cutoff_len": flags["cutoff_len"],
        "train_on_inputs": flags["train_on_inputs"],
        "add_eos_token": flags["add_eos_token"],
        "lora": lora,
        "hyperparameters": {
            **{name: flags[name] for name in hyper},
            "warmup_steps": trainer.args.warmup_steps,
            "seed": flags["seed"],
            "dtype": "bfloat16" if trainer.args.bf16 else "float16" if trainer.args.fp16 else "float32",
            "attention": model.config._attn_implementation,
            **lean,
            **preference,
        },
        "data": {
            "path": flags["data_path"],
            "val_path": flags["val_data_path"],
            "fingerprint": trainer.run_info["data_fingerprint"],
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            **asdict(stats),
        },
        "metrics": metrics,
        "losses": loss_curves(trainer.state.log_history, metrics.get("eval_loss_before")),
    }


def stage_metrics(stage: str, evaluation: dict) -> dict:
    """The held-out figures a stage reports: loss; perplexity for pt; for pairs, trl's reward
    accuracy and margin and the chosen-over-rejected log-probability margin (summed over reply tokens)."""
    metrics = {"eval_loss": evaluation["eval_loss"]}
    if stage == "pt":
        metrics["eval_perplexity"] = math.exp(evaluation["eval_loss"])
    if stage in PREFERENCE_STAGES:
        metrics |= {name: evaluation[key] for key, name in PAIR_METRICS.items() if key in evaluation}
        metrics["eval_logp_margin"] = metrics["eval_logp_chosen"] - metrics["eval_logp_rejected"]
    return metrics
