"""vLLM's attention op in a compiled forward: one call in the step's MLX graph.

vLLM's models call ``torch.ops.vllm.unified_attention_with_output(query, key, value, output,
layer_name)``, an opaque op that writes ``output`` and reads the step's metadata and the layer's
KV cache from vLLM's forward context. With the platform's whole-forward compilation (no
splitting ops) it is a node of the graph vllm_metal.compiler lowers; this lowering runs there
outside ``mx.compile`` (``compiled=False``: the metadata changes every step), on the lazy
values of the graph, so the KV-cache write, the attention and the pieces before and after are
one MLX graph evaluated once per forward. In eager mode vLLM calls the op itself, which reaches
the same MLXAttentionImpl.attend.
"""
import mlx.core as mx
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.utils.torch_utils import _resolve_layer_name

from torch_mlx import to_mlx
from torch_mlx.ops.registry import lowering


@lowering("vllm::unified_attention_with_output", eager=False, compiled=False)
def unified_attention_with_output(query, key, value, output, layer_name, output_scale=None,
                                  output_block_scale=None, kv_cache_dummy_dep=None):
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("fused output quantization is not supported on mlx")
    # the same context vLLM's own op reads: this layer's metadata, module and cache
    metadata, layer, kv_cache, _ = get_attention_context(_resolve_layer_name(layer_name))
    if metadata is None:  # profiling run: no cache yet
        return None, output, None
    cache = to_mlx(kv_cache) if layer.impl.uses_kv_cache else None  # encoder-only: no cache
    result = layer.impl.attend(query, key, value, cache, metadata, storage=kv_cache)
    if result.shape[0] < output.shape[0]:  # padded tokens keep the buffer's values
        result = mx.concatenate([result, output[result.shape[0]:]], axis=0)
    # auto_functionalized's results: the op's (none), then the new `output`, `output_block_scale`
    return None, result, None


@lowering("vllm::unified_mla_kv_cache_update", eager=False, compiled=False)
def unified_mla_kv_cache_update(kv_c_normed, k_pe, layer_name, kv_cache_dtype, k_scale):
    # The MLA layer's write: done by the attention lowering below, in the same lazy graph as
    # the attention reading it (MLXMLAImpl.attend); this op's result is only an ordering token.
    return mx.zeros((0,), dtype=kv_c_normed.dtype)


@lowering("vllm::unified_mla_attention_with_output", eager=False, compiled=False)
def unified_mla_attention_with_output(q, kv_c_normed, k_pe, output, layer_name,
                                      output_scale=None, output_block_scale=None,
                                      kv_cache_dummy_dep=None, quant_group_size=None,
                                      quant_scale_ue8m0=None, quant_col_major=None,
                                      quant_tma_aligned=None, q_dcp_replicated=None):
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("fused output quantization is not supported on mlx")
    if q_dcp_replicated is not None:
        raise NotImplementedError("decode context parallelism is not supported on mlx")
    metadata, layer, kv_cache, _ = get_attention_context(_resolve_layer_name(layer_name))
    if metadata is None:  # profiling run: no cache yet
        return None, mx.zeros(output.shape, dtype=output.dtype), None
    result = layer.impl.attend(layer, q, kv_c_normed, k_pe, kv_cache, metadata)
    result = result.astype(output.dtype)
    if result.shape[0] < output.shape[0]:  # padded tokens keep the buffer's values
        result = mx.concatenate([result, output[result.shape[0]:]], axis=0)
    return None, result, None
