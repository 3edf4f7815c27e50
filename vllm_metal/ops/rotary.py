"""Rotary embedding in MLX, the exact equivalent of vLLM's RotaryEmbedding.forward_native.

Two ways, chosen per module when vLLM builds it:

- Where the module's cos/sin cache is a plain rotation, cos and sin of position * inv_freq as the
  module's own ``_compute_inv_freq`` gives it (the default rope, Llama 3's, dynamic NTK's fixed
  base, ...), on the GPU ``mx.fast.rope`` with those frequencies and each token's position: one
  kernel per call. A decode step's launch is the host's time on a GPU (encoding each kernel: see
  tools/gpu_encode_cost.py), and the written-out form below costs per call a gather of the
  cache, four fused elementwise kernels and a concatenation.
- Otherwise (linear scaling divides the positions, YaRN multiplies cos and sin by its mscale,
  ...) the angles come from the module's own cache, gathered at each token's position, which
  covers every variant that only changes how that cache is computed. On MLX's CPU backend that
  is one torch_mlx kernel (csrc/fast_cpu.cpp) instead of a dozen graph nodes per call.
"""
import functools

import mlx.core as mx
import torch
from vllm.model_executor.layers import rotary_embedding
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

from torch_mlx import _C
from torch_mlx.ops.registry import lowering

from .library import cpu_backend, define

rotary_embedding_op = define(
    "rotary_embedding(Tensor positions, Tensor x, Tensor cos_sin_cache, float[]? wavelengths, "
    "int head_size, int rotary_dim, bool is_neox_style) -> Tensor",
    lambda positions, x, *args: torch.empty_like(x))


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array, is_neox_style: bool) -> mx.array:
    """Rotate x [T, H, rotary_dim] by angles with cos/sin [T, 1, rotary_dim // 2]."""
    if is_neox_style:  # rotate the two halves
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    else:  # GPT-J style: rotate interleaved pairs
        x1, x2 = x[..., ::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox_style:
        return mx.concatenate([o1, o2], axis=-1)
    return mx.stack([o1, o2], axis=-1).reshape(x.shape)


@lowering("vllm_metal::rotary_embedding")
def rotary(positions, x, cos_sin_cache, wavelengths, head_size, rotary_dim, is_neox_style):
    """x [T, H * head_size] (or [T, H, head_size]): the first rotary_dim of each head rotated by
    its token's angles. ``wavelengths`` (1 / inv_freq, rotary_dim // 2 numbers) where the cache
    is a plain rotation, else None."""
    if cpu_backend():
        positions = positions if positions.ndim == 1 else positions.flatten()
        return _C.rope(x, positions, cos_sin_cache, head_size, rotary_dim, is_neox_style)
    if wavelengths is not None:
        # each token a batch of its own whose offset is its position: one kernel
        heads = x.reshape(x.shape[0], -1, 1, head_size)
        out = mx.fast.rope(heads, rotary_dim, traditional=not is_neox_style, base=None,
                           scale=1.0, offset=positions.flatten(),
                           freqs=_wavelength_array(tuple(wavelengths)))
        return out.reshape(x.shape)
    cos_sin = mx.take(cos_sin_cache, positions.flatten(), axis=0)[:, None, :]
    half = rotary_dim // 2
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    heads = x.reshape(x.shape[0], -1, head_size)
    rotated = apply_rotary(heads[..., :rotary_dim], cos, sin, is_neox_style)
    if rotary_dim < head_size:
        rotated = mx.concatenate([rotated, heads[..., rotary_dim:]], axis=-1)
    return rotated.reshape(x.shape)


@functools.lru_cache(maxsize=64)
def _wavelength_array(wavelengths: tuple) -> mx.array:
    return mx.array(wavelengths, dtype=mx.float32)


def plain_rotation_wavelengths(rope: RotaryEmbedding) -> list[float] | None:
    """1 / inv_freq (float32, on the CPU) where ``rope``'s cos/sin cache is cos and sin of
    position * inv_freq with the module's own ``_compute_inv_freq``, within its dtype's
    rounding; None where it is anything else (scaled positions, scaled cos/sin, no cache)."""
    cache = getattr(rope, "cos_sin_cache", None)
    if cache is None or not hasattr(rope, "_compute_inv_freq") or cache.dim() != 2:
        return None
    # on the CPU whatever device vLLM builds the model under
    with torch.device("cpu"):
        try:
            inv_freq = rope._compute_inv_freq(rope.base).to("cpu", torch.float32)
        except Exception:  # a variant whose frequencies need more than its base
            return None
        if inv_freq.shape != (rope.rotary_dim // 2,) or cache.shape[-1] != rope.rotary_dim:
            return None
        # the first positions and an even sample of the rest (a million-position cache is GBs
        # to recompute): a variant that scales positions or values differs on nearly every row
        # (explicit dtypes: vLLM builds layers under the model's default dtype, and a bfloat16
        # linspace rounds 4095 to 4096)
        rows = cache.shape[0]
        positions = torch.unique(torch.cat([
            torch.arange(min(rows, 4096), dtype=torch.long),
            torch.linspace(0, rows - 1, 4096, dtype=torch.float64).long()]))
        angles = torch.outer(positions.to(torch.float32), inv_freq)
        expected = torch.cat([angles.cos(), angles.sin()], dim=-1).to(cache.dtype)
        tol = 4 * torch.finfo(cache.dtype).eps
        if not torch.allclose(cache.detach()[positions.to(cache.device)].cpu(), expected,
                              rtol=0, atol=tol):
            return None
        return (1.0 / inv_freq).tolist()


class MLXRotaryMixin:
    """forward_oot for RotaryEmbedding and its subclasses that keep its forward_native."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # decided once, eagerly (never inside a torch.compile trace). Numbers, not a buffer: a
        # compiled graph keeps them as constants of the op, so a graph vLLM cached on disk runs
        # in any process (a module buffer is looked up by name where the graph is loaded)
        self.mlx_rope_wavelengths = plain_rotation_wavelengths(self)

    def forward_oot(self, positions: torch.Tensor, query: torch.Tensor,
                    key: torch.Tensor | None = None):
        args = (self._match_cos_sin_cache_dtype(query), self.mlx_rope_wavelengths,
                self.head_size, self.rotary_dim, self.is_neox_style)
        query = rotary_embedding_op(positions, query, *args)
        if key is not None:
            key = rotary_embedding_op(positions, key, *args)
        return query, key


def _cache_based_rope_classes() -> list[type]:
    classes = [RotaryEmbedding]
    for name in dir(rotary_embedding):
        cls = getattr(rotary_embedding, name)
        if (isinstance(cls, type) and issubclass(cls, RotaryEmbedding) and cls is not RotaryEmbedding
                and cls.forward_native is RotaryEmbedding.forward_native
                and cls.forward_oot is RotaryEmbedding.forward_oot):
            classes.append(cls)
    return classes


def _register() -> None:
    for cls in _cache_based_rope_classes():
        override = type(f"MLX{cls.__name__}", (MLXRotaryMixin, cls), {})
        cls.register_oot(override)


_register()
