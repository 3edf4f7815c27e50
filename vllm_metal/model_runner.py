"""MetalModelRunner: vLLM's GPU model runner on device "mlx", as vLLM's CPU runner subclasses it.

What differs from the GPU runner, and why:
- host staging buffers and device buffers are one MLX allocation (unified_buffer.py), so the
  per-step host-to-device copies of token ids, block tables and slot mappings vanish;
- eager MLX work is complete when a torch op returns, so device synchronisation is a no-op and
  reading sampled tokens back needs no CUDA event;
- no CUDA graphs and no streams (the platform turns them off).
"""
import torch
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from torch_mlx import _C

from .unified_buffer import UnifiedBuffer, unify_attributes

logger = init_logger(__name__)


class MetalModelRunner(GPUModelRunner):
    def __init__(self, vllm_config, device: torch.device):
        assert device.type == "mlx", device
        super().__init__(vllm_config, device)
        self._unify_block_tables()

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
