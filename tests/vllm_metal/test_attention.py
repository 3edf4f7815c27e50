"""The MLX paged-attention backend against plain attention over contiguous keys (torch, CPU).

A batch mixes decode requests (one new token) with prefills that have earlier context in the
cache (chunked prefill / prefix-cache hits) and prefills without; blocks are scattered over the
cache in random order. Covers MHA, GQA and MQA, sliding windows and both KV-cache layouts.
"""
import math

import numpy as np
import pytest
import torch

import torch_mlx
from vllm_metal.attention.backend import MLXAttentionMetadata
from vllm_metal.attention.impl import MLXAttentionImpl
from vllm_metal.ops.cache import write_kv_slots

BLOCK_SIZE = 16


def reference_attention(q, k, v, scale, window):
    """q [L, Hq, D] at the last L of S positions; k/v [S, H, D]; causal (+ window)."""
    num_queries, num_keys = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(num_keys - num_queries, num_keys)[:, None]
    k_pos = torch.arange(num_keys)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


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
    gen = torch.Generator().manual_seed(0)
    head_size = 32
    # (context already cached, new tokens): three decodes first, as vLLM orders the batch.
    requests = [(37, 1), (5, 1), (64, 1), (0, 23), (40, 9), (17, 30), (0, 1)]
    num_blocks = 64
    cache = make_cache(num_blocks, kv_heads, head_size, layout)
    free = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays the null block
    width = max(math.ceil((c + n) / BLOCK_SIZE) for c, n in requests)
    block_table = torch.zeros(len(requests), width, dtype=torch.int32)
    full_k, full_v, queries, slots = [], [], [], []
    for r, (context, new) in enumerate(requests):
        total = context + new
        blocks = free[:math.ceil(total / BLOCK_SIZE)]
        free = free[len(blocks):]
        block_table[r, : len(blocks)] = blocks.to(torch.int32)
        positions = torch.arange(total)
        slot = blocks[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
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
        num_actual_tokens=len(query), num_decodes=3, query_start=query_start,
        seq_lens=np.array([c + n for c, n in requests]),
        block_table=torch_mlx.to_mlx(block_table.to("mlx")), slot_mapping=slot_mapping,
        block_size=BLOCK_SIZE)
    scale = head_size ** -0.5
    impl = MLXAttentionImpl(heads, head_size, scale, kv_heads, None, window, "auto")
    output = torch.empty(len(query), heads, head_size, device="mlx")
    impl.forward(None, query.to("mlx"), key.to("mlx"), value.to("mlx"), cache, metadata, output)

    got = output.cpu()
    for r, (context, new) in enumerate(requests):
        start, end = query_start[r], query_start[r + 1]
        expected = reference_attention(queries[r], full_k[r], full_v[r], scale, window)
        torch.testing.assert_close(got[start:end], expected, atol=2e-5, rtol=1e-4)


def test_forward_without_metadata_leaves_output_alone():
    # vLLM's profiling run calls attention before any KV cache exists.
    impl = MLXAttentionImpl(4, 32, 0.1, 4, None, None, "auto")
    output = torch.full((3, 4, 32), 7.0, device="mlx")
    x = torch.zeros(3, 4, 32, device="mlx")
    assert impl.forward(None, x, x, x, torch.empty(0, device="mlx"), None, output) is output
    assert bool((output.cpu() == 7).all())


@pytest.mark.parametrize("option", [dict(alibi_slopes=[1.0]), dict(sinks=torch.zeros(4))])
def test_unsupported_options_are_refused(option):
    kwargs = dict(alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto") | option
    with pytest.raises(NotImplementedError, match="not supported on mlx"):
        MLXAttentionImpl(4, 32, 0.1, 4, **kwargs)


def test_options_passed_as_none_are_not_used():
    # Granite and Laguna pass sinks=None: no sinks, nothing to refuse; Gemma 2's soft cap is
    # supported
    impl = MLXAttentionImpl(4, 32, 0.1, 4, None, None, "auto", logits_soft_cap=30.0, sinks=None)
    assert impl.soft_cap == 30.0
