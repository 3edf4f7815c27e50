"""KV-cache writes and block copies, in place, at a cost proportional to the bytes moved.

A layer's cache is vLLM's logical view ``[num_blocks, kv_heads, block_size, Dk + Dv]`` over one
MLX buffer. MLX arrays are immutable: an MLX scatter would produce a new array, i.e. copy the
whole cache. Memory is unified and eager MLX work is finished when a torch op returns, so the
writes go through zero-copy CPU aliases of the same bytes (torch_mlx._C.cpu_alias) instead:
torch's CPU indexing then touches only the slots written.
"""
import torch

from torch_mlx import _C


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return _C.cpu_alias(tensor) if tensor.device.type == "mlx" else tensor


def write_kv_slots(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store token t's key and value at cache slot ``slot_mapping[t]`` (block * block_size +
    offset); slots < 0 are padding and skipped. key [T, H, Dk], value [T, H, Dv]."""
    cache = _host(kv_cache)
    num_tokens = key.shape[0]
    slots = _host(slot_mapping)[:num_tokens]
    keys, values = _host(key), _host(value)
    if num_tokens and int(slots.min()) < 0:
        valid = slots >= 0
        slots, keys, values = slots[valid], keys[valid], values[valid]
    num_blocks, heads, block_size, content = cache.shape
    try:  # token-major blocks (LBNHC): slot s is row s of a [slots, H, K|V] view
        rows = cache.transpose(1, 2).view(num_blocks * block_size, heads, content)
    except RuntimeError:
        rows = None
    if rows is not None:  # one write per step and layer, whatever the number of tokens
        rows.index_copy_(0, slots, torch.cat([keys, values], dim=-1).to(cache.dtype))
        return
    head_size = key.shape[-1]
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indices split by a slice put the token axis first: [T, H, D], like key/value.
    cache[blocks, :, offsets, :head_size] = keys.to(cache.dtype)
    cache[blocks, :, offsets, head_size:] = values.to(cache.dtype)


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
