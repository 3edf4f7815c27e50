"""MLA (multi-head latent attention: DeepSeek-V2/V3, GLM-4-MoE-Lite, ...) on MLX.

vLLM's ``MLAAttention`` layer caches one "head" per token: the compressed latent ``kv_c``
(kv_lora_rank L values, normalised) followed by the rotary key part ``k_pe`` (R values), a row
of ``L + R``. Per query head n, keys and values are recovered from the latent through
``kv_b_proj``: ``k_nope = kv_c @ W_UK[:, n]`` (P values), ``v = kv_c @ W_UV[:, n]`` (V values),
and the full key is ``[k_nope, k_pe]`` (k_pe shared by all heads). The layer splits a step:

- decode tokens (the leading requests with one new token) run *absorbed* (MQA over the
  latent): the layer multiplies ``q_nope`` by ``W_UK_T`` ([N, P, L]) so that
  ``q . k = [q_nope W_UK^T, q_pe] . [kv_c, k_pe]``; the backend's ``forward_mqa`` attends with
  that [B, N, L + R] query over the cached rows of each request (keys: the whole row; values:
  its first L entries) and returns [B, N, L]; the layer projects the result with ``W_UV``.
- prefill tokens run as ordinary multi-head attention (``forward_mha``): this step's latent
  rows (and, for a request with earlier context, its cached rows) are decompressed with
  ``kv_b_proj`` into per-head keys and values; causal, lower-right aligned.

``MLXMLAImpl`` is both halves in MLX, reading the latent cache in place through the block
table (the same blocks and slots as the MLX attention backend: ``write_kv_rows`` writes the
rows, ``paged.decode_mask`` masks padding). Eagerly vLLM's ``MLAAttention.forward_impl``
orchestrates (its torch ops run on "mlx"); in a compiled forward ``ops/attention.py`` lowers
``vllm::unified_mla_attention_with_output`` to ``MLXMLAImpl.attend``, which does the whole
layer (write, absorbed decode, decompressed prefill, ``W_UV``) as one lazy MLX computation
from the layer's ``W_UK_T`` / ``W_UV``.

Sparse MLA (DeepSeek-V3.2's indexer) is ``attention/sparse_mla.py``, built on this impl.
Not supported (refused with NotImplementedError): quantized KV caches, KV sharing,
sliding-window MLA, decode context parallelism.
"""
from dataclasses import dataclass, fields
from typing import ClassVar

import mlx.core as mx
import torch
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBaseImpl,
    MLACommonDecodeMetadata,
)
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend
from vllm.v1.kv_cache_layout import KVCacheLayout

from torch_mlx import from_mlx, to_mlx

from ..ops.cache import write_kv_rows
from .backend import MLXAttentionBackend, MLXAttentionMetadata, MLXAttentionMetadataBuilder
from .paged import prefill_attention


class MLXMLABackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False  # vLLM calls unified_mla_kv_cache_update
    supported_dtypes: ClassVar[list[torch.dtype]] = MLXAttentionBackend.supported_dtypes
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry's slot for out-of-tree backends

    @staticmethod
    def get_impl_cls():
        return MLXMLAImpl

    @staticmethod
    def get_builder_cls():
        return MLXMLAMetadataBuilder

    @classmethod
    def is_mla(cls) -> bool:
        return True

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any kv_lora_rank + qk_rope_head_dim

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return MLXAttentionBackend.get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # one head: both layouts are the same bytes, [blocks, block_size, L + R]
        return MLXAttentionBackend.supported_kv_cache_layouts()

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class MLXMLAMetadata(MLXAttentionMetadata):
    """MLXAttentionMetadata plus the fields vLLM's MLAAttention.forward_impl reads."""
    num_prefills: int = 0
    num_decode_tokens: int = 0
    decode: MLACommonDecodeMetadata | None = None
    prefill: object | None = None  # forward_impl reads it only for sparse MLA / fused quant


