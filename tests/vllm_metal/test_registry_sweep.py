"""tools/registry_sweep.py's own logic (no engine): config shrinking and error categories."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("registry_sweep",
                                               ROOT / "tools" / "registry_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

TOKENS = {"<|bos|>": 1, "<|eos|>": 2, "<|pad|>": 0}


def test_shrink_uses_attribute_map_names():
    import transformers

    kwargs = sweep.shrink_kwargs(transformers.GPT2Config, 1024, TOKENS)
    config = transformers.GPT2Config(**kwargs)
    assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size) == (128, 2, 4, 1024)
    assert config.eos_token_id == 2


def test_shrink_never_grows_a_field_and_keeps_layer_kinds():
    import transformers

    # Gemma 3: layer_types rebuilt for the new layer count by the config itself
    config = transformers.Gemma3TextConfig(**sweep.shrink_kwargs(transformers.Gemma3TextConfig,
                                                                 1024, TOKENS))
    assert config.num_hidden_layers == len(config.layer_types) >= 2
    assert config.sliding_window == 32


@pytest.mark.parametrize("text,category", [
    ("Traceback ...\nNotImplementedError: no mlx lowering for aten::_weird_op.default",
     "missing lowering: aten._weird_op.default"),
    ("Traceback ...\nNotImplementedError: attention logit soft-capping is not supported on mlx",
     "unsupported attention: attention logit soft-capping"),
    ("Traceback ...\nNotImplementedError: attention options not supported on mlx: {'sinks': None}",
     "unsupported attention: attention options: sinks=None"),
    ("Traceback ...\nNotImplementedError: MLA attention is not supported on mlx",
     "unsupported attention: MLA"),
    ("Traceback ...\nAttributeError: 'XConfig' object has no attribute 'y'",
     "config field vLLM reads is absent from transformers' config"),
    ("Traceback ...\nValueError: bad thing happened", "ValueError: bad thing happened"),
])
def test_categorize(text, category):
    assert sweep.categorize(text) == category


def test_glm4_moe_lite_gets_first_k_dense_replace_from_its_layer_list():
    import transformers

    config = transformers.Glm4MoeLiteConfig(**sweep.shrink_kwargs(
        transformers.Glm4MoeLiteConfig, 1024, TOKENS))
    assert "first_k_dense_replace" in sweep.add_compat_fields(config)
    assert config.first_k_dense_replace == config.mlp_layer_types.index("sparse")
    assert sweep._leading_dense(["dense", "dense", "sparse"]) == 2
    with pytest.raises(ValueError, match="cannot describe"):
        sweep._leading_dense(["dense", "sparse", "dense"])


def test_zamba2_attention_sizes_stay_derived():
    # vLLM's Zamba2 attention requires heads x attention_head_dim == attention_hidden_size and
    # as many key/value heads as query heads
    import transformers

    config = transformers.Zamba2Config(**sweep.shrink_kwargs(transformers.Zamba2Config, 1024,
                                                             TOKENS))
    assert config.num_attention_heads * config.attention_head_dim == \
        config.attention_hidden_size == 2 * config.hidden_size
    assert config.num_key_value_heads == config.num_attention_heads
