"""Paged attention in MLX: gather a request's cache blocks, then mx.fast.scaled_dot_product_attention.

The KV cache of one layer is the logical array ``[num_blocks, kv_heads, block_size, Dk + Dv]``
(keys and values side by side in the last axis; vLLM's per-layer cache view), whatever its
physical layout; the functions here take it token-major, ``cache.swapaxes(1, 2)``. Position
``p`` of a request lives in block ``block_table[p // block_size]`` at offset ``p % block_size``.

Sliding window W (vLLM's and transformers' convention): query position q sees keys k with
q - W < k <= q, i.e. the last W positions including itself.

Encoder-only attention (BERT, RoBERTa, ModernBERT: vLLM's ``AttentionType.ENCODER_ONLY``) is
bidirectional over each sequence's own tokens and keeps no cache. Its window W is symmetric, as in
vLLM's FlashAttention backend (``(W - 1, W - 1)``): query q sees keys k with |q - k| < W.

Logit soft-capping C (Gemma 2): the scaled scores s become C * tanh(s / C) before the mask and
the softmax. MLX's fused attention has no such step, so a capped prefill is written out.

Attention sinks (gpt-oss): a learned logit per query head that joins every query's softmax
denominator and attends to nothing (vLLM's backends start the online softmax with it: the
running max at the sink, the running sum at 1). MLX's fused attention takes them (``sinks=``,
in the query's dtype); the written-out paths append them as one more score column.

ALiBi (Bloom, MPT): the per-query-head slope times the key's distance, ``slope * (k - q)``,
added to the scaled (and capped) scores before the mask. vLLM's Triton kernel adds
``slope * (k - context_len)``, which differs by ``slope * (q - context_len)``, constant along a
query's row, so the softmax is the same; ``k - q`` keeps the bias at most 0. Scores with a bias
are float32 (a bias of a few hundred in bfloat16 would be off by whole units), so ALiBi layers
take the written-out paths.
"""
import math

import mlx.core as mx
import numpy as np


def gather_kv(cache: mx.array, block_ids: mx.array, head_size: int) -> tuple[mx.array, mx.array]:
    """Keys and values of the blocks ``block_ids`` (shape [..., n]) as [..., H, n * BS, D].

    ``cache`` is one layer's cache seen token-major, ``[num_blocks, BS, H, Dk + Dv]``: in vLLM's
    LBNHC layout that view is contiguous, so the gather copies whole blocks (about 6x faster on
    the CPU than gathering through the head-major view, whose elements are strided)."""
    blocks = mx.take(cache, block_ids.reshape(-1), axis=0)  # [prod(lead) * n, BS, H, C]
    return _split_kv(blocks, block_ids.shape[:-1], head_size)


def _split_kv(blocks: mx.array, lead: tuple, head_size: int) -> tuple[mx.array, mx.array]:
    """Blocks [prod(lead) * n, BS, H, Dk + Dv], n per leading index, as keys and values
    [*lead, H, n * BS, D]."""
    _, block_size, heads, content = blocks.shape
    tokens = blocks.shape[0] // math.prod(lead) * block_size
    kv = blocks.reshape(*lead, tokens, heads, content).swapaxes(-3, -2)
    return kv[..., :head_size], kv[..., head_size:]


def sliding_window_mask(query_positions: mx.array, num_keys: int, window: int) -> mx.array:
    """Boolean [len(query_positions), num_keys]: True where the query may attend the key."""
    keys = mx.arange(num_keys)[None, :]
    queries = query_positions[:, None]
    return (keys <= queries) & (keys > queries - window)


def decode_mask(seq_lens: mx.array, num_keys: int, window: int | None) -> mx.array:
    """Boolean [R, 1, 1, num_keys] for one query per request at position seq_len - 1: the
    request's own keys (padding blocks excluded), within the window if there is one."""
    keys = mx.arange(num_keys)[None, :]
    lengths = seq_lens[:, None]
    mask = keys < lengths
    if window is not None:
        mask = mask & (keys >= lengths - window)
    return mask[:, None, None, :]


def encoder_mask(lengths: list[int], window: int | None) -> mx.array | None:
    """Boolean [T, T] for sequences of ``lengths`` packed one after another (T = their sum):
    True where both tokens belong to the same sequence (and lie within the symmetric window).
    None where nothing is masked: one sequence, with no window or one wider than it."""
    total = sum(lengths)
    if len(lengths) == 1 and (window is None or total <= window):
        return None
    allowed = None
    if len(lengths) > 1:
        segment = mx.array(np.repeat(np.arange(len(lengths)), lengths))
        allowed = segment[:, None] == segment[None, :]  # block diagonal
    if window is not None:
        # within one sequence the distance in the packed batch is the positions' distance
        idx = mx.arange(total)
        near = mx.abs(idx[:, None] - idx[None, :]) < window
        allowed = near if allowed is None else allowed & near
    return allowed


