"""Prefix caching, chunked prefill, logprobs, seeded sampling and the in-place KV-cache write,
each checked against transformers (CPU, float32) where there is a reference."""
import gc

import pytest
import torch
import vllm
from vllm import SamplingParams

import reference
from conftest import PROMPTS, model_maker

MAX_TOKENS = 32
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)

pytestmark = pytest.mark.usefixtures("in_process_engine")


def assert_greedy_matches(path, outputs, max_tokens=MAX_TOKENS):
    for output in outputs:
        prompt_ids = list(output.prompt_token_ids)
        expected, _ = reference.greedy(path, prompt_ids, max_tokens)
        assert list(output.outputs[0].token_ids) == expected, f"prompt of {len(prompt_ids)}"


@pytest.fixture(scope="module")
def llama(in_process_engine, model_dir):
    path = model_dir("LlamaForCausalLM")
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                   enable_prefix_caching=True)
    yield path, llm
    del llm
    gc.collect()


def test_prefix_caching_with_a_shared_prefix(llama):
    path, llm = llama
    sentences = model_maker.training_text(0)[3100:]
    prefix = " ".join(sentences[:7])  # about 90 tokens: five full 16-token blocks
    prompts = [prefix + " " + " ".join(sentences[10 + i: 11 + 2 * i]) for i in range(8)]
    first = llm.generate(prompts[:1], GREEDY)  # fills the cache with the prefix
    outputs = llm.generate(prompts, GREEDY)
    shared = min(len(reference.tokenize(path, prefix)), len(first[0].prompt_token_ids))
    for output in outputs:
        # Every request found the prefix's full blocks in the cache and only computed the rest
        # (attention over cached context: the chunked path of the MLX backend).
        assert output.num_cached_tokens >= (shared // 16 - 1) * 16 > 0
    assert_greedy_matches(path, outputs)
    again = llm.generate(prompts, GREEDY)  # fully cached prompts, except the last block
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]


def test_logprobs_match_transformers_log_softmax(llama):
    path, llm = llama
    params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0, logprobs=5,
                            prompt_logprobs=3)
    for output in llm.generate(PROMPTS[:4], params):
        prompt_ids = list(output.prompt_token_ids)
        _, logits = reference.greedy(path, prompt_ids, 8)
        expected = torch.log_softmax(logits, dim=-1)
        steps = output.outputs[0].logprobs
        assert len(steps) == 8
        for step, top in enumerate(steps):
            assert len(top) >= 5
            for token, logprob in top.items():
                assert abs(logprob.logprob - expected[step, token].item()) < 1e-4
        _, model = reference.load(path)
        with torch.no_grad():
            prompt_logits = model(torch.tensor([prompt_ids])).logits[0]
        expected_prompt = torch.log_softmax(prompt_logits, dim=-1)
        assert output.prompt_logprobs[0] is None
        for position, top in enumerate(output.prompt_logprobs[1:], start=1):
            for token, logprob in top.items():
                value = expected_prompt[position - 1, token].item()
                assert abs(logprob.logprob - value) < 1e-4


def test_seeded_sampling_reproduces(llama):
    _, llm = llama
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234)
    first = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    # Same seed in another run, with the batch in the opposite order: same samples.
    second = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[::-1], params)][::-1]
    assert first == second
    other = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=4321)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, other)] != first


def _record_cache_writes(worker):
    from vllm.model_executor.layers.attention import Attention

    from torch_mlx import _C

    worker.cache_writes = []
    for module in worker.model_runner.model.modules():
        if isinstance(module, Attention):
            # attend writes the step's keys/values, eagerly or while a compiled forward records
            # its MLX graph; the cache it is given is the buffer the write lands in
            impl, attend = module.impl, module.impl.attend

            def recorded(query, key, value, kv_cache, md, storage=None, attend=attend,
                         name=module.layer_name):
                worker.cache_writes.append((name, _C.buffer_address(kv_cache),
                                            md.num_actual_tokens))
                return attend(query, key, value, kv_cache, md, storage=storage)

            impl.attend = recorded
    return _cache_buffers(worker)


