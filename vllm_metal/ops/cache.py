"""KV-cache writes and block copies, in place, at a cost proportional to the bytes moved.

A layer's cache is vLLM's logical view ``[num_blocks, kv_heads, block_size, Dk + Dv]`` over one
MLX buffer. MLX arrays are immutable: a plain MLX scatter into the cache would produce a new
array, i.e. copy the whole cache. New keys/values are written one of two ways, both in place and
lazy (a node of the step's MLX graph whose result shares the cache's buffer; attention reads the
cache through it), chosen by VLLM_METAL_KV_WRITE:

- scatter (the default on a GPU): an MLX scatter on the default device, into the cache's own
  buffer. MLX writes a result into its input's buffer ("donation") when that input is the sole
  owner of allocator memory; torch_mlx's ``scatter_in_place`` lends the storage's buffer to such
  an input for the write. No CPU work, no cross-stream synchronisation, and on MLX CUDA no
  managed-memory migration.
- rows (the default on MLX's CPU backend): torch_mlx's ``write_slots``, a primitive on MLX's
  CPU stream that copies each row into its slot (reads strided key/value without a copy first).

Where the cache cannot lend its buffer (not contiguous, shared with another live array), the
scatter path falls back to rows, with a warning once. Block copies run outside any graph,
through zero-copy CPU aliases of the same bytes (torch_mlx._C.cpu_alias): torch's CPU indexing
then touches only the blocks named.
"""
import logging

import mlx.core as mx
import numpy as np
import torch

from torch_mlx import _C, to_mlx

from .. import envs
from .library import cpu_backend

logger = logging.getLogger(__name__)

# writes done by each path in this process (tests check which path ran)
WRITES = {"scatter": 0, "rows": 0}
_warned_fallback = False


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return _C.cpu_alias(tensor) if tensor.device.type == "mlx" else tensor


def write_kv_rows(kv_cache: mx.array, key: mx.array, value: mx.array, slots: mx.array,
                  storage: torch.Tensor | None = None) -> mx.array:
    """``kv_cache`` with token t's key and value stored at slot ``slots[t]`` (block *
    block_size + offset; slots < 0 are padding and skipped), lazily and in place: the result
    shares the cache's buffer, so read the cache through it. key [T, H, Dk], value [T, H, Dv],
    any strides. ``storage``: the torch tensor ``kv_cache`` was made from, which the scatter
    path writes through."""
    if storage is not None and envs.kv_write() == "scatter":
        result = _scatter_rows(storage, kv_cache, key, value, slots)
        if result is not None:
            WRITES["scatter"] += 1
            return result
    WRITES["rows"] += 1
    return _C.write_slots(kv_cache, key, value, slots)


# The last slots' (array, block_size, num_slots) and their indices: every layer of a step
# writes the same slots, so they are read and split once per step, not once per layer.
_last_indices: tuple | None = None


def _slot_indices(slots: mx.array, block_size: int, num_slots: int):
    """(rows to keep, or None for all; block of each kept row; offset in its block), or None
    when every slot is padding. The slots are host data (vLLM's model runner computes them):
    read here to drop padding."""
    global _last_indices
    if _last_indices is not None and _last_indices[0] is slots and \
            _last_indices[1:3] == (block_size, num_slots):
        return _last_indices[3]
    host = np.asarray(slots).astype(np.int64)
    valid = host >= 0
    pick = None
    if not valid.all():
        keep = np.flatnonzero(valid)
        pick = mx.array(keep.astype(np.int32))
        host = host[keep]
    if host.size and host.max() >= num_slots:
        raise IndexError(f"write_slots: slot {int(host.max())} is outside the cache "
                         f"({num_slots} slots)")
    indices = None if host.size == 0 else (
        pick, mx.array((host // block_size).astype(np.int32)),
        mx.array((host % block_size).astype(np.int32)))
    _last_indices = (slots, block_size, num_slots, indices)
    return indices


def _scatter_rows(storage: torch.Tensor, kv_cache: mx.array, key: mx.array, value: mx.array,
                  slots: mx.array) -> mx.array | None:
    global _warned_fallback
    num_blocks, heads, block_size, width = kv_cache.shape
    indices = _slot_indices(slots, block_size, num_blocks * block_size)
    if indices is None:
        return kv_cache  # nothing to write
    pick, blocks, offsets = indices
    if pick is not None:
        key, value = key[pick], value[pick]
    rows = mx.concatenate([key, value], axis=2).astype(kv_cache.dtype)  # [T, H, Dk + Dv]

    head_major = storage.is_contiguous()  # [B, H, N, C] in memory
    # else vLLM's token-major layout, [B, N, H, C] in memory: one torch view (a dispatched op)
    token_major = None if head_major else storage.transpose(1, 2)

    def scatter():
        if head_major:
            return _C.scatter_in_place(storage, [blocks, offsets],
                                       rows.reshape(rows.shape[0], 1, heads, 1, width), [0, 2])
        if token_major.is_contiguous():
            result = _C.scatter_in_place(token_major, [blocks, offsets],
                                         rows.reshape(rows.shape[0], 1, 1, heads, width), [0, 1])
            # the logical view, read through the write
            return None if result is None else result.swapaxes(1, 2)
        return None

    result = scatter()
    if result is None and not cpu_backend():
        # On the GPU the last step's kernels may still hold the buffer for a moment after their
        # results were waited for (MLX CUDA releases them from a completion callback: 7 of 800
        # writes on the H100 fell back): once they are done it can be lent.
        mx.synchronize()
        result = scatter()
    if result is None and not _warned_fallback:
        _warned_fallback = True
        logger.warning("vllm_metal: the KV cache (shape %s, strides %s, offset %d, %d of its "
                       "storage's %d bytes) cannot lend its buffer to an in-place scatter; "
                       "writing rows on MLX's CPU stream instead", tuple(storage.shape),
                       storage.stride(), storage.storage_offset(),
                       storage.numel() * storage.element_size(),
                       storage.untyped_storage().nbytes())
    return result


def write_kv_slots(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """write_kv_rows on torch tensors on "mlx", evaluated now."""
    slots = to_mlx(slot_mapping)[: key.shape[0]]
    mx.eval(write_kv_rows(to_mlx(kv_cache), to_mlx(key), to_mlx(value), slots, kv_cache))


def zero_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> None:
    if block_ids:
        _host(kv_cache)[torch.as_tensor(block_ids, dtype=torch.long)] = 0


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
    """For each row (src, dst) of ``src_to_dst`` [N, 2], copy block src onto block dst in every
    layer's cache (copy-on-write of shared blocks)."""
    pairs = _host(src_to_dst).to(torch.long)
    for kv_cache in kv_caches:
        cache = _host(kv_cache)
        cache[pairs[:, 1]] = cache[pairs[:, 0]]


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, src_to_dst: torch.Tensor) -> None:
    """Copy blocks between two caches (e.g. "mlx" and a CPU offload cache) row by row of
    ``src_to_dst`` [N, 2]; either side may be on "mlx" or the CPU."""
    pairs = _host(src_to_dst).to(torch.long)
    _host(dst)[pairs[:, 1]] = _host(src)[pairs[:, 0]]
