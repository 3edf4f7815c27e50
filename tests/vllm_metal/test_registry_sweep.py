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


@pytest.mark.parametrize("name", ["DeepseekV32Config", "GlmMoeDsaConfig"])
def test_sparse_mla_configs_select_fewer_tokens_than_the_prompts(name):
    import transformers

    config_cls = getattr(transformers, name)
    config = config_cls(**sweep.shrink_kwargs(config_cls, 1024, TOKENS))
    assert config.index_topk == 8 < 16  # the shortest prompt: the selection is exercised
    assert config.index_head_dim > config.qk_rope_head_dim
    added = sweep.add_compat_fields(config)
    assert (config.topk_method, config.scoring_func) == ("noaux_tc", "sigmoid")
    assert ("indexer_rope_interleave" in added) == (name == "GlmMoeDsaConfig")


def test_hy_v3_gets_the_tencent_config_names():
    import transformers

    config = transformers.HYV3Config(**sweep.shrink_kwargs(transformers.HYV3Config, 1024, TOKENS))
    added = sweep.add_compat_fields(config)
    assert set(added) == {"first_k_dense_replace", "expert_hidden_dim", "qk_norm", "route_norm"}
    assert config.first_k_dense_replace == config.mlp_layer_types.index("sparse") == 1
    assert config.expert_hidden_dim == config.moe_intermediate_size
    # transformers' HYV3Attention always has q_norm/k_norm; vLLM's defaults qk_norm to False
    model = transformers.HYV3ForCausalLM(config)
    assert hasattr(model.model.layers[0].self_attn, "q_norm") and config.qk_norm is True


def test_axk1_checkpoint_gets_the_dense_layers_unused_post_mlp_norm(tmp_path):
    import torch
    import transformers
    from safetensors.torch import load_file

    config = transformers.AXK1Config(**sweep.shrink_kwargs(transformers.AXK1Config, 1024, TOKENS))
    assert config.first_k_dense_replace == 1 and config.num_hidden_layers == 2
    model = transformers.AXK1ForCausalLM(config)
    # transformers' AXK1 keeps the norm inside its MoE block: none in the dense layer 0
    assert not any("layers.0." in n and "post_mlp_layernorm" in n for n, _ in
                   model.named_parameters())
    model.save_pretrained(tmp_path)
    assert sweep.add_compat_weights(config, str(tmp_path)) == [
        "model.layers.0.post_mlp_layernorm.weight"]
    tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(tensors["model.layers.0.post_mlp_layernorm.weight"], torch.ones(128))
    assert "model.layers.1.post_mlp_layernorm.weight" in tensors  # the MoE layer's, saved as is
    assert sweep.add_compat_weights(config, str(tmp_path)) == []  # present: left alone


def test_hy_v4_checkpoint_in_the_released_names(tmp_path):
    import transformers
    from safetensors import safe_open

    kwargs = dict(sweep.shrink_kwargs(transformers.HYV4Config, 1024, TOKENS),
                  **sweep.SHRINK_OVERRIDES["HYV4Config"])
    config = transformers.HYV4Config(**kwargs)
    # one rotary pair: transformers' half-split and vLLM's interleaved RoPE are the same function
    assert config.qk_rope_head_dim == 2
    assert config.indexer_types == ["full", "shared"]  # a layer reusing the other's selection
    model = transformers.HYV4ForCausalLM(config)
    sweep._model_maker().save_model(model, "HYV4ForCausalLM", str(tmp_path))  # checks load-back
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for i in range(2):
        for block in ("attn", "mlp"):
            assert {f"model.layers.{i}.hc_{block}_layer.hc_pre.hc_{p}"
                    for p in ("fn", "base", "scale")} <= names
        assert {f"model.layers.{i}.self_attn.linear_gate.weight",
                f"model.layers.{i}.self_attn.learnable_sink_param"} <= names
    assert {f"model.hc_head.hc_head_{p}" for p in ("fn", "base", "scale")} <= names
    assert {"model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.mlp.shared_experts.gate_proj.weight"} <= names
    assert not [n for n in names if "hc_pre.hc_head" in n or ".attn_hc." in n
                or ".ffn_hc." in n or "mlp.linear_gate" in n or "experts.linear_gate" in n]


