"""The CPU's LoRA dropout: the same Bernoulli mask and scaling as torch's, and it is what training uses."""

from __future__ import annotations

import torch
from torch import nn

from jalora.model.loading import attach_lora, load_model, resolve_source
from jalora.model.lora_dropout import IntegerMaskDropout


def test_drops_p_of_the_elements_and_scales_the_rest_like_torch():
    torch.manual_seed(0)
    p = 0.05
    dropout = IntegerMaskDropout(p).train()
    x = torch.ones(2000, 1000, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sigma  # torch.nn.Dropout drops the same share
    torch.testing.assert_close(y.unique(), torch.tensor([0.0, 1 / (1 - p)]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / (1 - p))
    assert torch.equal(dropout.eval()(x), x)
    torch.manual_seed(1)
    first = IntegerMaskDropout(p)(x)
    torch.manual_seed(1)
    assert torch.equal(IntegerMaskDropout(p)(x), first)  # the seed decides the mask, as for torch's


def test_lora_on_the_cpu_uses_it_and_the_adapter_config_keeps_the_dropout(tiny_model_dir, tmp_path):
    model = load_model(resolve_source(str(tiny_model_dir("elyza-llama2"))))
    model = attach_lora(model, ["q_proj", "v_proj"], 4, 8, 0.1, quantized=False)
    dropouts = [
        d
        for m in model.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
        for d in m.lora_dropout.values()
    ]
    assert dropouts and all(isinstance(d, IntegerMaskDropout) and d.p == 0.1 for d in dropouts)
    assert model.peft_config["default"].lora_dropout == 0.1
    plain = attach_lora(load_model(resolve_source(str(tiny_model_dir("elyza-llama2")))), ["q_proj"], 4, 8, 0.0, False)
    assert not any(isinstance(m, IntegerMaskDropout) for m in plain.modules())  # dropout 0 stays peft's Identity
