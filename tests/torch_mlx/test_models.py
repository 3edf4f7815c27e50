"""transformers models moved with model.to("mlx") give the CPU's outputs (float32, max abs 1e-4).

Random-initialised models from small configs: nothing is downloaded. The CPU model and the
"mlx" model are the same weights (a deep copy moved to the device), fed the same inputs,
including a left-padded batch so that the attention-mask paths run.
"""
import copy

import pytest
import torch
import transformers

MAX_ABS_ERROR = 1e-4


def _tiny_llama(attn_implementation: str) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_bert(attn_implementation: str) -> transformers.BertModel:
    config = transformers.BertConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _inputs(vocab_size: int, batch: int = 3, length: int = 12) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch >= 3:
        mask[1, :4] = 0  # left padding in two rows, none in the first
        mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _on(device: str, inputs: dict) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _assert_close_to_cpu(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.device.type == "mlx", f"{what} came back on {actual.device}"
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual = actual.cpu()
    assert torch.isfinite(expected).all()
    err = (actual - expected).abs().max().item()
    assert err <= MAX_ABS_ERROR, f"{what}: max abs error {err:.3g} > {MAX_ABS_ERROR}"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_llama_for_causal_lm_logits_match_cpu(attn_implementation):
    model = _tiny_llama(attn_implementation)
    inputs = _inputs(model.config.vocab_size)
    with torch.no_grad():
        expected = model(**inputs).logits
        device_model = copy.deepcopy(model).to("mlx")
        assert all(p.device.type == "mlx" for p in device_model.parameters())
        actual = device_model(**_on("mlx", inputs)).logits
    _assert_close_to_cpu(actual, expected, f"LlamaForCausalLM ({attn_implementation}) logits")


def test_llama_greedy_generation_matches_cpu():
    """generate() adds the KV cache, position bookkeeping and argmax on top of the forward."""
    model = _tiny_llama("sdpa")
    with torch.no_grad():  # at the default init the next-token distribution is nearly flat and
        model.lm_head.weight.mul_(30)  # float noise could flip a greedy pick: sharpen it
    prompt = _inputs(model.config.vocab_size, batch=1, length=8)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**prompt, **kwargs)
        actual = copy.deepcopy(model).to("mlx").generate(**_on("mlx", prompt), **kwargs)
    assert actual.device.type == "mlx"
    assert actual.cpu().tolist() == expected.tolist()


def test_llama_compiled_static_cache_generation_matches_cpu():
    """transformers' compiled decoding (a static KV cache, one captured graph a step) on
    torch.compile(backend="mlx"): the cache's index_copy_ is written inside the graph; two
    generations in a row check that the cache is reset and reused. Every decode step reuses
    one graph: the step's input_ids, ``clone(memory_format=contiguous_format)`` of a slice of
    the growing sequence, must have torch's strides, or dynamo recompiles at each step until
    its limit and then runs the model eagerly."""
    from torch._dynamo.utils import counters
    from transformers.generation import CompileConfig

    model = _tiny_llama("sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    prompt = _inputs(model.config.vocab_size, batch=1, length=8)
    config = CompileConfig(backend="mlx")  # mode "reduce-overhead", fullgraph, not dynamic
    config._compile_all_devices = True  # transformers compiles on its own list of devices only
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**prompt, **kwargs)
        device_model = copy.deepcopy(model).to("mlx")
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(2):
            actual = device_model.generate(**_on("mlx", prompt), cache_implementation="static",
                                           compile_config=config, **kwargs)
            assert actual.cpu().tolist() == expected.tolist()
    assert counters["stats"]["unique_graphs"] - graphs == 1


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_bert_model_outputs_match_cpu(attn_implementation):
    model = _tiny_bert(attn_implementation)
    inputs = _inputs(model.config.vocab_size)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    with torch.no_grad():
        expected = model(**inputs)
        actual = copy.deepcopy(model).to("mlx")(**_on("mlx", inputs))
    _assert_close_to_cpu(actual.last_hidden_state, expected.last_hidden_state,
                         f"BertModel ({attn_implementation}) last_hidden_state")
    _assert_close_to_cpu(actual.pooler_output, expected.pooler_output,
                         f"BertModel ({attn_implementation}) pooler_output")
