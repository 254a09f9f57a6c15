"""The supervised-head loss shortcut runs under the same mixed precision as the Trainer's forward.

accelerate wraps `model.forward` in autocast; the shortcut calls the decoder directly. On the CPU
torch's autocast runs bf16, so `--bf16 True` shows here what a GPU run does: with fp32 weights (as
after prepare_model_for_kbit_training) a base linear must compute in bf16 on both paths.
"""

from __future__ import annotations

import pytest
import torch
from test_packing import sample_examples
from transformers import TrainingArguments

from jalora.data.collate import PadCollator
from jalora.model.loading import attach_lora, load_model, resolve_source
from jalora.train.lean_trainer import LeanTrainer


def one_bf16_step(model_dir, tmp_path, supervised_head: bool) -> tuple[set[torch.dtype], float]:
    """dtypes a base q_proj produced in one bf16 training step, and that step's loss."""
    torch.manual_seed(0)
    model = attach_lora(load_model(resolve_source(str(model_dir))), "all-linear", 4, 8, 0.0, quantized=False)
    dtypes: set[torch.dtype] = set()
    q_proj = next(m for name, m in model.named_modules() if name.endswith("q_proj.base_layer"))
    q_proj.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"head-{supervised_head}"),
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        bf16=True,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = LeanTrainer(
        model=model,
        args=args,
        train_dataset=sample_examples(model_dir, "qwen2.5", 4, train_on_inputs=False),
        data_collator=PadCollator(pad_token_id=0),
        supervised_head=supervised_head,
    )
    return dtypes, trainer.train().training_loss


def test_shortcut_runs_under_the_trainers_autocast(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2.5")
    normal_dtypes, normal_loss = one_bf16_step(model_dir, tmp_path, supervised_head=False)
    shortcut_dtypes, shortcut_loss = one_bf16_step(model_dir, tmp_path, supervised_head=True)
    assert normal_dtypes == {torch.bfloat16}
    assert shortcut_dtypes == normal_dtypes
    assert shortcut_loss == pytest.approx(normal_loss, rel=2e-2)
