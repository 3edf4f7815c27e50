"""MLXAttentionImpl: writes new keys/values into the paged cache, then attends with MLX.

``attend`` is the one MLX implementation, as a lazy MLX computation: the KV-cache write
(torch_mlx's ``write_slots`` graph node, in place) and the attention that reads the cache
through it. Eager forward evaluates it and copies the result into vLLM's output buffer
(O(tokens)); in a compiled forward (vllm_metal/ops/attention.py) it joins the step's one MLX
graph. Everything crosses to MLX as zero-copy views (torch_mlx.to_mlx): query, key, value, the
cache and the block table.

Encoder-only layers (``AttentionType.ENCODER_ONLY``: BERT, RoBERTa, ModernBERT) have no cache:
nothing is written, and each sequence attends bidirectionally to its own keys and values, taken
from this step's ``key``/``value`` (paged.encoder_attention). Encoder-decoder attention (the
decoder's cross-attention and the encoder's own) is refused.

Attention sinks (gpt-oss) and ALiBi (Bloom, MPT) are supported on decoder layers (paged.py):
decodes with either take the MLX composition (also on the CPU backend, whose one-node kernel
has neither), prefills with sinks alone MLX's fused attention, with ALiBi the written-out one.
"""
import mlx.core as mx
import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from torch_mlx import _C, from_mlx, to_mlx

from ..ops.cache import write_kv_rows
from ..ops.library import cpu_backend
from .backend import MLXAttentionMetadata
from .paged import (decode_attention, encoder_attention, fused_decode_attention, gather_kv,
                    prefill_attention)

SUPPORTED_TYPES = (AttentionType.DECODER, AttentionType.ENCODER_ONLY)


