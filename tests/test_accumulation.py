"""Gradient accumulation is exact through jalora's Trainer: micro-batch 2 × 4 accumulation steps
gives the loss and LoRA gradients of micro-batch 8 × 1, padded or packed, and both equal the
token-mean loss computed directly from the model."""

from __future__ import annotations

import pytest
import torch
from test_packing import sample_examples
from transformers import TrainerCallback

from jalora.data.records import IGNORE_INDEX
from jalora.model.loading import attach_lora, load_model, load_tokenizer, resolve_source
from jalora.model.packed_attention import use_packed_attention
from jalora.presets import get_preset
from jalora.train.trainer import _build_trainer


class GradSnapshot(TrainerCallback):
    """The LoRA gradients of the first optimizer step, just before the optimizer uses them."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}


def lora_model(model_dir):
    torch.manual_seed(0)  # the same LoRA A init in every run
    model = attach_lora(load_model(resolve_source(str(model_dir))), ["q_proj", "v_proj"], 4, 8, 0.0, quantized=False)
    with torch.no_grad():  # non-zero B so that the A matrices get gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def one_step(model_dir, examples, tmp_path, micro: int, accumulation: int, packing: bool, supervised_head: bool):
    model = lora_model(model_dir)
    if packing:
        use_packed_attention(model)
    tokenizer = load_tokenizer(resolve_source(str(model_dir)), get_preset("elyza-llama2"))
    trainer = _build_trainer(
        model,
        tokenizer,
        examples,
        [],
        output_dir=str(tmp_path / f"{micro}x{accumulation}"),
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_epochs=1,
        max_steps=1,
        learning_rate=1e-3,
        warmup_steps=0,
        dtype=torch.float32,
        group_by_length=False,
        run_info={},
        lean={
            "packing": packing,
            "gradient_checkpointing": False,
            "supervised_head": supervised_head,
            "chunked_ce": False,
        },
        eval_steps=10,
        save_steps=10,
        logging_steps=1,
        seed=0,
        report_to="none",
    )
    trainer.args.max_grad_norm = 0.0  # clipping would hide a wrong gradient scale
    snapshot = GradSnapshot(model)
    trainer.add_callback(snapshot)
    loss = trainer.train().training_loss
    return loss, snapshot.grads


def direct_loss(model_dir, examples) -> float:
    """Sum of every supervised token's loss over all 8 examples, divided by their count."""
    model = lora_model(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(e["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((targets != IGNORE_INDEX).sum())
    return float(total / count)


@pytest.mark.parametrize(
    "packing, supervised_head", [(False, False), (True, True)], ids=["padded-model-loss", "packed-supervised-head"]
)
def test_micro_2_by_4_equals_micro_8_by_1(tiny_model_dir, tmp_path, packing, supervised_head):
    model_dir = tiny_model_dir("elyza-llama2")
    examples = sample_examples(model_dir, "elyza-llama2", 8, train_on_inputs=False)
    supervised = [sum(t != IGNORE_INDEX for t in e["labels"]) for e in examples]
    assert len(set(supervised)) > 1  # unequal lengths: a per-micro-batch mean would differ

    loss_8, grads_8 = one_step(model_dir, examples, tmp_path, 8, 1, packing, supervised_head)
    loss_2, grads_2 = one_step(model_dir, examples, tmp_path, 2, 4, packing, supervised_head)
    assert loss_2 == pytest.approx(loss_8, rel=1e-5)
    assert loss_8 == pytest.approx(direct_loss(model_dir, examples), rel=1e-5)
    assert grads_8 and grads_8.keys() == grads_2.keys()
    assert any("lora_A" in n for n in grads_8) and all(g.abs().sum() > 0 for g in grads_8.values())
    for name, grad in grads_8.items():
        torch.testing.assert_close(grads_2[name], grad, atol=1e-6, rtol=1e-4, msg=name)
