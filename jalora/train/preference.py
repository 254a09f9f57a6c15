"""DPO and ORPO on trl's own trainers, fed the ids jalora tokenized (jalora/data/preference.py).

trl tokenizes prompt/chosen/rejected text itself, with its own rules for BOS, eos and the
prompt/reply boundary; jalora's SFT tokenizer already produced ids that follow the project's
token rules, so the trainers here take those ids and skip trl's text tokenization. Everything
else (losses, reference log-probs, metrics) is trl's. Checkpoints are jalora's whole-or-nothing
ones (jalora/train/checkpoints.py), and a NaN/inf loss stops the run as in SFT.

The reference model of DPO is the policy DPO starts from, without a second copy of the model:
with a fresh adapter that is the base with the adapter switched off; with --base_adapter (SFT →
DPO) trl keeps a frozen copy of the starting adapter's LoRA weights (a few MB) as "ref".
"""

from __future__ import annotations

import os

from datasets import Dataset

from jalora.train.checkpoints import CheckpointingTrainer
from jalora.train.nan_guard import NanGuarded

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental; its notice is noise here

from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

REF_ADAPTER = "ref"


class _GuardedPreferenceTrainer(NanGuarded, CheckpointingTrainer):
    """What jalora adds to a trl preference trainer: the NaN guard, checkpoints and no telemetry call."""

    def _send_telemetry(self) -> None:
        """trl pings the Hugging Face Hub when a trainer is built; a local fine-tuning run sends nothing."""

    def create_model_card(self, *args, **kwargs) -> None:
        """trl writes its card at every checkpoint; the adapter's card is jalora's, written with the run record."""


class JaloraDPOTrainer(_GuardedPreferenceTrainer, DPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """The rows already hold prompt_ids / chosen_ids / rejected_ids (trl's own tokenized form)."""
        return dataset


class JaloraORPOTrainer(_GuardedPreferenceTrainer, ORPOTrainer):
    def tokenize_row(self, feature, model=None) -> dict:
        """jalora's ids laid out as ORPO's collator takes them; the prompt is masked out of the labels."""
        prompt, row = feature["prompt_ids"], {"prompt_input_ids": feature["prompt_ids"]}
        row["prompt_attention_mask"] = [1] * len(prompt)
        for side in ("chosen", "rejected"):
            ids = prompt + feature[f"{side}_ids"]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
        return row


def config_class(stage: str) -> type:
    """trl's training arguments of the stage (TrainingArguments plus beta, loss_type, ...)."""
    return ORPOConfig if stage == "orpo" else DPOConfig


def build_preference_trainer(
    stage: str, model, tokenizer, train_set, val_set, args, run_info: dict, fresh_adapter: bool
):
    """trl's DPO or ORPO trainer on jalora's tokenized pairs; `args` is a DPOConfig / ORPOConfig."""
    train, val = Dataset.from_list(train_set), Dataset.from_list(val_set) if val_set else None
    if stage == "orpo":
        return JaloraORPOTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer, run_info=run_info
        )
    trainer = JaloraDPOTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer, run_info=run_info
    )
    if fresh_adapter and REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)  # a fresh adapter's copy is the base itself: switch the adapter off instead
    return trainer


def drop_reference_adapter(model) -> None:
    """The adapter saved is the trained one only."""
    if REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)
