"""Sparse MLA (DeepSeek-V3.2's DSA, GLM-MoE-DSA) on MLX: the lightning indexer and the top-k
attention.

Each attention layer has an *indexer*: per token a small multi-head query ``q`` [H, D] with
per-head weights ``w`` [H], and one key ``k`` [D] cached per token in the indexer's own cache.
A query at position p scores every earlier position s <= p of its request,
``logit(s) = sum_h w_h * relu(q_h . k_s)`` (vLLM folds the softmax scale and 1/sqrt(H) into
``w``), and keeps the ``index_topk`` best positions. The MLA layer then attends, absorbed (MQA
over the latent rows, as the dense backend's decode), to those positions only, for every token,
prefill or decode. vLLM passes the positions through a shared int32 buffer [tokens, topk] that
the indexer fills and the attention reads; its semantics are kept here: a row holds positions
within the request, and a query with fewer than ``topk`` candidates gets all of them, 0..p,
followed by -1. Selected positions are written in ascending order (vLLM's kernels leave the
order unspecified; attention does not depend on it); ties at the k-th score are broken
arbitrarily, as by vLLM's kernels.

The indexer cache is stored in the model dtype, [blocks, block_size, D], not vLLM's CUDA layout
(fp8 values plus a float32 scale per 128 values, uint8): MLX has no fp8 arithmetic, and
DeepSeek's reference (transformers) scores unquantized keys. ``ops/sparse_indexer.py`` gives
vLLM that cache spec and runs the indexer op.
"""
from typing import ClassVar

import mlx.core as mx
import numpy as np
import torch

from torch_mlx import from_mlx, to_mlx

from .backend import MLXAttentionMetadata
from .mla import MLXMLABackend, MLXMLAImpl, MLXMLAMetadata, _storage_4d, mqa_inputs
from .paged import softmax_with_sinks

# Largest intermediate (elements) of one indexer score block [rows, H, S] or one gathered
# top-k block [rows, topk, L + R]: long prefills are cut into row chunks below it.
CHUNK_ELEMENTS = 1 << 24


def token_positions(md: MLXAttentionMetadata) -> tuple[np.ndarray, np.ndarray]:
    """(request row, position in its sequence) of each of the step's tokens (host)."""
    query_lens = np.diff(md.query_start)
    requests = np.repeat(np.arange(md.num_reqs), query_lens)
    first = (md.seq_lens - query_lens)[requests]  # position of each request's first new token
    offsets = np.arange(md.num_actual_tokens) - md.query_start[requests]
    return requests, first + offsets


