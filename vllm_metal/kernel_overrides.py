"""Replacements for the Triton kernels vLLM's runner launches on its device tensors.

vLLM's published seam for this is ``Platform.register_triton_kernel_overrides`` with
``vllm.triton_utils.dispatcher.register_kernels``: the override is called with the kernel's own
argument names. Only kernels on the plain (no speculative decoding, no context parallelism) path
are replaced; they compute small integer tables, which is host work under unified memory, done in
numpy over zero-copy aliases of the "mlx" tensors.
"""
import sys

import numpy as np
import torch

from torch_mlx import _C


def host_view(tensor: torch.Tensor, writes: bool = True) -> np.ndarray:
    """A numpy array over ``tensor``'s bytes ("mlx" or CPU), no copy. ``writes=False``: a
    read-only view, which does not wait for launched kernels that only read the bytes."""
    if tensor.device.type == "mlx":
        tensor = _C.cpu_alias(tensor, writes)
    view = tensor.numpy()
    if not writes:
        view.flags.writeable = False
    return view


def compute_slot_mapping(
    num_tokens, max_num_tokens, query_start_loc_ptr, positions_ptr, block_table_ptr,
    block_table_stride, slot_mapping_ptr, KV_CACHE_BLOCK_SIZE, TOTAL_CP_WORLD_SIZE,
    TOTAL_CP_RANK, CP_KV_CACHE_INTERLEAVE_SIZE, PAD_ID, BLOCK_SIZE,
):
    """slot[t] = block_table[req(t), pos(t) // block_size] * block_size + pos(t) % block_size,
    PAD_ID for the tail up to max_num_tokens (vllm.v1.worker.block_table's kernel)."""
    if TOTAL_CP_WORLD_SIZE != 1:
        raise NotImplementedError("context parallelism is not supported on mlx")
    # inputs read on the host (launched kernels that read them too need no wait)
    query_start = host_view(query_start_loc_ptr, writes=False).astype(np.int64)
    positions = host_view(positions_ptr, writes=False)[:num_tokens]
    block_table = host_view(block_table_ptr, writes=False)
    requests = np.repeat(np.arange(len(query_start) - 1), np.diff(query_start))
    block_size = KV_CACHE_BLOCK_SIZE
    blocks = block_table[requests, positions // block_size].astype(np.int64)
    out = host_view(slot_mapping_ptr)
    out[:num_tokens] = blocks * block_size + positions % block_size
    out[num_tokens:max_num_tokens] = PAD_ID


OVERRIDES = {
    "vllm.v1.worker.block_table.ComputeSlotMappingKernel.kernel": compute_slot_mapping,
}


def triton_off() -> None:
    """Make vLLM see no Triton in this process. vLLM picks Triton paths (the top-k/top-p
    sampler, some layers' kernels) wherever Triton imports with an active driver, whatever the
    tensors' device; on a CUDA host (MLX's CUDA backend) it does, and those kernels cannot take
    "mlx" tensors. On a Mac, Triton is absent and these paths are never chosen: the same here.
    The flag is read at import (``from vllm.triton_utils import HAS_TRITON``), so the modules
    already imported are updated too."""
    for name, module in list(sys.modules.items()):
        if (name == "vllm" or name.startswith("vllm.")) and \
                getattr(module, "HAS_TRITON", None) is True:
            module.HAS_TRITON = False


def register() -> None:
    from vllm.triton_utils.dispatcher import register_kernels

    import vllm.triton_utils  # noqa: F401  (so the flag's home is updated before any reader)

    triton_off()
    register_kernels(OVERRIDES)