class MLXAttentionImpl(AttentionImpl[MLXAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **unsupported) -> None:
        if attn_type not in SUPPORTED_TYPES:
            raise NotImplementedError(f"{attn_type} attention is not supported on mlx")
        if attn_type != AttentionType.DECODER and (alibi_slopes is not None or sinks is not None):
            raise NotImplementedError(
                f"ALiBi and attention sinks of {attn_type} attention are not supported on mlx")
        if sinks is not None and sinks.shape != (num_heads,):
            raise ValueError(f"attention sinks must be one per query head ({num_heads}), "
                             f"got shape {tuple(sinks.shape)}")
        unsupported = {k: v for k, v in unsupported.items() if v is not None}  # None: not used
        if unsupported:
            raise NotImplementedError(f"attention options not supported on mlx: {unsupported}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        # Gemma 2: scores become cap * tanh(scores / cap) before the mask and softmax
        self.soft_cap = float(logits_soft_cap) if logits_soft_cap else None
        # gpt-oss: the model's parameter, loaded after this; read (zero-copy) at each call
        self.sinks = sinks
        # Bloom, MPT: one slope per query head
        self.alibi = None if alibi_slopes is None else mx.array(
            [float(x) for x in alibi_slopes], dtype=mx.float32)
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.uses_kv_cache = attn_type == AttentionType.DECODER  # the layer's kv_cache: unused
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: MLXAttentionMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported on mlx")
        if attn_metadata is None:
            return output  # profiling run: no cache yet
        num_tokens = attn_metadata.num_actual_tokens
        cache = to_mlx(kv_cache) if self.uses_kv_cache else None  # encoder-only: an empty CPU one
        result = self.attend(to_mlx(query), to_mlx(key), to_mlx(value), cache, attn_metadata,
                             storage=kv_cache)
        out = output if num_tokens == output.shape[0] else output[:num_tokens]
        out.copy_(from_mlx(result))
        return output

    def attend(self, query: mx.array, key: mx.array | None, value: mx.array | None,
               kv_cache: mx.array | None, md: MLXAttentionMetadata,
               storage: torch.Tensor | None = None) -> mx.array:
        """Write this step's keys/values into ``kv_cache`` (vLLM's logical [blocks, heads,
        block_size, K|V] view) and attend: [num_actual_tokens, Hq, Dv], lazy. query/key/value
        may be padded past md.num_actual_tokens. ``storage``: the torch tensor of the cache
        (ops/cache.py's scatter path writes through it). Encoder-only layers: no cache
        (``kv_cache`` None), bidirectional attention within each sequence."""
        num_tokens = md.num_actual_tokens
        # MLX slices here (a torch slice of an "mlx" tensor is a dispatched op, an MLX one is
        # not), and none where nothing is cut off: each is a graph node
        query = _first(query, num_tokens)
        if not self.uses_kv_cache:
            return self._attend_encoder(query, _first(key, num_tokens),
                                        _first(value, num_tokens), md)
        writes = key is not None and self.kv_sharing_target_layer_name is None
        if writes:
            key, value = _first(key, num_tokens), _first(value, num_tokens)
            kv_cache = write_kv_rows(kv_cache, key, value, md.slots, storage)
        result = self._attend(query, key, value, kv_cache, md)
        # a prefill reads its own keys from `key`, not the cache: the write must still happen
        # whenever the result is evaluated (decodes read the cache through the write's result)
        if writes and md.num_decodes < md.num_reqs:
            return mx.depends([result], [kv_cache])[0]
        return result

    def _attend(self, query: mx.array, key: mx.array, value: mx.array, kv_cache: mx.array,
                md: MLXAttentionMetadata) -> mx.array:
        """query [T, Hq, D], key/value [T, H, D] (this step's tokens, already in the cache),
        kv_cache [num_blocks, H, BS, Dk + Dv] (vLLM's logical view);
        returns [T, Hq, Dv] in token order (decodes come first, see the builder)."""
        outputs = []
        # token-major view for the MLX paths below (never evaluated when none of them runs)
        cache = kv_cache.swapaxes(1, 2)
        decode_query = _first(query, md.num_decodes)
        sinks = self._sinks()
        written_out = self.soft_cap is not None or sinks is not None or self.alibi is not None
        if md.num_decodes and cpu_backend() and not written_out:
            # one kernel reading the cache in place
            outputs.append(_C.paged_decode_attention(
                decode_query, kv_cache, md.decode_block_table, md.decode_seq_lens, self.scale,
                self.sliding_window, self.head_size))
        elif md.uniform_decode_len is not None and not written_out:
            # one request, or requests of one length: MLX's fused kernel over their keys, cut
            # to that length, with no mask. Requests of different lengths need the decode mask,
            # and MLX CUDA's masked attention then launches and runs slower than the
            # written-out path (tools/gpu_encode_cost.py on the H100, 32 requests: 58 + 179 us
            # a layer against 44 + 115; one request: 11 + 13 against 46 + 6)
            outputs.append(fused_decode_attention(
                decode_query, cache, md.decode_block_columns, md.uniform_decode_len, self.scale,
                self.head_size, self.sliding_window, md.decode_run_start))
        elif md.num_decodes:
            outputs.append(decode_attention(decode_query, cache, md.decode_block_columns,
                                            md.decode_mask(self.sliding_window), self.scale,
                                            self.head_size, self.soft_cap, sinks, self.alibi,
                                            md.decode_seq_lens))
        for r in range(md.num_decodes, md.num_reqs):
            start, end = int(md.query_start[r]), int(md.query_start[r + 1])
            seq_len = int(md.seq_lens[r])
            if end == start:
                continue
            if seq_len == end - start:  # no earlier context: the new tokens are all the keys
                keys = key[start:end].transpose(1, 0, 2)
                values = value[start:end].transpose(1, 0, 2)
            else:  # chunked prefill or a prefix-cache hit: read the context from the cache
                num_blocks = -(-seq_len // md.block_size)
                keys, values = gather_kv(cache, md.block_table[r, :num_blocks], self.head_size)
                keys, values = keys[:, :seq_len], values[:, :seq_len]
            outputs.append(prefill_attention(query[start:end], keys, values, self.scale,
                                             self.sliding_window, self.soft_cap, sinks,
                                             self.alibi))
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)

    def _sinks(self) -> mx.array | None:
        """The sinks parameter as MLX [Hq] (a view of its current values), or None."""
        if self.sinks is None:
            return None
        if self.sinks.device.type == "mlx":
            return to_mlx(self.sinks)
        return mx.array(self.sinks.detach().float().numpy())

    def _attend_encoder(self, query: mx.array, key: mx.array, value: mx.array,
                        md: MLXAttentionMetadata) -> mx.array:
        """query [T, Hq, D], key/value [T, H, D]: whole sequences packed by md.query_start;
        each run of packed sequences is one fused call (MLXAttentionMetadata.encoder_runs)."""
        outputs = []
        for start, end, mask in md.encoder_runs(self.sliding_window):
            whole = start == 0 and end == query.shape[0]
            q, k, v = (query, key, value) if whole else (query[start:end], key[start:end],
                                                         value[start:end])
            outputs.append(encoder_attention(q, k, v, self.scale, mask, self.soft_cap))
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)


def _first(a: mx.array, n: int) -> mx.array:
    return a if a.shape[0] == n else a[:n]