class MLXMLAMetadataBuilder(MLXAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        common = common_attn_metadata
        decode = None
        if md.num_decodes:
            decode = MLACommonDecodeMetadata(
                block_table=common.block_table_tensor[: md.num_decodes],
                seq_lens=common.seq_lens[: md.num_decodes], dcp_tot_seq_lens=None)
        base = {f.name: getattr(md, f.name) for f in fields(MLXAttentionMetadata)}
        return MLXMLAMetadata(**base, num_prefills=md.num_reqs - md.num_decodes,
                              num_decode_tokens=md.num_decodes, decode=decode)


class MLXMLAPrefillBackend(MLAPrefillBackend):
    """The prefill backend vLLM's MLAAttention layer asks the platform for. MLXMLAImpl computes
    prefills itself (``forward_mha``, reading earlier context through the block table), so the
    layer's object is never called for them; its entry points run the same MLX attention, for
    callers that use it directly: causal attention of each prefill request's new tokens."""

    @staticmethod
    def get_name() -> str:
        return "MLX"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def prepare_metadata(self, prefill_metadata) -> None:
        self._prefill_metadata = prefill_metadata

    def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
        if return_softmax_lse or output_scale is not None:
            raise NotImplementedError("MLA prefill on mlx returns no softmax LSE and no "
                                      "quantized output")
        starts = self._prefill_metadata.query_start_loc.tolist()
        q, k, v = to_mlx(q), to_mlx(k), to_mlx(v)
        outputs = [prefill_attention(q[s:e], k[s:e].transpose(1, 0, 2),
                                     v[s:e].transpose(1, 0, 2), self.scale, None)
                   for s, e in zip(starts[:-1], starts[1:]) if e > s]
        result = from_mlx(mx.concatenate(outputs, axis=0))
        if out is None:
            return result
        out.copy_(result)
        return out

    def run_prefill_context_chunk(self, chunk, q, k, v, out=None):
        raise NotImplementedError("MLA context chunks through vLLM's workspace are not used on "
                                  "mlx: MLXMLAImpl reads the context through the block table")


def mqa_inputs(q, kv_c_and_k_pe_cache: torch.Tensor) -> tuple[mx.array, mx.array]:
    """forward_mqa's absorbed query [T, N, L + R] (vLLM passes it whole or as its two parts)
    and the cache as [blocks, block_size, L + R]."""
    if isinstance(q, tuple):
        query = mx.concatenate([to_mlx(q[0]), to_mlx(q[1])], axis=-1)
    else:
        query = to_mlx(q)
    return query, _token_major(to_mlx(kv_c_and_k_pe_cache))


class MLXMLAImpl(MLACommonBaseImpl[MLXMLAMetadata]):
    can_return_lse_for_decode: bool = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None, attn_type: str,
                 kv_sharing_target_layer_name: str | None, q_lora_rank: int | None,
                 kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 qk_head_dim: int, v_head_dim: int, kv_b_proj, indexer=None,
                 q_pad_num_heads: int | None = None, **unsupported) -> None:
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError("KV sharing of MLA layers is not supported on mlx")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"{attn_type} MLA attention is not supported on mlx")
        if indexer is not None or unsupported.get("topk_indices_buffer") is not None:
            raise NotImplementedError("sparse MLA (an indexer's top-k tokens) runs in "
                                      "attention/sparse_mla.MLXSparseMLAImpl, not this impl")
        if sliding_window is not None:
            raise NotImplementedError("sliding-window MLA is not supported on mlx")
        if alibi_slopes is not None or logits_soft_cap:
            raise NotImplementedError("ALiBi and logit soft-capping of MLA attention are not "
                                      "supported on mlx")
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            raise NotImplementedError(f"MLA KV cache dtype {kv_cache_dtype!r} is not supported "
                                      f"on mlx")
        unsupported = {k: v for k, v in unsupported.items() if v is not None}
        if unsupported:
            raise NotImplementedError(f"MLA attention options not supported on mlx: "
                                      f"{sorted(unsupported)}")
        super().__init__(num_heads, head_size, scale, num_kv_heads, kv_cache_dtype,
                         kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, qk_head_dim,
                         v_head_dim, kv_b_proj)
        self.q_lora_rank = q_lora_rank
        self.sliding_window = None
        self.indexer = None
        self.q_pad_num_heads = None  # MLX needs no head padding
        self.supports_quant_query_input = False
        self._use_flashinfer_concat_mla_k = False
        self.dcp_world_size = 1
        self.cp_kv_cache_interleave_size = 1

    # -- eager: vLLM's MLAAttention.forward_impl calls these ------------------------------------

    def do_kv_cache_update(self, kv_c_normed: torch.Tensor, k_pe: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                           kv_cache_dtype: str, k_scale: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return  # profiling run
        num_tokens = kv_c_normed.shape[0]
        slots = to_mlx(slot_mapping)[:num_tokens]
        storage = _storage_4d(kv_cache)
        mx.eval(self.write(to_mlx(storage), to_mlx(kv_c_normed), to_mlx(k_pe), slots, storage))

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: MLXMLAMetadata,
                    layer) -> tuple[torch.Tensor, None]:
        """q: (q_nope absorbed [B, N, L], q_pe [B, N, R]) or their concatenation."""
        query, cache = mqa_inputs(q, kv_c_and_k_pe_cache)
        return from_mlx(self.decode(query, cache, attn_metadata)), None

    def forward_mha(self, q: torch.Tensor, kv_c_normed: torch.Tensor, k_pe: torch.Tensor,
                    kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: MLXMLAMetadata,
                    k_scale: torch.Tensor, output: torch.Tensor,
                    output_scale: torch.Tensor | None = None) -> None:
        if output_scale is not None:
            raise NotImplementedError("fused output quantization is not supported on mlx")

        def decompress(latent: mx.array) -> tuple[mx.array, mx.array]:
            kv = to_mlx(self.kv_b_proj(from_mlx(latent))[0])
            kv = kv.reshape(-1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
            kv = kv.transpose(1, 0, 2)  # [N, S, P + V]
            return kv[..., : self.qk_nope_head_dim], kv[..., self.qk_nope_head_dim:]

        cache = _token_major(to_mlx(kv_c_and_k_pe_cache))
        result = self.prefill(to_mlx(q), to_mlx(kv_c_normed), to_mlx(k_pe), cache,
                              attn_metadata, decompress)
        output.copy_(from_mlx(result.reshape(result.shape[0], -1)))

    # -- MLX ------------------------------------------------------------------------------------

    def write(self, cache4: mx.array, kv_c: mx.array, k_pe: mx.array, slots: mx.array,
              storage: torch.Tensor | None) -> mx.array:
        """Store token t's row [kv_c, k_pe] at slot slots[t] of ``cache4`` ([blocks, 1,
        block_size, L + R]), lazily and in place (ops/cache.write_kv_rows); returns the cache
        to read through."""
        num_tokens = slots.shape[0]
        kv_c = kv_c[:num_tokens].reshape(num_tokens, 1, self.kv_lora_rank)
        k_pe = k_pe[:num_tokens].reshape(num_tokens, 1, self.qk_rope_head_dim)
        return write_kv_rows(cache4, kv_c, k_pe, slots, storage)

    def decode(self, query: mx.array, cache: mx.array, md: MLXMLAMetadata) -> mx.array:
        """Absorbed decode (MQA over the latent): query [B, N, L + R] for the md.num_decodes
        leading requests, cache [blocks, block_size, L + R]; returns [B, N, L]."""
        num_decodes = md.num_decodes
        query = query[:num_decodes]
        block_table = md.block_table[:num_decodes, : md.decode_blocks]
        rows = mx.take(cache, block_table.reshape(-1), axis=0)  # [B * n, BS, C]
        rows = rows.reshape(num_decodes, -1, cache.shape[-1])  # [B, S, C]
        scores = (query * self.scale) @ rows.swapaxes(-1, -2)  # [B, N, S]
        mask = md.decode_mask(None).reshape(num_decodes, 1, -1)
        scores = mx.where(mask, scores, -mx.inf)
        probs = mx.softmax(scores, axis=-1, precise=True).astype(rows.dtype)
        return probs @ rows[..., : self.kv_lora_rank]

    def prefill(self, query: mx.array, kv_c: mx.array, k_pe: mx.array, cache: mx.array,
                md: MLXMLAMetadata, decompress) -> mx.array:
        """Multi-head attention of the prefill requests' tokens (the step's tokens after the
        decodes): query [Tp, N, P + R], this step's latent kv_c [Tp, L] and k_pe [Tp, (1,) R];
        a request with earlier context reads all its rows from ``cache`` (already written).
        ``decompress(latent [S, L])`` -> k_nope [N, S, P], v [N, S, V]. Returns [Tp, N, V]."""
        offset = int(md.query_start[md.num_decodes])
        k_pe = k_pe.reshape(k_pe.shape[0], self.qk_rope_head_dim)
        outputs = []
        for r in range(md.num_decodes, md.num_reqs):
            start, end = int(md.query_start[r]) - offset, int(md.query_start[r + 1]) - offset
            seq_len = int(md.seq_lens[r])
            if end == start:
                continue
            if seq_len == end - start:  # no earlier context
                latent, pe = kv_c[start:end], k_pe[start:end]
            else:  # chunked prefill or a prefix-cache hit: the rows from the cache
                num_blocks = -(-seq_len // md.block_size)
                rows = mx.take(cache, md.block_table[r, :num_blocks], axis=0)
                rows = rows.reshape(-1, cache.shape[-1])[:seq_len]
                latent, pe = rows[:, : self.kv_lora_rank], rows[:, self.kv_lora_rank:]
            k_nope, values = decompress(latent)
            pe = mx.broadcast_to(pe[None], (self.num_heads, *pe.shape)).astype(k_nope.dtype)
            keys = mx.concatenate([k_nope, pe], axis=-1)  # [N, S, P + R]
            outputs.append(prefill_attention(query[start:end], keys, values, self.scale, None))
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)

    def attend(self, layer, query: mx.array, kv_c: mx.array, k_pe: mx.array,
               kv_cache: torch.Tensor, md: MLXMLAMetadata) -> mx.array:
        """The whole layer as one lazy MLX computation (the compiled forward): write this
        step's latent rows, absorbed decode with the layer's W_UK_T / W_UV, decompressed
        prefill. query [T, N, P + R] (may be padded past md.num_actual_tokens); returns
        [num_actual_tokens, N * V]."""
        num_tokens, num_decodes = md.num_actual_tokens, md.num_decodes
        storage = _storage_4d(kv_cache)
        cache4 = self.write(to_mlx(storage), kv_c, k_pe, md.slots, storage)
        cache = cache4[:, 0]  # a view: [blocks, block_size, L + R]
        query = query[:num_tokens].reshape(num_tokens, self.num_heads, self.qk_head_dim)
        w_uk_t, w_uv = to_mlx(layer.W_UK_T), to_mlx(layer.W_UV)  # [N, P, L], [N, L, V]
        outputs = []
        if num_decodes:
            q_nope = query[:num_decodes, :, : self.qk_nope_head_dim].transpose(1, 0, 2)
            ql_nope = (q_nope @ w_uk_t).transpose(1, 0, 2)  # [B, N, L]
            absorbed = mx.concatenate(
                [ql_nope, query[:num_decodes, :, self.qk_nope_head_dim:]], axis=-1)
            latent_out = self.decode(absorbed, cache, md)  # [B, N, L]
            outputs.append((latent_out.transpose(1, 0, 2) @ w_uv).transpose(1, 0, 2))
        if num_decodes < md.num_reqs:
            def decompress(latent):
                latent = latent.astype(w_uv.dtype)[None]
                return latent @ w_uk_t.swapaxes(1, 2), latent @ w_uv

            outputs.append(self.prefill(query[num_decodes:], kv_c[num_decodes:num_tokens],
                                        k_pe[num_decodes:num_tokens], cache, md, decompress))
        result = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
        result = result.reshape(num_tokens, -1)
        if num_decodes < md.num_reqs:  # a prefill may read none of the cache: keep the write
            result = mx.depends([result], [cache4])[0]
        return result


def _storage_4d(kv_cache: torch.Tensor) -> torch.Tensor:
    """The layer's cache as [blocks, 1, block_size, L + R] (vLLM binds it squeezed)."""
    return kv_cache.unsqueeze(1) if kv_cache.dim() == 3 else kv_cache


def _token_major(cache: mx.array) -> mx.array:
    """[blocks, block_size, L + R] from either the squeezed or the one-head view."""
    return cache[:, 0] if cache.ndim == 4 else cache
