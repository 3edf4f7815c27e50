"""Paged attention in MLX: gather a request's cache blocks, then mx.fast.scaled_dot_product_attention.

The KV cache of one layer is the logical array ``[num_blocks, kv_heads, block_size, Dk + Dv]``
(keys and values side by side in the last axis; vLLM's per-layer cache view), whatever its
physical layout. Position ``p`` of a request lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``.

Sliding window W (vLLM's and transformers' convention): query position q sees keys k with
q - W < k <= q, i.e. the last W positions including itself.
"""
import mlx.core as mx


def gather_kv(cache: mx.array, block_ids: mx.array, head_size: int) -> tuple[mx.array, mx.array]:
    """Keys and values of the blocks ``block_ids`` (shape [..., n]) as [..., H, n * BS, D]."""
    lead = block_ids.shape[:-1]
    num_blocks = block_ids.shape[-1]
    _, heads, block_size, content = cache.shape
    blocks = mx.take(cache, block_ids.reshape(-1), axis=0)
    blocks = blocks.reshape(*lead, num_blocks, heads, block_size, content)
    axes = list(range(len(lead)))
    n = len(lead)
    kv = blocks.transpose(*axes, n + 1, n, n + 2, n + 3)  # [..., H, n, BS, C]
    kv = kv.reshape(*lead, heads, num_blocks * block_size, content)
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


def decode_attention(query: mx.array, cache: mx.array, block_table: mx.array, mask: mx.array,
                     scale: float, head_size: int) -> mx.array:
    """One query token per request. query [R, Hq, D]; block_table [R, n] covering the longest
    request; mask from decode_mask. Returns [R, Hq, Dv]."""
    keys, values = gather_kv(cache, block_table, head_size)
    q = query[:, :, None, :]
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    return out[:, :, 0, :]


def prefill_attention(query: mx.array, keys: mx.array, values: mx.array, scale: float,
                      window: int | None) -> mx.array:
    """The queries are the last len(query) positions of a request whose keys/values (all
    positions so far, this chunk's included) are given. query [L, Hq, D], keys [H, S, Dk],
    values [H, S, Dv]; returns [L, Hq, Dv]."""
    num_queries, num_keys = query.shape[0], keys.shape[-2]
    q = query.transpose(1, 0, 2)[None]
    if window is None or num_keys <= window:
        mask = "causal"  # MLX aligns it lower-right: the last query sees every key
    else:
        positions = mx.arange(num_keys - num_queries, num_keys)
        mask = sliding_window_mask(positions, num_keys, window)
    out = mx.fast.scaled_dot_product_attention(q, keys[None], values[None], scale=scale,
                                               mask=mask)
    return out[0].transpose(1, 0, 2)
