"""The MLX paged-attention backend against plain attention over contiguous keys (torch, CPU).

A batch mixes decode requests (one new token) with prefills that have earlier context in the
cache (chunked prefill / prefix-cache hits) and prefills without; blocks are scattered over the
cache in random order. Covers MHA, GQA and MQA, sliding windows and both KV-cache layouts.
Encoder-only attention (BERT-style): packed sequences attend bidirectionally within themselves,
with no cache, against the same plain attention without the causal mask.
"""
import math

import numpy as np
import pytest
import torch

import torch_mlx
from vllm.v1.attention.backend import AttentionType

from vllm_metal.attention import backend
from vllm_metal.attention.backend import MLXAttentionMetadata
from vllm_metal.attention.impl import MLXAttentionImpl
from vllm_metal.ops.cache import write_kv_slots

BLOCK_SIZE = 16


def reference_attention(q, k, v, scale, window, causal=True, sinks=None, alibi=None):
    """q [L, Hq, D] at the last L of S positions; k/v [S, H, D]; causal (+ window), or
    bidirectional (+ symmetric window: |q - k| < window, vLLM's encoder-only convention).
    sinks [Hq]: one more logit in each softmax denominator (gpt-oss); alibi [Hq]: slopes, the
    bias slope * (k - q) added to the scaled scores (Bloom, MPT)."""
    num_queries, num_keys = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(num_keys - num_queries, num_keys)[:, None]
    k_pos = torch.arange(num_keys)[None, :]
    if causal:
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
    else:
        allowed = torch.ones(num_queries, num_keys, dtype=torch.bool)
        if window is not None:
            allowed &= (k_pos - q_pos).abs() < window
    if alibi is not None:
        scores = scores + alibi[:, None, None] * (k_pos - q_pos)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    sink = sinks[:, None, None].expand(-1, num_queries, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return torch.einsum("hqk,khd->qhd", probs, v)


def make_cache(num_blocks, heads, head_size, layout):
    shape = (num_blocks, heads, BLOCK_SIZE, 2 * head_size)
    if layout == "LBNHC":  # token-major blocks: physical [B, N, H, C], logical [B, H, N, C]
        return torch.zeros(num_blocks, BLOCK_SIZE, heads, 2 * head_size,
                           device="mlx").transpose(1, 2)
    return torch.zeros(shape, device="mlx")


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (8, 2, None), (8, 1, None),
                                                   (8, 2, 20)])
def test_mixed_batch_matches_reference(layout, heads, kv_heads, window):
    check_mixed_batch(layout, heads, kv_heads, window)


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("heads,kv_heads,window", [(8, 2, None), (8, 1, 20)])
@pytest.mark.parametrize("decodes,consecutive,uniform", [
    (1, False, False), (1, True, False), (3, False, False), (3, True, False), (3, False, True)])