def test_deepseek_v4_config_json_in_the_released_format(tmp_path):
    import json

    import transformers

    config = transformers.DeepseekV4Config(**sweep.shrink_kwargs(transformers.DeepseekV4Config,
                                                                 1024, TOKENS))
    assert config.mlp_layer_types == ["hash_moe", "moe"]
    config.save_pretrained(tmp_path)
    assert sweep.rewrite_config_json(config, str(tmp_path))  # raises if it loads back different
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"layer_types", "mlp_layer_types", "compress_rates"} & set(saved)
    assert saved["num_hash_layers"] == 1
    assert saved["compress_ratios"] == [{"heavily_compressed_attention": 128,
                                         "compressed_sparse_attention": 4}[t]
                                        for t in config.layer_types]
    with pytest.raises(ValueError, match="num_hash_layers cannot describe"):
        sweep._deepseek_v4_released_format(dict(
            compress_rates={}, layer_types=[], mlp_layer_types=["moe", "hash_moe"]))


def test_inkling_tokenizer_gets_the_chat_special_tokens_vllm_resolves():
    from vllm.renderers.inkling_encoding import SPECIAL_TOKEN_SPELLINGS

    ours = set(sweep.TOKENIZER_SPECIAL_TOKENS["InklingForCausalLM"])
    assert all(ours & set(spellings) for spellings in SPECIAL_TOKEN_SPELLINGS.values())
    maker = sweep._model_maker()
    tokenizer = maker.build_tokenizer(0)
    before = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(sorted(ours))
    assert tokenizer.get_vocab_size() == before + len(ours)  # none of them was there
    assert tokenizer.encode("Hello, how are you today?").ids == \
        maker.build_tokenizer(0).encode("Hello, how are you today?").ids


def test_arch_causes_label_only_the_error_they_describe():
    tail = "Traceback ...\nAttributeError: 'InklingTextConfig' object has no attribute 'x'"
    r = dict(arch="InklingForCausalLM", status="error", stage="engine", traceback_tail=tail)
    sweep.recategorize(r)
    assert r["category"] == sweep.ARCH_CAUSES["InklingForCausalLM"][1]
    r = dict(r, traceback_tail="Traceback ...\nValueError: something else")
    sweep.recategorize(r)
    assert r["category"] == "ValueError: something else"


def test_zamba2_attention_sizes_stay_derived():
    # vLLM's Zamba2 attention requires heads x attention_head_dim == attention_hidden_size and
    # as many key/value heads as query heads
    import transformers

    config = transformers.Zamba2Config(**sweep.shrink_kwargs(transformers.Zamba2Config, 1024,
                                                             TOKENS))
    assert config.num_attention_heads * config.attention_head_dim == \
        config.attention_hidden_size == 2 * config.hidden_size
    assert config.num_key_value_heads == config.num_attention_heads


@pytest.mark.parametrize("arch,last_line", [
    ("KimiLinearForCausalLM", "RuntimeError: torch.cuda.Stream requires CUDA support"),
    ("OlmoHybridForCausalLM", '    dim = dims[loaded_shard_id]\n'
                              'TypeError: list indices must be integers or slices, not NoneType'),
])
def test_gated_delta_net_models_errors_are_named(arch, last_line):
    r = dict(arch=arch, status="error", stage="engine",
             traceback_tail=f"Traceback ...\n{last_line}")
    sweep.recategorize(r)
    assert r["category"] == sweep.ARCH_CAUSES[arch][1]


