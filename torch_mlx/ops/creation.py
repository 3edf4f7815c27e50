"""Creation ops: arange, full, eye, linspace, logspace, tril/triu indices.

``empty*`` are native (csrc/memory_ops.cpp); ``zeros``, ``ones``, ``*_like`` and ``scalar_tensor``
are torch's composites over ``empty`` and the native ``fill_`` eagerly (``full``, ``arange`` and
``scalar_tensor`` have lowerings for compiled graphs). The lowerings here compute what
torch's CPU kernels compute. Where torch's CPU kernel works in double precision (``logspace``;
``linspace`` into an integer dtype), the values are computed on the host in float64 with numpy:
they depend on scalar arguments only, and MLX has no float64 on the GPU.
"""
import math

import mlx.core as mx
import numpy as np
import torch

from .registry import lowering, to_mx_dtype, torch_kernel


def _dtype_or_default(dtype):
    return dtype if dtype is not None else to_mx_dtype(torch.get_default_dtype())


def _is_float_dtype(dtype) -> bool:
    return mx.issubdtype(dtype, mx.floating)


# full and arange: compiled graphs only. Eagerly torch's composites run them over the native
# empty + fill_ and arange.start_out below: host fills of the unified memory (as every eager
# fill and copy is, csrc/memory_ops.cpp), where an MLX kernel would cost the host a launch and,
# on a GPU, a wait (tens of microseconds; transformers' generate makes ~20 aranges a step).
@lowering("full", eager=False)
def full(size, fill_value, dtype=None, layout=None, device=None, pin_memory=None):
    # the meta kernel's dtype (bool, int64 or the default float for a number) is applied after
    return mx.full([int(s) for s in size], fill_value, dtype=dtype)


# Compiled graphs only (eagerly torch's composite, empty + fill_, as above). Without it a graph
# holding one (transformers' sdpa mask: where(mask, 0.0, -inf) makes two a layer) was split
# around it, the scalars made eagerly every call.
@lowering("scalar_tensor", eager=False)
def scalar_tensor(s, dtype=None, layout=None, device=None, pin_memory=None):
    return mx.array(s, dtype=_dtype_or_default(dtype))


# Compiled graphs only: eager empty* are native (csrc/memory_ops.cpp). Inside an MLX graph an
# uninitialised tensor is any array of its shape; zeros cost one fill and keep results
# reproducible.
@lowering("empty.memory_format", eager=False)
def empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return mx.zeros([int(s) for s in size], dtype=_dtype_or_default(dtype))


@lowering("empty_strided", eager=False)
def empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    return mx.zeros([int(s) for s in size], dtype=_dtype_or_default(dtype))


@lowering("eye", "eye.m")
def eye(n, m=None, dtype=None, layout=None, device=None, pin_memory=None):
    return mx.eye(int(n), int(n if m is None else m), dtype=_dtype_or_default(dtype))


@lowering("arange.start_step", eager=False)
def arange(start, end, step=1, dtype=None, layout=None, device=None, pin_memory=None):
    """start + step * i as torch's CPU kernel computes it: in the accumulation type (int64 for
    integral dtypes, which truncates float arguments; double for float32, float32 for half)."""
    if dtype is None:
        floats = any(isinstance(v, float) for v in (start, end, step))
        dtype = to_mx_dtype(torch.get_default_dtype()) if floats else mx.int64
    if not _is_float_dtype(dtype):
        start, end, step = int(start), int(end), int(step)
    # torch's length: ceil((end - start) / step) in double (int64 operands for int64)
    n = max(0, math.ceil((end - start) / step))
    if not _is_float_dtype(dtype):
        stop = start + n * step
        # the values are known here: a constant of the graph (no kernel launched each call;
        # transformers' static cache makes one a layer a decode step)
        return mx.array(np.arange(n, dtype=np.int64) * step + start)
    return mx.arange(n, dtype=mx.float32) * step + start


@torch_kernel("arange.start_out")
def arange_out(start, end, step=1, *, out):
    """What torch.arange(..., device="mlx") reaches (arange is composite over this overload):
    torch's CPU kernel, copied into the unified memory (a native host copy)."""
    values = torch.arange(start, end, step, dtype=out.dtype)
    torch._refs._maybe_resize_out(out, values.shape)
    return out.copy_(values)


