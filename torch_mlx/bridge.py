"""Zero-copy crossing between torch tensors on "mlx" and ``mlx.core`` arrays."""
import mlx.core as mx
import torch

from . import _C


def to_mlx(tensor: torch.Tensor) -> mx.array:
    """An ``mx.array`` over the same bytes as ``tensor`` (device "mlx"); views keep their offset
    and strides. The array keeps the tensor's storage alive; writes through torch are visible."""
    return _C.to_mlx(tensor)


def from_mlx(array: mx.array) -> torch.Tensor:
    """A tensor on "mlx" over the bytes of ``array``, evaluating it first. No copy is made
    unless MLX's layout cannot be expressed as torch strides (negative strides)."""
    return _C.from_mlx(array)