def _composite(config_cls):
    """config_cls shrunk as the sweep does, with ids for the multimodal tokens it needs."""
    tokens = sweep.multimodal_tokens(config_cls)
    ids = dict(TOKENS, **{t: 1024 + i for i, t in enumerate(tokens)})
    return config_cls(**sweep.shrink_kwargs(config_cls, 1024 + len(tokens), ids)), ids


@pytest.mark.parametrize("name", ["CLIPConfig", "SiglipConfig", "ColPaliConfig",
                                  "LlavaNextConfig", "Qwen2VLConfig"])
def test_composite_configs_are_shrunk_in_every_sub_config(name):
    # the full-size defaults (Qwen2-VL's 72B text model, LLaVA's 7B) were killed for memory
    import transformers

    config, _ = _composite(getattr(transformers, name))
    vlm = getattr(config, "vlm_config", config)  # ColPali nests PaliGemma
    text, vision = vlm.get_text_config(), vlm.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (128, 2, 1024 + len(
        sweep.multimodal_tokens(type(config))))
    assert getattr(vision, "num_hidden_layers", getattr(vision, "depth", None)) == 2
    if hasattr(vision, "image_size"):
        assert (vision.image_size, vision.patch_size) == (32, 8)
    # vLLM's dual encoders pad text embeddings to the projection width (no wider than it)
    width = getattr(config, "projection_dim", None) or getattr(text, "projection_size", None)
    assert width in (None, text.hidden_size)


def test_multimodal_token_ids_are_in_the_vocabulary():
    import transformers

    config, ids = _composite(transformers.Qwen2VLConfig)
    assert config.image_token_id == ids["<|image_pad|>"] < config.text_config.vocab_size
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    config, ids = _composite(transformers.LlavaNextConfig)
    assert sweep.multimodal_tokens(transformers.LlavaNextConfig) == ["<image>"]
    assert config.image_token_id == ids["<image>"] < config.text_config.vocab_size


def test_qwen2_vl_mrope_sections_fill_the_shrunk_heads():
    import transformers

    config, _ = _composite(transformers.Qwen2VLConfig)
    text = config.text_config
    section = text.rope_parameters["mrope_section"]
    assert sum(section) == text.hidden_size // text.num_attention_heads // 2
    assert config.vision_config.hidden_size == text.hidden_size  # the merger's output width


def test_llava_next_pinpoints_are_multiples_of_the_tile():
    import transformers

    config, _ = _composite(transformers.LlavaNextConfig)
    size = config.vision_config.image_size
    assert all(h % size == 0 and w % size == 0 for h, w in config.image_grid_pinpoints)
    assert config.image_seq_length == (size // config.vision_config.patch_size) ** 2


def test_clip_tokenizer_keeps_token_zero_ordinary():
    # vLLM's CLIP processor uses token id 0 as its image placeholder and asserts it is not special
    maker = sweep._model_maker()
    last = maker.build_tokenizer(0, specials_last=True)
    assert last.get_vocab_size() == maker.build_tokenizer(0).get_vocab_size()
    assert last.id_to_token(0) not in maker.SPECIAL_TOKENS
    assert [last.token_to_id(t) for t in maker.SPECIAL_TOKENS] == list(
        range(last.get_vocab_size() - len(maker.SPECIAL_TOKENS), last.get_vocab_size()))


def test_colpali_deviation_reference_is_the_bias_free_projection():
    import torch
    import transformers

    config, _ = _composite(transformers.ColPaliConfig)
    model = transformers.ColPaliForRetrieval(config).eval()
    ids = torch.tensor([[5, 17, 99, 300]])
    _, as_vllm = sweep.VLLM_MODEL_DEVIATIONS["ColPaliForRetrieval"]
    with torch.no_grad():
        model.embedding_proj_layer.bias.zero_()
        want = sweep.POOLING_REFERENCES["ColPaliForRetrieval"](model, ids)
        torch.testing.assert_close(as_vllm(model, ids), want)
