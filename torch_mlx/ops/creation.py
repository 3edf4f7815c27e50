"""Creation ops: arange, full, eye, linspace, ..."""
import mlx.core as mx
import torch

from .registry import lowering, to_mx_dtype


@lowering("arange.start_step")
def arange(start, end, step=1, dtype=None, layout=None, device=None, pin_memory=None):
    # The meta kernel fixed dtype and length; compute in float for float results as torch does.
    return mx.arange(start, end, step)


def arange_out(start, end, step=1, *, out):
    """aten::arange.start_out: what torch.arange(..., device="mlx") reaches."""
    result = torch.ops.aten.arange.start_step(start, end, step, dtype=out.dtype, device=out.device)
    torch._refs._maybe_resize_out(out, result.shape)
    return out.copy_(result)


OUT_KERNELS = {"arange.start_out": arange_out}