def _linspace_float(start, end, steps, dtype):
    """torch's CPU kernel in the result dtype: start + step * i for the first half of the points,
    end - step * (steps - 1 - i) for the rest, so both ends are exact. (torch's vectorised loop
    adds k * step to the value at the start of each SIMD block instead, so its last bits depend
    on the machine's vector width; this is its scalar formula.)"""
    lo, hi = mx.array(start, dtype), mx.array(end, dtype)
    step = (hi - lo) / (steps - 1) if steps > 1 else hi - lo
    i = mx.arange(steps).astype(dtype)
    back = (steps - 1) - mx.arange(steps)
    return mx.where(mx.arange(steps) < steps // 2, lo + step * i, hi - step * back.astype(dtype))


def _to_integral(value, dtype) -> int:
    """A Scalar converted to an integral dtype as torch's checked conversion does: a float must
    lie in the dtype's range and is truncated; an integer may also be negative down to -max
    for an unsigned dtype, and wraps."""
    info = mx.iinfo(dtype)
    low = -info.max if info.min == 0 and isinstance(value, int) else info.min
    if not low <= value <= info.max:
        raise RuntimeError(f"value cannot be converted to type {dtype} without overflow")
    return int(value) % (info.max + 1) if info.min == 0 else int(value)


def _checked(value, dtype):
    """``value`` as torch's fill_ converts a Scalar: range-checked (finite floats too)."""
    if not _is_float_dtype(dtype):
        return _to_integral(value, dtype)
    if math.isfinite(value) and abs(value) > mx.finfo(dtype).max:
        raise RuntimeError(f"value cannot be converted to type {dtype} without overflow")
    return value


def _linspace_int(start, end, steps, dtype):
    # integral dtypes: start and end are truncated to the dtype, the step is a double and each
    # value is truncated toward zero
    start, end = _to_integral(start, dtype), _to_integral(end, dtype)
    i = np.arange(steps, dtype=np.int64)
    step = (float(end) - float(start)) / (steps - 1) if steps > 1 else 0.0
    values = np.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i))
    return mx.array(np.trunc(values).astype(np.int64))


@lowering("linspace")
def linspace(start, end, steps, dtype=None, layout=None, device=None, pin_memory=None):
    dtype = _dtype_or_default(dtype)
    if steps == 1:  # torch fills with start (a checked conversion)
        return mx.full([1], _checked(start, dtype), dtype=dtype)
    if _is_float_dtype(dtype):
        return _linspace_float(start, end, steps, dtype)
    return _linspace_int(start, end, steps, dtype)


@lowering("logspace")
def logspace(start, end, steps, base=10.0, dtype=None, layout=None, device=None,
             pin_memory=None):
    """base ** linspace(start, end) in double precision, as torch's CPU kernel (start and end
    first rounded to the result dtype)."""
    dtype = _dtype_or_default(dtype)
    if steps == 1:  # torch fills with base ** start (a checked conversion)
        return mx.full([1], _checked(float(np.power(float(base), float(start))), dtype), dtype)
    if _is_float_dtype(dtype):
        rounded = np.array([start, end], dtype=np.float32).astype(np.float64)
        if dtype != mx.float32:
            rounded = np.array(mx.array([start, end], dtype).astype(mx.float32)).astype(np.float64)
        lo, hi = float(rounded[0]), float(rounded[1])
    else:
        lo, hi = float(_to_integral(start, dtype)), float(_to_integral(end, dtype))
    i = np.arange(steps, dtype=np.int64)
    step = (hi - lo) / (steps - 1) if steps > 1 else 0.0
    exponent = np.where(i < steps // 2, lo + step * i, hi - step * (steps - 1 - i))
    values = np.power(float(base), exponent)
    if not _is_float_dtype(dtype):
        return mx.array(np.trunc(values).astype(np.int64))
    return mx.array(values.astype(np.float32)).astype(dtype)


def _tri_indices(row, col, offset, lower):
    # row-major (row, column) pairs of the lower / upper triangle, as torch orders them
    r, c = np.indices((row, col))
    keep = (c - r <= offset) if lower else (c - r >= offset)
    return mx.array(np.stack([r[keep], c[keep]]).astype(np.int64).reshape(2, -1))


@lowering("tril_indices")
def tril_indices(row, col, offset=0, dtype=None, layout=None, device=None, pin_memory=None):
    return _tri_indices(row, col, offset, lower=True)


@lowering("triu_indices")
def triu_indices(row, col, offset=0, dtype=None, layout=None, device=None, pin_memory=None):
    return _tri_indices(row, col, offset, lower=False)
