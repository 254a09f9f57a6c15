"""`jalora export --format gguf`: the GGUF read back with gguf's reader holds the merged weights in
llama.cpp's layout, the tokenizer with the family's special ids, and a chat template that renders
the training prompt; the Modelfile's TEMPLATE is that prompt too; the LoRA GGUF holds B and A."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from test_export import random_adapter

from jalora.data.prompts import Prompter, load_template
from jalora.export.gguf import export, interleave_rope_rows
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import get_preset

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLAMA2_TOKENIZER = SHARED / "fixtures" / "real_tokenizers" / "llama2-elyza"
QUESTION = "日本で一番高い山は？"


def read_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors (dequantized, in transformers' shape order) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(data.reshape(list(reversed(t.shape.tolist()))).astype("float32"))
    return fields, tensors


def merged_state(adapter_dir: Path) -> tuple[dict, dict]:
    """(base, merged) state dicts in fp32, computed with peft directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    record = json.loads((adapter_dir / "jalora.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(record["base_model"], dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return base_state, merged.state_dict()


def prompter_of(adapter_dir: Path) -> Prompter:
    record = json.loads((adapter_dir / "jalora.json").read_text())
    preset = get_preset(record["preset"])
    tokenizer = load_tokenizer(resolve_source(record["base_model"]), preset)
    return Prompter(load_template(record["template"]), tokenizer, preset, record.get("system_prompt"))


def ollama_prompt(modelfile: str, system: str | None, user: str) -> str:
    """What Ollama renders from the Modelfile's TEMPLATE for one system prompt and one user message."""
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    return template.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", user)


@pytest.fixture(scope="module")
def llama3_export(tiny_model_dir, tmp_path_factory):
    """A llama3-elyza stand-in (byte-level BPE, chat template, 8-of-4 GQA layout) with a random adapter,
    exported merged (f16) and as a LoRA GGUF."""
    root = tmp_path_factory.mktemp("llama3_gguf")
    random_adapter(str(tiny_model_dir("llama3-elyza")), "llama3-elyza", "none", root / "run")
    merged = export(lora_weights=str(root / "run"), output_dir=str(root / "gguf"))
    lora = export(lora_weights=str(root / "run"), output_dir=str(root / "lora"), adapter_only=True)
    return root / "run", merged, lora


def test_gguf_holds_the_merged_weights_in_llama_cpp_layout(llama3_export):
    adapter_dir, path, _ = llama3_export
    fields, tensors = read_gguf(path)
    base, merged = merged_state(adapter_dir)
    config = json.loads(
        (Path(json.loads((adapter_dir / "jalora.json").read_text())["base_model"]) / "config.json").read_text()
    )
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert len(tensors) == len(merged)  # untied head: every parameter, none twice
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"] == 2
    assert fields["llama.rope.freq_base"] == 500000.0
    layer = "model.layers.1.self_attn."
    v, q, k = tensors["blk.1.attn_v.weight"], tensors["blk.1.attn_q.weight"], tensors["blk.1.attn_k.weight"]
    assert v.shape == merged[layer + "v_proj.weight"].shape
    torch.testing.assert_close(v, merged[layer + "v_proj.weight"], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(v, base[layer + "v_proj.weight"], atol=1e-2), "the adapter is not in the GGUF"
    torch.testing.assert_close(q, interleave_rope_rows(merged[layer + "q_proj.weight"], 4), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(k, interleave_rope_rows(merged[layer + "k_proj.weight"], 2), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(q, merged[layer + "q_proj.weight"], atol=1e-3), "q rows were not reordered for rope"
    torch.testing.assert_close(tensors["token_embd.weight"], merged["model.embed_tokens.weight"], atol=2e-3, rtol=0)
    assert tensors["blk.0.attn_norm.weight"].dtype == torch.float32


def test_gguf_carries_the_tokenizer_special_ids_and_chat_template(llama3_export):
    adapter_dir, path, _ = llama3_export
    fields, _ = read_gguf(path)
    prompter = prompter_of(adapter_dir)
    tokenizer = prompter.tokenizer
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer) == fields["llama.vocab_size"]
    assert fields["tokenizer.ggml.tokens"][:50] == tokenizer.convert_ids_to_tokens(list(range(50)))
    assert fields["tokenizer.ggml.merges"], "byte-level BPE without merges cannot tokenize"
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert fields["tokenizer.ggml.eos_token_id"] == eot != tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert fields["tokenizer.ggml.token_type"][eot] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.padding_token_id"] not in (eot, None)
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    modelfile = (Path(path).parent / "Modelfile").read_text()
    assert ollama_prompt(modelfile, prompter.system_prompt, QUESTION) == prompter.render(QUESTION)
    assert f'SYSTEM """{prompter.system_prompt}"""' in modelfile
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "PARAMETER temperature 0.6" in modelfile


def test_lora_gguf_holds_b_and_a_of_every_adapted_matrix(llama3_export):
    adapter_dir, merged_path, lora_path = llama3_export
    fields, lora = read_gguf(lora_path)
    _, merged_tensors = read_gguf(merged_path)
    base, _ = merged_state(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == config["lora_alpha"]
    assert len(lora) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    a, b = lora["blk.0.attn_q.weight.lora_a"], lora["blk.0.attn_q.weight.lora_b"]
    assert a.shape == (config["r"], 64) and b.shape == (64, config["r"])
    delta = b @ a * config["lora_alpha"] / config["r"]
    base_q = interleave_rope_rows(base["model.layers.0.self_attn.q_proj.weight"], 4)
    torch.testing.assert_close(base_q + delta, merged_tensors["blk.0.attn_q.weight"], atol=3e-3, rtol=3e-3)


@pytest.fixture(scope="module")
def llama2_base(tmp_path_factory) -> Path:
    """A tiny random Llama that uses the real Llama-2 SentencePiece tokenizer (ELYZA's -instruct config)."""
    if not LLAMA2_TOKENIZER.is_dir():
        pytest.skip(f"real tokenizer fixture {LLAMA2_TOKENIZER} is absent (it lives outside the repository)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    folder = tmp_path_factory.mktemp("elyza_llama2_real_tok")
    for item in LLAMA2_TOKENIZER.iterdir():
        shutil.copy(item, folder / item.name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("preset", ["elyza-llama2", "swallow"])  # templates llama2_ja and alpaca_ja
def test_chat_template_renders_the_training_prompt(llama2_base, tmp_path, preset):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    random_adapter(str(llama2_base), preset, "none", tmp_path / "run")
    path = export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "gguf"), outtype="q8_0")
    fields, tensors = read_gguf(path)
    prompter = prompter_of(tmp_path / "run")
    tokenizer = prompter.tokenizer
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.scores"]) == 32000
    assert fields["tokenizer.ggml.tokens"][1:3] == ["<s>", "</s>"] and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["general.file_type"] == 7  # MOSTLY_Q8_0
    template = ImmutableSandboxedEnvironment().from_string(fields["tokenizer.chat_template"])
    specials = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "add_generation_prompt": True}
    rendered = template.render(messages=[{"role": "user", "content": QUESTION}], **specials)
    assert rendered == "<s>" + prompter.render(QUESTION)
    if prompter.system_prompt:
        own = [{"role": "system", "content": "短く答えて。"}, {"role": "user", "content": QUESTION}]
        mine = Prompter(prompter.template, tokenizer, prompter.preset, "短く答えて。")
        assert template.render(messages=own, **specials) == "<s>" + mine.render(QUESTION)
    modelfile = (Path(path).parent / "Modelfile").read_text()
    assert ollama_prompt(modelfile, prompter.system_prompt, QUESTION) == prompter.render(QUESTION)
    assert 'PARAMETER stop "</s>"' in modelfile


def export_error(capsys, **kwargs) -> str:
    """The stderr of an export that must fail, after checking it is one `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        export(**kwargs)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_one_line_errors(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    random_adapter(str(tiny_model_dir("swallow")), "swallow", "none", run)
    # byte-fallback BPE in tokenizer.json only: llama.cpp's SentencePiece tokenizer needs tokenizer.model
    err = export_error(capsys, lora_weights=str(run), output_dir=str(tmp_path / "out"))
    assert "tokenizer.model not found" in err and not (tmp_path / "out").exists()

    random_adapter(str(tiny_model_dir("rinna")), "rinna", "none", tmp_path / "rinna")
    err = export_error(capsys, lora_weights=str(tmp_path / "rinna"), output_dir=str(tmp_path / "out"))
    assert "cannot be exported to GGUF" in err

    other = tmp_path / "mistral"
    shutil.copytree(tiny_model_dir("swallow"), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "mistral", "architectures": ["X"]}))
    err = export_error(capsys, lora_weights=str(run), output_dir=str(tmp_path / "out"), base_model=str(other))
    assert "model_type 'mistral' is not an architecture" in err

    rwkv = gguf.GGUFWriter(tmp_path / "rwkv.gguf", "rwkv6")  # an architecture transformers cannot dequantise
    rwkv.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    rwkv.write_header_to_file()
    rwkv.write_kv_data_to_file()
    rwkv.write_tensors_to_file()
    rwkv.close()
    err = export_error(
        capsys, lora_weights=str(run), output_dir=str(tmp_path / "out"), base_model=str(tmp_path / "rwkv.gguf")
    )
    assert "cannot read this GGUF base" in err and "--base_model" in err
