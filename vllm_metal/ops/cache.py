"""KV-cache writes and block copies, in place, at a cost proportional to the bytes moved.

A layer's cache is vLLM's logical view ``[num_blocks, kv_heads, block_size, Dk + Dv]`` over one
MLX buffer. MLX arrays are immutable: an MLX scatter would produce a new array, i.e. copy the
whole cache. New keys/values are written by torch_mlx's ``write_slots`` instead, an MLX graph
node whose result shares the cache's buffer and which copies only the rows written; it works in
a lazy graph (the compiled forward) as in eager mode. Block copies run outside any graph, through
zero-copy CPU aliases of the same bytes (torch_mlx._C.cpu_alias): torch's CPU indexing then
touches only the blocks named.
"""
import mlx.core as mx
import torch

from torch_mlx import _C, to_mlx


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return _C.cpu_alias(tensor) if tensor.device.type == "mlx" else tensor


def write_kv_rows(kv_cache: mx.array, key: mx.array, value: mx.array,
                  slots: mx.array) -> mx.array:
    """``kv_cache`` with token t's key and value stored at slot ``slots[t]`` (block *
    block_size + offset; slots < 0 are padding and skipped), lazily and in place: the result
    shares the cache's buffer, so read the cache through it. key [T, H, Dk], value [T, H, Dv],
    any strides."""
    return _C.write_slots(kv_cache, key, value, slots)


def write_kv_slots(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """write_kv_rows on torch tensors on "mlx", evaluated now."""
    slots = to_mlx(slot_mapping)[: key.shape[0]]
    mx.eval(write_kv_rows(to_mlx(kv_cache), to_mlx(key), to_mlx(value), slots))


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
