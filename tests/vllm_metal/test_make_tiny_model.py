"""tools/make_tiny_model.py: deterministic, real-architecture checkpoints with a local tokenizer."""
import hashlib
import json
import os

import pytest
import transformers

from conftest import ARCHITECTURES, model_maker


def digest(path):
    return {name: hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(path))}


def test_same_seed_same_bytes(tmp_path, model_dir):
    again = model_maker.make_model("Qwen3ForCausalLM", str(tmp_path / "again"), seed=0)
    assert digest(again) == digest(model_dir("Qwen3ForCausalLM"))
    other = model_maker.make_model("Qwen3ForCausalLM", str(tmp_path / "other"), seed=1)
    assert digest(other)["model.safetensors"] != digest(again)["model.safetensors"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sizes_within_the_brief(arch):
    tokenizer = model_maker.build_tokenizer(0)
    ids = {t: tokenizer.token_to_id(t) for t in model_maker.SPECIAL_TOKENS}
    config = model_maker.make_config(arch, tokenizer.get_vocab_size(), ids)
    assert config.architectures == [arch]
    assert 256 <= config.hidden_size <= 512
    assert 2 <= config.num_hidden_layers <= 4
    assert config.vocab_size >= 1000


def test_files_and_chat_template(model_dir):
    path = model_dir("LlamaForCausalLM")
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert json.load(open(os.path.join(path, "config.json")))["dtype"] == "float32"


def test_olmo_hybrid_in_its_released_layout(model_dir):
    # separate q/k/v convs of the key, key and value widths, and the norm names released
    # checkpoints (and vLLM) use; transformers reads it back as the model made (make_model)
    from safetensors import safe_open

    path = os.path.join(model_dir("OlmoHybridForCausalLM"), "model.safetensors")
    with safe_open(path, "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    conv = "model.layers.0.linear_attn.{}_conv1d.weight"
    assert [shapes[conv.format(p)] for p in "qkv"] == [[64, 1, 4], [64, 1, 4], [256, 1, 4]]
    assert "model.layers.0.linear_attn.conv1d.weight" not in shapes
    assert {"model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.layers.2.post_feedforward_layernorm.weight"} <= set(shapes)
    assert not any("attention_layer_norm" in n or "feedforward_layer_norm" in n for n in shapes)