def _request_rows(cache: mx.array, block_table: mx.array, num_positions: int) -> mx.array:
    """Rows 0..num_positions-1 of each request through its block table: [R, S, C], S rounded
    up to whole blocks. cache: [blocks, block_size, C]; block_table: [R, width]."""
    num_blocks = -(-num_positions // cache.shape[1])
    rows = mx.take(cache, block_table[:, :num_blocks].reshape(-1), axis=0)
    return rows.reshape(block_table.shape[0], -1, cache.shape[-1])


def _row_chunks(num_rows: int, row_elements: int):
    step = max(1, CHUNK_ELEMENTS // max(row_elements, 1))
    return ((s, min(s + step, num_rows)) for s in range(0, num_rows, step))


def index_logits(q: mx.array, weights: mx.array, keys: mx.array) -> mx.array:
    """sum_h weights[..., h] * relu(q[..., h, :] . keys[..., s, :]), in float32.
    q [..., H, D], weights [..., H], keys [..., S, D] (broadcast against q's batch) -> [..., S]."""
    scores = mx.maximum(q.astype(mx.float32) @ keys.astype(mx.float32).swapaxes(-1, -2), 0)
    return (weights.astype(mx.float32)[..., None, :] @ scores)[..., 0, :]


def topk_positions(logits: mx.array, positions: mx.array, topk: int) -> mx.array:
    """Per row, the ``topk`` best columns among 0..positions[row] (the causal candidates),
    ascending, then -1 where there are fewer: [rows, topk] int32. logits: [rows, S]."""
    num_cols = logits.shape[-1]
    columns = mx.arange(num_cols, dtype=mx.int32)
    causal = columns[None] <= positions[:, None]
    if num_cols > topk:
        masked = mx.where(causal, logits, -mx.inf)
        chosen = mx.argpartition(-masked, kth=topk - 1, axis=-1)[:, :topk].astype(mx.int32)
    else:  # every candidate fits
        chosen = mx.broadcast_to(columns[None], logits.shape)
    past_end = np.iinfo(np.int32).max
    chosen = mx.sort(mx.where(chosen <= positions[:, None], chosen, past_end), axis=-1)
    chosen = mx.where(chosen == past_end, -1, chosen)
    if num_cols < topk:
        chosen = mx.pad(chosen, [(0, 0), (0, topk - num_cols)], constant_values=-1)
    return chosen


def indexer_topk(q: mx.array, weights: mx.array, k_cache: mx.array, md: MLXAttentionMetadata,
                 topk: int) -> mx.array:
    """The indexer's selection for the step's tokens: q [T, H, D], weights [T, H], k_cache
    [blocks, block_size, D] holding every position of each request (this step's keys written).
    Returns [T, topk] int32 positions within each token's request (-1: none)."""
    num_tokens, num_decodes = md.num_actual_tokens, md.num_decodes
    _, positions = token_positions(md)
    positions = mx.array(positions.astype(np.int32))
    outputs = []
    if num_decodes:  # one query per request: one batched product
        keys = _request_rows(k_cache, md.block_table[:num_decodes],
                             int(md.seq_lens[:num_decodes].max()))
        logits = index_logits(q[:num_decodes], weights[:num_decodes], keys)
        outputs.append(topk_positions(logits, positions[:num_decodes], topk))
    for r in range(num_decodes, md.num_reqs):
        start, end = int(md.query_start[r]), int(md.query_start[r + 1])
        seq_len = int(md.seq_lens[r])
        keys = _request_rows(k_cache, md.block_table[r: r + 1], seq_len)[0, :seq_len]
        for s, e in _row_chunks(end - start, q.shape[1] * seq_len):
            logits = index_logits(q[start + s: start + e], weights[start + s: start + e], keys)
            outputs.append(topk_positions(logits, positions[start + s: start + e], topk))
    result = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
    assert result.shape[0] == num_tokens
    return result


def sparse_mla_attention(query: mx.array, cache: mx.array, topk: mx.array,
                         md: MLXAttentionMetadata, scale: float, kv_lora_rank: int,
                         sinks: mx.array | None = None) -> mx.array:
    """Absorbed MLA over each token's selected positions: query [T, N, L + R], cache [blocks,
    block_size, L + R] (latent rows, this step's written), topk [T, K] positions within each
    token's request (-1: none). Keys are whole rows, values their first L entries; returns
    [T, N, L]. sinks [N] (HY V4's learnable sinks): a logit per head that joins each softmax
    denominator and attends to nothing (scores in float32 then)."""
    requests, _ = token_positions(md)
    block_size, width = cache.shape[1], cache.shape[-1]
    flat = cache.reshape(-1, width)
    tables = md.block_table[mx.array(requests.astype(np.int32))]  # [T, table width]
    outputs = []
    for s, e in _row_chunks(query.shape[0], topk.shape[1] * width):
        chosen = topk[s:e]
        valid = chosen >= 0
        chosen = mx.maximum(chosen, 0)  # position 0 stands in for -1 (masked below)
        blocks = mx.take_along_axis(tables[s:e], chosen // block_size, axis=1)
        slots = blocks * block_size + chosen % block_size
        rows = mx.take(flat, slots.reshape(-1), axis=0).reshape(e - s, -1, width)  # [t, K, C]
        scores = (query[s:e] * scale) @ rows.swapaxes(-1, -2)  # [t, N, K]
        if sinks is not None:
            scores = scores.astype(mx.float32)
        scores = mx.where(valid[:, None, :], scores, -mx.inf)
        probs = softmax_with_sinks(scores, None if sinks is None else sinks.reshape(1, -1, 1))
        probs = probs.astype(rows.dtype)
        outputs.append(probs @ rows[..., :kv_lora_rank])
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)


# -- vLLM's classes -----------------------------------------------------------------------------

class MLXSparseMLABackend(MLXMLABackend):
    """The MLA backend for layers with an indexer (``use_sparse``)."""

    @staticmethod
    def get_impl_cls():
        return MLXSparseMLAImpl

    @classmethod
    def is_sparse(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True  # HY V4's learnable per-head sinks (sparse_mla_attention)


class MLXSparseMLAImpl(MLXMLAImpl):
    """Every token (prefill or decode) attends absorbed to its indexer-selected positions:
    vLLM's MLAAttention sends all of a sparse layer's tokens to ``forward_mqa`` when there is no
    dense prefill (``supports_dense_mha_prefill`` False, metadata without ``prefill``)."""
    is_sparse: ClassVar[bool] = True
    supports_dense_mha_prefill: ClassVar[bool] = False

    def __init__(self, *args, indexer=None, topk_indices_buffer: torch.Tensor | None = None,
                 index_group_builder=None, sinks: torch.Tensor | None = None,
                 **kwargs) -> None:
        # index_group_builder: vLLM's CUDA-stream machinery that maps positions to cache slots
        # ahead of the attention; here sparse_mla_attention maps them itself.
        super().__init__(*args, **kwargs)
        if indexer is None and topk_indices_buffer is None:
            raise ValueError("sparse MLA needs the indexer's top-k buffer")
        if sinks is not None and sinks.shape != (self.num_heads,):
            raise ValueError(f"attention sinks must be one per query head ({self.num_heads}), "
                             f"got shape {tuple(sinks.shape)}")
        self._indexer = indexer
        self._topk_indices_buffer = topk_indices_buffer
        # the layer's parameter (HY V4's learnable_sink_param), read at each forward: its
        # values are loaded after the impl is built
        self.sinks = sinks

    @property
    def topk_indices_buffer(self) -> torch.Tensor:
        # read through the indexer when there is one (vLLM may repoint it, as for MTP drafts);
        # layers that reuse an earlier layer's selection have only the shared buffer
        if self._indexer is not None:
            return self._indexer.topk_indices_buffer
        return self._topk_indices_buffer

    def record_logical_topk_ready(self) -> None:
        pass  # vLLM's index-group event; MLX work is ordered already

    def selected(self, num_tokens: int) -> mx.array:
        """This step's [T, topk] positions, as the indexer left them in the shared buffer."""
        return to_mlx(self.topk_indices_buffer)[:num_tokens]

    def _sinks(self) -> mx.array | None:
        return None if self.sinks is None else to_mlx(self.sinks)

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: MLXMLAMetadata,
                    layer) -> tuple[torch.Tensor, None]:
        query, cache = mqa_inputs(q, kv_c_and_k_pe_cache)
        result = sparse_mla_attention(query, cache, self.selected(query.shape[0]), attn_metadata,
                                      self.scale, self.kv_lora_rank, self._sinks())
        return from_mlx(result), None

    def forward_mha(self, *args, **kwargs) -> None:
        raise AssertionError("sparse MLA on mlx runs every token through forward_mqa")

    def attend(self, layer, query: mx.array, kv_c: mx.array, k_pe: mx.array,
               kv_cache: torch.Tensor, md: MLXMLAMetadata) -> mx.array:
        """The whole layer as one lazy MLX computation (compiled forward): write, absorb the
        query with W_UK_T, sparse attention, W_UV. The indexer ran eagerly before this piece
        (it is a splitting op), so its buffer holds this step's selection."""
        num_tokens = md.num_actual_tokens
        storage = _storage_4d(kv_cache)
        cache = self.write(to_mlx(storage), kv_c, k_pe, md.slots, storage)[:, 0]
        query = query[:num_tokens].reshape(num_tokens, self.num_heads, self.qk_head_dim)
        w_uk_t, w_uv = to_mlx(layer.W_UK_T), to_mlx(layer.W_UV)  # [N, P, L], [N, L, V]
        q_nope = query[..., : self.qk_nope_head_dim].transpose(1, 0, 2)
        absorbed = mx.concatenate([(q_nope @ w_uk_t).transpose(1, 0, 2),
                                   query[..., self.qk_nope_head_dim:]], axis=-1)
        latent = sparse_mla_attention(absorbed, cache, self.selected(num_tokens), md,
                                      self.scale, self.kv_lora_rank, self._sinks())  # [T, N, L]
        return (latent.transpose(1, 0, 2) @ w_uv).transpose(1, 0, 2).reshape(num_tokens, -1)