def _cache_writes(worker):
    return worker.cache_writes


def _cache_buffers(worker):
    from torch_mlx import _C

    return [_C.buffer_address(t) for t in worker.model_runner.kv_caches]


def test_kv_cache_is_written_in_place(llama):
    _, llm = llama
    before = llm.collective_rpc(_record_cache_writes)[0]
    llm.generate(PROMPTS, SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0))
    writes = llm.collective_rpc(_cache_writes)[0]
    assert llm.collective_rpc(_cache_buffers)[0] == before
    layers = sorted({name for name, *_ in writes})
    assert len(layers) == 2  # the tiny Llama's two attention layers
    for name in layers:
        buffers = [buffer for layer, buffer, _ in writes if layer == name]
        assert len(buffers) >= 4  # prefill, then one decode step per further token
        assert len(set(buffers)) == 1, f"{name}: the cache moved between steps"
        assert buffers[0] in before
    # A decode step writes one slot per running request, not the whole cache.
    assert min(n for *_, n in writes) <= len(PROMPTS)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_kv_write_by_in_place_scatter_matches_transformers(model_dir, monkeypatch,
                                                           enforce_eager):
    # The GPU's write path (VLLM_METAL_KV_WRITE=scatter, the default there), run here on MLX's
    # CPU backend: every write is an MLX scatter into the layer's own buffer (none falls back
    # to the row write), and the tokens are transformers'.
    from vllm_metal.ops import cache

    monkeypatch.setenv("VLLM_METAL_KV_WRITE", "scatter")
    path = model_dir("LlamaForCausalLM")
    before = dict(cache.WRITES)
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                   enforce_eager=enforce_eager)
    buffers = [_buffer(t) for t in llm.llm_engine.model_executor.driver_worker.worker
               .model_runner.kv_caches]
    assert len(set(buffers)) == len(buffers) == 2  # one allocation per layer
    assert_greedy_matches(path, llm.generate(PROMPTS, GREEDY))
    assert cache.WRITES["scatter"] > before["scatter"]
    assert cache.WRITES["rows"] == before["rows"]
    del llm
    gc.collect()


def _buffer(tensor):
    from torch_mlx import _C

    return _C.buffer_address(tensor)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM",
                                  "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_chunked_prefill_matches_transformers(arch, model_dir):
    # 32 tokens per step: every prompt past 32 tokens is prefilled in chunks, each attending to
    # the previous chunks through the cache, batched with other requests' decode steps. With
    # Mistral the chunks also cross its 40-token sliding window; with DeepSeek (MLA) each chunk
    # decompresses the earlier chunks' latent rows read from the cache.
    path = model_dir(arch)
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                   enable_chunked_prefill=True, max_num_batched_tokens=32)
    assert max(len(reference.tokenize(path, p)) for p in PROMPTS) > 4 * 32
    assert_greedy_matches(path, llm.generate(PROMPTS, GREEDY))
    del llm
    gc.collect()


@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_mla_chunks_and_prefix_hits_match_transformers(arch, model_dir):
    # MLA with three long prompts in 32-token steps (chunks of one request next to another's
    # decode, steps of odd sizes), then the same prompts again: prefix-cache hits, whose prefill
    # reads the cached latent rows.
    path = model_dir(arch)
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                   enable_prefix_caching=True, enable_chunked_prefill=True,
                   max_num_batched_tokens=32)
    prompts = PROMPTS[-3:]
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0)
    assert_greedy_matches(path, llm.generate(prompts, params), 16)
    again = llm.generate(prompts, params)
    assert all(o.num_cached_tokens >= 16 for o in again)
    assert_greedy_matches(path, again, 16)
    del llm
    gc.collect()
