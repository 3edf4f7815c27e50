"""Creation ops: arange, full, eye, linspace, ..."""
import mlx.core as mx
import torch

from .registry import lowering, torch_kernel


@lowering("arange.start_step")
def arange(start, end, step=1, dtype=None, layout=None, device=None, pin_memory=None):
    # The meta kernel has fixed dtype and length; the adapter casts to that dtype.
    return mx.arange(start, end, step)


@torch_kernel("arange.start_out")
def arange_out(start, end, step=1, *, out):
    """What torch.arange(..., device="mlx") reaches (arange is composite over this overload)."""
    result = torch.ops.aten.arange.start_step(start, end, step, dtype=out.dtype, device=out.device)
    torch._refs._maybe_resize_out(out, result.shape)
    return out.copy_(result)
