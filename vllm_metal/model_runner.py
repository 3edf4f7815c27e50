"""MetalModelRunner: vLLM's GPU model runner on device "mlx", as vLLM's CPU runner subclasses it.

What differs from the GPU runner, and why:
- host staging buffers and device buffers are one MLX allocation (unified_buffer.py), so the
  per-step host-to-device copies of token ids, block tables and slot mappings vanish;
- eager MLX work is complete when a torch op returns, so device synchronisation is a no-op and
  reading sampled tokens back needs no CUDA event;
- no CUDA graphs and no streams (the platform turns them off);
- each attention layer's KV cache is its own allocation (vLLM places all layers in one): an MLX
  op may write a buffer in place only when it holds the whole buffer (ops/cache.py's scatter
  path), and Metal caps the size of one buffer.
"""
from unittest import mock

import torch
import vllm.v1.worker.gpu_model_runner as gpu_model_runner
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
from vllm.v1.worker.utils import allocate_kv_cache
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from torch_mlx import _C

from .unified_buffer import UnifiedBuffer, unify_attributes

logger = init_logger(__name__)


class MetalModelRunner(GPUModelRunner):
    def __init__(self, vllm_config, device: torch.device):
        assert device.type == "mlx", device
        super().__init__(vllm_config, device)
        self._unify_block_tables()

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        from .ops.moe import prepare_moe_layers

        # MoE layers: their routing, and a forward that compiles into the step's graph
        prepare_moe_layers(self.compilation_config.static_forward_context)

    def _make_buffer(self, *size, dtype: torch.dtype, numpy: bool = True) -> UnifiedBuffer:
        return UnifiedBuffer(*size, dtype=dtype, device=self.device, with_numpy=numpy)

    def _unify_block_tables(self) -> None:
        # BlockTable builds plain CpuGpuBuffers with no override hook; swap them right after the
        # InputBatch that owns them is built.
        for block_table in self.input_batch.block_table.block_tables:
            unify_attributes(block_table)

    def may_reinitialize_input_batch(self, kv_cache_config) -> None:
        input_batch = self.input_batch
        super().may_reinitialize_input_batch(kv_cache_config)
        if self.input_batch is not input_batch:
            self._unify_block_tables()

    def initialize_kv_cache_tensors(self, kv_cache_config, kernel_block_sizes,
                                    kv_cache_allocation_context=None):
        # vLLM's method does the layer sharing and binding; only its allocation is replaced,
        # for the duration of the call
        with mock.patch.object(gpu_model_runner, "allocate_kv_cache", allocate_per_layer):
            return super().initialize_kv_cache_tensors(kv_cache_config, kernel_block_sizes,
                                                       kv_cache_allocation_context)

    def _sync_device(self) -> None:
        pass  # eager: every MLX computation finished before its torch op returned

    def _to_list(self, sampled_token_ids: torch.Tensor) -> list[list[int]]:
        # The GPU runner copies into pinned memory and waits on a CUDA event; here the tokens
        # are already in host-visible memory.
        return _C.cpu_alias(sampled_token_ids).tolist()

    def _zero_block_ids(self, block_ids: list[int]) -> None:
        from .ops.cache import zero_blocks

        seen: set[int] = set()
        for group in self.kv_cache_config.kv_cache_groups:
            if not isinstance(group.kv_cache_spec, FullAttentionSpec):
                continue
            for layer_name in group.layer_names:
                layer = self.compilation_config.static_forward_context.get(layer_name)
                kv_cache = getattr(layer, "kv_cache", None)
                if isinstance(kv_cache, torch.Tensor) and kv_cache.data_ptr() not in seen:
                    seen.add(kv_cache.data_ptr())
                    zero_blocks(kv_cache, block_ids)


def allocate_per_layer(kv_cache_config, device, layout, kernel_block_sizes=None):
    """vllm.v1.worker.utils.allocate_kv_cache's views, each layer in an allocation of its own.

    Applies where layers do not share bytes: one cache group whose tensors keep each layer's
    blocks together (layer-outermost: layer stride = blocks x block stride). Anything else
    (overlaid groups of hybrid models, block-outermost layouts) keeps vLLM's one allocation."""
    groups = kv_cache_config.kv_cache_groups
    tensors = kv_cache_config.kv_cache_tensors
    if len(groups) != 1 or not tensors or not all(
            t.layer_stride == t.block_stride * kv_cache_config.num_blocks_of(t) for t in tensors):
        return allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes)
    spec = groups[0].kv_cache_spec
    if not getattr(spec, "has_layer_views", False) or hasattr(spec, "kv_cache_specs"):
        return allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes)
    kernel_block_size = kernel_block_sizes[0] if kernel_block_sizes else None
    kv_caches: dict[str, torch.Tensor] = {}
    for tensor in tensors:
        num_blocks = kv_cache_config.num_blocks_of(tensor)
        for name in tensor.layers:
            raw = torch.zeros(tensor.layer_stride, dtype=torch.int8, device=device)
            own = KVCacheTensor(size=tensor.layer_stride, layers=[name],
                                layer_stride=tensor.layer_stride,
                                block_stride=tensor.block_stride)
            (kv_caches[name],) = create_kv_cache_views(raw, spec, num_blocks, layout, own,
                                                       kernel_block_size=kernel_block_size)
    return kv_caches