def test_gpu_decode_path_matches_reference(layout, heads, kv_heads, window, decodes,
                                           consecutive, uniform, monkeypatch):
    """The GPU's decode attention, run on MLX's CPU by taking the GPU branch: one request
    through mx.fast.scaled_dot_product_attention over its blocks (read in place when they are
    consecutive, else gathered) cut to its length and window; several of one length
    (``uniform``) the same way over their gathered blocks; several of different lengths through
    the written-out path under the decode mask."""
    from vllm_metal.attention import impl, paged

    monkeypatch.setattr(impl, "cpu_backend", lambda: False)
    fused, gather = impl.fused_decode_attention, paged.gather_kv
    calls, gathers = [], []
    monkeypatch.setattr(impl, "fused_decode_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setattr(paged, "gather_kv", lambda *a, **k: gathers.append(1) or gather(*a, **k))
    check_mixed_batch(layout, heads, kv_heads, window, num_decodes=decodes,
                      consecutive=consecutive, uniform=uniform)
    assert len(calls) == (1 if decodes == 1 or uniform else 0)
    if decodes == 1:  # the lone decode's keys: a slice of the cache when its blocks allow
        assert len(gathers) == (0 if consecutive else 1)


def place_requests(requests, num_blocks: int, gen: torch.Generator, consecutive=False):
    """Random distinct cache blocks for each (context, new) request, block 0 left as vLLM's null
    block: the block table [requests, width] and each request's slot of every position.
    ``consecutive``: the first request's blocks are b, b + 1, ... (the rest still random)."""
    free = torch.randperm(num_blocks - 1, generator=gen) + 1
    if consecutive:
        run = torch.arange(9, 9 + math.ceil(sum(requests[0]) / BLOCK_SIZE))
        free = torch.cat([run, free[~torch.isin(free, run)]])
    else:  # the shuffle must not make them consecutive by chance
        first = free[:math.ceil(sum(requests[0]) / BLOCK_SIZE)]
        assert len(first) < 2 or not bool((first.diff() == 1).all())
    width = max(math.ceil((c + n) / BLOCK_SIZE) for c, n in requests)
    block_table = torch.zeros(len(requests), width, dtype=torch.int32)
    slots = []
    for r, (context, new) in enumerate(requests):
        blocks = free[:math.ceil((context + new) / BLOCK_SIZE)]
        free = free[len(blocks):]
        block_table[r, : len(blocks)] = blocks.to(torch.int32)
        positions = torch.arange(context + new)
        slots.append(blocks[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE)
    return block_table, slots


def check_mixed_batch(layout, heads, kv_heads, window, sinks=None, alibi=None, num_decodes=3,
                      consecutive=False, uniform=False):
    gen = torch.Generator().manual_seed(0)
    head_size = 32
    # (context already cached, new tokens): the decodes first, as vLLM orders the batch.
    requests = [(37, 1), (5, 1), (64, 1), (0, 23), (40, 9), (17, 30), (0, 1)]
    requests = requests[3 - num_decodes:]
    if uniform:  # the decodes hold one length (a batch decoding in lockstep)
        requests[:num_decodes] = [(37, 1)] * num_decodes
    num_blocks = 64
    cache = make_cache(num_blocks, kv_heads, head_size, layout)
    block_table, request_slots = place_requests(requests, num_blocks, gen, consecutive)
    full_k, full_v, queries, slots = [], [], [], []
    for (context, new), slot in zip(requests, request_slots):
        total = context + new
        k = torch.randn(total, kv_heads, head_size, generator=gen)
        v = torch.randn(total, kv_heads, head_size, generator=gen)
        # The context was written by earlier steps.
        write_kv_slots(cache, k[:context].to("mlx"), v[:context].to("mlx"),
                       slot[:context].to("mlx"))
        full_k.append(k), full_v.append(v)
        queries.append(torch.randn(new, heads, head_size, generator=gen))
        slots.append(slot[context:])
    query = torch.cat(queries)
    key = torch.cat([k[c:] for k, (c, _) in zip(full_k, requests)])
    value = torch.cat([v[c:] for v, (c, _) in zip(full_v, requests)])
    slot_mapping = torch.cat(slots).to("mlx")
    query_start = np.cumsum([0] + [n for _, n in requests])
    metadata = MLXAttentionMetadata(
        num_actual_tokens=len(query), num_decodes=num_decodes, query_start=query_start,
        seq_lens=np.array([c + n for c, n in requests]),
        block_table=torch_mlx.to_mlx(block_table.to("mlx")), slot_mapping=slot_mapping,
        block_size=BLOCK_SIZE, block_table_tensor=block_table)
    scale = head_size ** -0.5
    impl = MLXAttentionImpl(heads, head_size, scale, kv_heads,
                            None if alibi is None else alibi.tolist(), window, "auto",
                            sinks=None if sinks is None else sinks.to("mlx"))
    output = torch.empty(len(query), heads, head_size, device="mlx")
    impl.forward(None, query.to("mlx"), key.to("mlx"), value.to("mlx"), cache, metadata, output)

    got = output.cpu()
    for r, (context, new) in enumerate(requests):
        start, end = query_start[r], query_start[r + 1]
        expected = reference_attention(queries[r], full_k[r], full_v[r], scale, window,
                                       sinks=sinks, alibi=alibi)
        torch.testing.assert_close(got[start:end], expected, atol=2e-5, rtol=1e-4)


def alibi_slopes(heads):
    """Bloom's and MPT's slopes for a power-of-two head count: 2 ** (-8 i / heads)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (8, 2, None), (8, 1, 20),
                                                   (8, 2, 20)])
@pytest.mark.parametrize("feature", ["sinks", "alibi", "both"])
def test_sinks_and_alibi_match_reference(layout, heads, kv_heads, window, feature):
    # gpt-oss: sinks on sliding and full layers; Bloom/MPT: ALiBi. Sinks of a few units either
    # way, so that they take a visible share of the softmax
    sinks = 3 * torch.randn(heads, generator=torch.Generator().manual_seed(1))
    check_mixed_batch(layout, heads, kv_heads, window,
                      sinks=sinks if feature in ("sinks", "both") else None,
                      alibi=alibi_slopes(heads) if feature in ("alibi", "both") else None)


def test_forward_without_metadata_leaves_output_alone():
    # vLLM's profiling run calls attention before any KV cache exists.
    impl = MLXAttentionImpl(4, 32, 0.1, 4, None, None, "auto")
    output = torch.full((3, 4, 32), 7.0, device="mlx")
    x = torch.zeros(3, 4, 32, device="mlx")
    assert impl.forward(None, x, x, x, torch.empty(0, device="mlx"), None, output) is output
    assert bool((output.cpu() == 7).all())


@pytest.mark.parametrize("option", [dict(use_alibi_sqrt=True),
                                    dict(alibi_slopes=[1.0] * 4,
                                         attn_type=AttentionType.ENCODER_ONLY),
                                    dict(sinks=torch.zeros(4),
                                         attn_type=AttentionType.ENCODER_ONLY)])
def test_unsupported_options_are_refused(option):
    kwargs = dict(alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto") | option
    with pytest.raises(NotImplementedError, match="not supported on mlx"):
        MLXAttentionImpl(4, 32, 0.1, 4, **kwargs)


def test_options_passed_as_none_are_not_used():
    # Granite and Laguna pass sinks=None: no sinks, nothing to refuse; Gemma 2's soft cap is
    # supported
    impl = MLXAttentionImpl(4, 32, 0.1, 4, None, None, "auto", logits_soft_cap=30.0, sinks=None)
    assert impl.soft_cap == 30.0


def encoder_metadata(lengths):
    """What vLLM's runner gives an encoder-only group: whole sequences, a zero block table and
    slot mapping (no cache)."""
    query_start = np.cumsum([0] + list(lengths))
    return MLXAttentionMetadata(
        num_actual_tokens=int(query_start[-1]), num_decodes=0, query_start=query_start,
        seq_lens=np.array(lengths),
        block_table=torch_mlx.to_mlx(torch.zeros(len(lengths), 1, dtype=torch.int32,
                                                 device="mlx")),
        slot_mapping=torch.zeros(int(query_start[-1]), dtype=torch.int64, device="mlx"),
        block_size=BLOCK_SIZE)


@pytest.mark.parametrize("pack_tokens", [1024, 40])  # 40: the batch splits into several runs
@pytest.mark.parametrize("heads,kv_heads,window,cap", [(4, 4, None, None), (8, 2, None, None),
                                                       (8, 1, None, None), (8, 2, 9, None),
                                                       (8, 2, None, 5.0), (8, 2, 9, 5.0)])
def test_encoder_only_packed_batch_matches_reference(monkeypatch, pack_tokens, heads, kv_heads,
                                                     window, cap):
    monkeypatch.setattr(backend, "ENCODER_PACK_TOKENS", pack_tokens)
    gen = torch.Generator().manual_seed(1)
    head_size = 32
    lengths = [7, 1, 23, 16, 45, 3]  # 45: longer than one run of 40 and than the window
    total = sum(lengths)
    query = torch.randn(total, heads, head_size, generator=gen)
    key = torch.randn(total, kv_heads, head_size, generator=gen)
    value = torch.randn(total, kv_heads, head_size, generator=gen)
    scale = head_size ** -0.5
    impl = MLXAttentionImpl(heads, head_size, scale, kv_heads, None, window, "auto",
                            logits_soft_cap=cap, attn_type=AttentionType.ENCODER_ONLY)
    # padded past the real tokens, as vLLM's buffers are; the layer's cache is vLLM's empty
    # CPU placeholder (encoder-only layers have none)
    pad = lambda t: torch.cat([t, torch.zeros(5, *t.shape[1:])]).to("mlx")
    output = torch.full((total + 5, heads, head_size), 7.0, device="mlx")
    impl.forward(None, pad(query), pad(key), pad(value), torch.tensor([]),
                 encoder_metadata(lengths), output)

    got = output.cpu()
    assert bool((got[total:] == 7).all())  # padding rows untouched
    start = 0
    for n in lengths:
        q, k, v = query[start:start + n], key[start:start + n], value[start:start + n]
        if cap is None:
            expected = reference_attention(q, k, v, scale, window, causal=False)
        else:
            expected = capped_reference(q, k, v, scale, window, cap)
        torch.testing.assert_close(got[start:start + n], expected, atol=2e-5, rtol=1e-4)
        start += n


def capped_reference(q, k, v, scale, window, cap):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = cap * torch.tanh(scores / cap)
    if window is not None:
        pos = torch.arange(q.shape[0])
        scores = scores.masked_fill((pos[None, :] - pos[:, None]).abs() >= window, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_encoder_only_refuses_a_partial_sequence():
    # chunked prefill would split a sequence: its attention would miss the other chunks' keys
    impl = MLXAttentionImpl(4, 32, 0.1, 4, None, None, "auto",
                            attn_type=AttentionType.ENCODER_ONLY)
    md = encoder_metadata([5, 8])
    md.seq_lens = np.array([5, 20])
    x = torch.zeros(13, 4, 32, device="mlx")
    with pytest.raises(NotImplementedError, match="whole in one step"):
        impl.forward(None, x, x, x, torch.tensor([]), md, torch.empty_like(x))


@pytest.mark.parametrize("attn_type", [AttentionType.ENCODER_DECODER, AttentionType.ENCODER])
def test_encoder_decoder_attention_is_refused(attn_type):
    assert not backend.MLXAttentionBackend.supports_attn_type(attn_type)
    assert backend.MLXAttentionBackend.supports_attn_type(AttentionType.ENCODER_ONLY)
    with pytest.raises(NotImplementedError, match=f"{attn_type}.* not supported on mlx"):
        MLXAttentionImpl(4, 32, 0.1, 4, None, None, "auto", attn_type=attn_type)


def test_non_causal_decoder_metadata_is_refused():
    # decoder layers here are always causal: a step that asks otherwise (DiffusionGemma's
    # per-request flags) must not get causal attention silently
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=32,
                             dtype=torch.float32)
    builder = SimpleNamespace(kv_cache_spec=spec)
    for causal in (False, torch.tensor([1, 0], dtype=torch.int32)):
        with pytest.raises(NotImplementedError, match="non-causal decoder attention"):
            backend.MLXAttentionMetadataBuilder.build(builder, 0, SimpleNamespace(causal=causal))
