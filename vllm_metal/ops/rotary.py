"""Rotary embedding in MLX, the exact equivalent of vLLM's RotaryEmbedding.forward_native.

The angles come from the module's own cos/sin cache, gathered at each token's position, so
every rope variant that only changes how that cache is computed (linear, dynamic-NTK, YaRN,
Llama 3 scaling, ...) is covered by the same code. mx.fast.rope would recompute the angles from a
base or frequencies and lose those variants' cos/sin scaling (YaRN's mscale). On MLX's CPU
backend the same computation is one torch_mlx kernel (csrc/fast_cpu.cpp) instead of a dozen
graph nodes per call.
"""
import mlx.core as mx
import torch
from vllm.model_executor.layers import rotary_embedding
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

from torch_mlx import _C
from torch_mlx.ops.registry import lowering

from .library import cpu_backend, define

rotary_embedding_op = define(
    "rotary_embedding(Tensor positions, Tensor x, Tensor cos_sin_cache, int head_size, "
    "int rotary_dim, bool is_neox_style) -> Tensor",
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
def rotary(positions, x, cos_sin_cache, head_size, rotary_dim, is_neox_style):
    """x [T, H * head_size]: the first rotary_dim of each head rotated by its token's angles."""
    if cpu_backend():
        positions = positions if positions.ndim == 1 else positions.flatten()
        return _C.rope(x, positions, cos_sin_cache, head_size, rotary_dim, is_neox_style)
    cos_sin = mx.take(cos_sin_cache, positions.flatten(), axis=0)[:, None, :]
    half = rotary_dim // 2
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    heads = x.reshape(x.shape[0], -1, head_size)
    rotated = apply_rotary(heads[..., :rotary_dim], cos, sin, is_neox_style)
    if rotary_dim < head_size:
        rotated = mx.concatenate([rotated, heads[..., rotary_dim:]], axis=-1)
    return rotated.reshape(x.shape)


class MLXRotaryMixin:
    """forward_oot for RotaryEmbedding and its subclasses that keep its forward_native."""

    def forward_oot(self, positions: torch.Tensor, query: torch.Tensor,
                    key: torch.Tensor | None = None):
        cache = self._match_cos_sin_cache_dtype(query)
        args = (cache, self.head_size, self.rotary_dim, self.is_neox_style)
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