def soft_cap(scores: mx.array, cap: float | None) -> mx.array:
    return scores if cap is None else cap * mx.tanh(scores / cap)


def decode_attention(query: mx.array, cache: mx.array, block_table: mx.array, mask: mx.array,
                     scale: float, head_size: int, cap: float | None = None,
                     sinks: mx.array | None = None, alibi: mx.array | None = None,
                     seq_lens: mx.array | None = None) -> mx.array:
    """One query token per request. query [R, Hq, D]; block_table [R, n] covering the longest
    request; mask from decode_mask. Returns [R, Hq, Dv]. sinks [Hq]; alibi slopes [Hq] with
    seq_lens [R] (the query is at position seq_len - 1); with either the scores are float32.

    Written out rather than through mx.fast.scaled_dot_product_attention: with one query row
    per request, the query heads sharing a key/value head are the rows of one small matmul, and
    MLX's CPU fallback for the fused op (which spreads GQA heads first) costs several more ops;
    on the CPU backend each op is a task of 10-20 us, more than this arithmetic."""
    keys, values = gather_kv(cache, block_table, head_size)  # [R, H, S, D]
    num_reqs, query_heads, _ = query.shape
    kv_heads = keys.shape[1]
    q = (query * scale).reshape(num_reqs, kv_heads, query_heads // kv_heads, head_size)
    scores = soft_cap(q @ keys.swapaxes(-1, -2), cap)  # [R, H, G, S]
    group = query_heads // kv_heads
    if sinks is not None or alibi is not None:
        scores = scores.astype(mx.float32)
    if alibi is not None:
        distance = mx.arange(keys.shape[-2])[None, :] - (seq_lens[:, None] - 1)  # [R, S]
        scores = scores + alibi.reshape(1, kv_heads, group, 1) * distance[:, None, None, :]
    scores = mx.where(mask, scores, -mx.inf)
    if sinks is not None:
        sinks = sinks.reshape(1, kv_heads, group, 1)
    probs = softmax_with_sinks(scores, sinks).astype(values.dtype)
    return (probs @ values).reshape(num_reqs, query_heads, values.shape[-1])


def consecutive_kv(cache: mx.array, first: int, num_blocks: int,
                   head_size: int) -> tuple[mx.array, mx.array]:
    """gather_kv of the blocks first, first + 1, ..., first + num_blocks - 1, as [1, H, n * BS,
    D] views of the cache (in vLLM's token-major layout; a copy of those blocks in the other)."""
    return _split_kv(cache[first: first + num_blocks], (1,), head_size)


def fused_decode_attention(query: mx.array, cache: mx.array, block_table: mx.array,
                           seq_len: int, scale: float, head_size: int,
                           window: int | None, run_start: int | None = None) -> mx.array:
    """decode_attention of requests that all hold ``seq_len`` tokens, through
    mx.fast.scaled_dot_product_attention, the GPU's way: MLX's fused decode kernel in place of
    the written-out scale, two products, mask, softmax and cast (each a kernel the host encodes:
    a small model's decode step on a GPU is bound by that, tools/gpu_encode_cost.py).
    query [R, Hq, D]; block_table [R, blocks]; the keys are cut to the common length and
    window, so no mask. ``run_start`` (one request): the first block when its blocks are
    consecutive (MLXAttentionMetadata.decode_run_start): the keys are then read in place, with
    no gather. Returns [R, Hq, Dv]."""
    if run_start is None:
        keys, values = gather_kv(cache, block_table, head_size)  # [R, H, S, D]
    else:
        keys, values = consecutive_kv(cache, run_start, block_table.shape[-1], head_size)
    start = max(0, seq_len - window) if window is not None else 0
    keys, values = keys[..., start:seq_len, :], values[..., start:seq_len, :]
    out = mx.fast.scaled_dot_product_attention(query[:, :, None, :], keys, values, scale=scale)
    return out[:, :, 0, :]


def softmax_with_sinks(scores: mx.array, sinks: mx.array | None) -> mx.array:
    """Softmax over the last axis whose denominator also holds exp(sink) (sinks broadcast to
    scores' shape with the last axis 1; None: a plain softmax)."""
    if sinks is None:
        return mx.softmax(scores, axis=-1, precise=True)
    column = mx.broadcast_to(sinks.astype(scores.dtype), (*scores.shape[:-1], 1))
    probs = mx.softmax(mx.concatenate([scores, column], axis=-1), axis=-1, precise=True)
    return probs[..., :-1]


def prefill_attention(query: mx.array, keys: mx.array, values: mx.array, scale: float,
                      window: int | None, cap: float | None = None,
                      sinks: mx.array | None = None, alibi: mx.array | None = None) -> mx.array:
    """The queries are the last len(query) positions of a request whose keys/values (all
    positions so far, this chunk's included) are given. query [L, Hq, D], keys [H, S, Dk],
    values [H, S, Dv]; returns [L, Hq, Dv]. sinks, alibi slopes: [Hq] or None."""
    num_queries, num_keys = query.shape[0], keys.shape[-2]
    q = query.transpose(1, 0, 2)[None]
    if cap is not None or alibi is not None:
        positions = mx.arange(num_keys - num_queries, num_keys)
        if window is None:
            allowed = mx.arange(num_keys)[None, :] <= positions[:, None]
        else:
            allowed = sliding_window_mask(positions, num_keys, window)
        return _written_attention(query, keys, values, scale, allowed, cap, sinks, alibi,
                                  positions)
    if window is None or num_keys <= window:
        mask = "causal"  # MLX aligns it lower-right: the last query sees every key
    else:
        positions = mx.arange(num_keys - num_queries, num_keys)
        mask = sliding_window_mask(positions, num_keys, window)
    if sinks is not None:
        sinks = sinks.astype(query.dtype)  # MLX: sinks must promote to the output type
    out = mx.fast.scaled_dot_product_attention(q, keys[None], values[None], scale=scale,
                                               mask=mask, sinks=sinks)
    return out[0].transpose(1, 0, 2)


def encoder_attention(query: mx.array, key: mx.array, value: mx.array, scale: float,
                      mask: mx.array | None, cap: float | None = None) -> mx.array:
    """Bidirectional attention of packed sequences over their own tokens (no cache): query
    [T, Hq, D], key [T, H, Dk], value [T, H, Dv], mask from encoder_mask (None: every token
    sees every token). Returns [T, Hq, Dv]."""
    keys, values = key.transpose(1, 0, 2), value.transpose(1, 0, 2)
    if cap is not None:
        total = query.shape[0]
        allowed = mx.ones((total, total), dtype=mx.bool_) if mask is None else mask
        return _written_attention(query, keys, values, scale, allowed, cap)
    q = query.transpose(1, 0, 2)[None]
    out = mx.fast.scaled_dot_product_attention(q, keys[None], values[None], scale=scale,
                                               mask=mask)
    return out[0].transpose(1, 0, 2)


def _written_attention(query: mx.array, keys: mx.array, values: mx.array, scale: float,
                       allowed: mx.array, cap: float | None = None,
                       sinks: mx.array | None = None, alibi: mx.array | None = None,
                       positions: mx.array | None = None) -> mx.array:
    """Attention written out, for what the fused op lacks (soft cap, ALiBi): query [L, Hq, D],
    keys [H, S, Dk], values [H, S, Dv], allowed [L, S]; sinks [Hq]; alibi slopes [Hq] with the
    queries' positions [L]. Returns [L, Hq, Dv]. Scores in float32."""
    num_queries, query_heads, head_size = query.shape
    kv_heads = keys.shape[0]
    group = query_heads // kv_heads
    q = (query * scale).transpose(1, 0, 2).reshape(kv_heads, group, num_queries, head_size)
    scores = soft_cap((q @ keys[:, None].swapaxes(-1, -2)).astype(mx.float32), cap)
    if alibi is not None:
        distance = mx.arange(keys.shape[-2])[None, :] - positions[:, None]  # [L, S]
        scores = scores + alibi.reshape(kv_heads, group, 1, 1) * distance
    scores = mx.where(allowed, scores, -mx.inf)  # [H, G, L, S]
    if sinks is not None:
        sinks = sinks.reshape(kv_heads, group, 1, 1)
    probs = softmax_with_sinks(scores, sinks).astype(values.dtype)
    out = probs @ values[:, None]  # [H, G, L, Dv]
    return out.reshape(query_heads, num_queries, -1).transpose(1, 0, 2)
