"""Shape ops that compute: cat, stack, flip, roll, repeat, tril/triu, padding (constant,
reflection, replication and their backwards), unfold (the view, its backward), and the complex
views view_as_real / view_as_complex.

clone/contiguous, the ``*_copy`` ops, ``diag_embed``, ``narrow_copy``, ``split_with_sizes_copy``,
``block_diag`` ... need no kernel here: ATen's device-generic composites build them from views and
``copy_``, which are native (csrc/memory_ops.cpp).
"""
from __future__ import annotations

import math

import mlx.core as mx
import torch

from .registry import accumulate_at, lowering, to_mx_dtype, to_torch_dtype, torch_kernel


def _dim(d: int, ndim: int) -> int:
    n = max(ndim, 1)
    return d + n if d < 0 else d


def _promoted(arrays) -> mx.Dtype:
    """torch's result dtype over tensors (cat and stack promote their inputs)."""
    dtype = to_torch_dtype(arrays[0].dtype)
    for a in arrays[1:]:
        dtype = torch.promote_types(dtype, to_torch_dtype(a.dtype))
    return to_mx_dtype(dtype)


@lowering("cat")
def cat(tensors, dim=0):
    dtype = _promoted(tensors)
    # torch's legacy rule: 1-D empty tensors are skipped whatever the other shapes are.
    kept = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]
    if not kept:
        return mx.zeros((0,), dtype=dtype)
    return mx.concatenate([t.astype(dtype) for t in kept], axis=_dim(dim, kept[0].ndim))


@lowering("stack")
def stack(tensors, dim=0):
    dtype = _promoted(tensors)
    return mx.stack([t.astype(dtype) for t in tensors], axis=_dim(dim, tensors[0].ndim + 1))


@lowering("flip")
def flip(self, dims):
    axes = sorted({_dim(d, self.ndim) for d in dims})
    if not axes or self.ndim == 0:
        return mx.array(self)
    return mx.flip(self, axis=axes)


@lowering("roll")
def roll(self, shifts, dims=()):
    if self.size == 0:
        return mx.array(self)
    if not dims:  # roll the flattened tensor
        return mx.reshape(mx.roll(mx.reshape(self, (-1,)), shifts[0]), self.shape)
    out = self
    for s, d in zip(shifts, dims):
        out = mx.roll(out, s, axis=_dim(d, self.ndim))
    return out


@lowering("repeat")
def repeat(self, repeats):
    lead = len(repeats) - self.ndim
    x = mx.reshape(self, (1,) * lead + tuple(self.shape))
    return mx.tile(x, [int(r) for r in repeats])


def _tri_mask(shape, diagonal: int, lower: bool) -> mx.array:
    rows, cols = shape[-2], shape[-1]
    r = mx.reshape(mx.arange(rows), (rows, 1))
    c = mx.reshape(mx.arange(cols), (1, cols))
    return (c - r <= diagonal) if lower else (c - r >= diagonal)


@lowering("tril")
def tril(self, diagonal=0):
    return mx.where(_tri_mask(self.shape, diagonal, True), self, mx.zeros((), self.dtype))


@lowering("triu")
def triu(self, diagonal=0):
    return mx.where(_tri_mask(self.shape, diagonal, False), self, mx.zeros((), self.dtype))


# ----------------------------------------------------------------------------------------------
# Padding. ``pad`` lists (before, after) pairs starting from the last dimension; negative
# entries crop.


def _pairs(pad, ndim: int):
    """[(dim, before, after)] from torch's flat, last-dimension-first padding list."""
    return [(ndim - 1 - i, int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(pad) // 2)]


@lowering("constant_pad_nd")
def constant_pad_nd(self, pad, value=0):
    x = self
    widths = [(0, 0)] * self.ndim
    for d, lo, hi in _pairs(pad, self.ndim):
        n = x.shape[d]
        start, stop = max(-lo, 0), n - max(-hi, 0)
        if lo < 0 or hi < 0:
            x = x[(slice(None),) * d + (slice(start, max(stop, start)),)]
        widths[d] = (max(lo, 0), max(hi, 0))
    if not any(w != (0, 0) for w in widths):
        return mx.array(x)
    fill = value.astype(self.dtype) if isinstance(value, mx.array) else \
        mx.array(value).astype(self.dtype)
    return mx.pad(x, widths, mode="constant", constant_values=fill)


def _pad_source(n: int, lo: int, hi: int, reflect: bool) -> mx.array:
    """For each output position along a padded dimension, the input position it copies."""
    pos = mx.arange(-lo, n + hi)
    if reflect:
        pos = mx.abs(pos)
        return mx.where(pos >= n, 2 * (n - 1) - pos, pos)
    return mx.clip(pos, 0, n - 1)


def _pad_forward(self, padding, reflect: bool):
    out = self
    for d, lo, hi in _pairs(padding, self.ndim):
        out = mx.take(out, _pad_source(self.shape[d], lo, hi, reflect), axis=d)
    return out


def _pad_backward(grad_output, self, padding, reflect: bool):
    """Each output position's gradient summed into the input position it copied; the padding
    is separable, so one scatter-add per padded dimension."""
    g = grad_output
    for d, lo, hi in _pairs(padding, self.ndim):
        src = _pad_source(self.shape[d], lo, hi, reflect)
        moved = mx.swapaxes(g, 0, d)
        acc = mx.zeros((self.shape[d],) + tuple(moved.shape[1:]), dtype=g.dtype)
        g = mx.swapaxes(accumulate_at(acc, src, moved), 0, d)
    return g


for _n in (1, 2, 3):
    lowering(f"reflection_pad{_n}d")(
        lambda self, padding: _pad_forward(self, padding, True))
    lowering(f"replication_pad{_n}d")(
        lambda self, padding: _pad_forward(self, padding, False))
    lowering(f"reflection_pad{_n}d_backward")(
        lambda grad_output, self, padding: _pad_backward(grad_output, self, padding, True))
    lowering(f"replication_pad{_n}d_backward")(
        lambda grad_output, self, padding: _pad_backward(grad_output, self, padding, False))


# ----------------------------------------------------------------------------------------------
# unfold: a view in eager mode (it must alias self), an MLX op in compiled graphs.


def _unfold_geometry(sizes, strides, dimension: int, size: int, step: int):
    nd = len(sizes)
    d = _dim(dimension, nd)
    if nd and not 0 <= d < nd or not nd and d not in (0, -1):
        raise IndexError(f"Dimension out of range (expected to be in range of "
                         f"[{-max(nd, 1)}, {max(nd, 1) - 1}], but got {dimension})")
    n = sizes[d] if nd else 1
    if size > n:
        raise RuntimeError(f"maximum size for tensor at dimension {d} is {n} but size is {size}")
    if step <= 0:
        raise RuntimeError(f"step is {step} but must be > 0")
    if not nd:
        return [size], [1]
    new_sizes, new_strides = list(sizes), list(strides)
    new_sizes[d] = (n - size) // step + 1
    new_strides[d] = strides[d] * step
    return new_sizes + [size], new_strides + [strides[d]]


@torch_kernel("unfold")
def unfold(self, dimension, size, step):
    sizes, strides = _unfold_geometry(list(self.shape), list(self.stride()), dimension, size,
                                      step)
    return self.as_strided(sizes, strides, self.storage_offset())


@lowering("unfold", eager=False)
def unfold_mx(self, dimension, size, step):
    shape = list(self.shape)
    contiguous = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    sizes, strides = _unfold_geometry(shape, contiguous, dimension, size, step)
    return mx.as_strided(self, sizes, strides)


def _unfold_backward_spec(spec, grad_in, input_sizes, dim, size, step):
    """The gradient of a 0-d input is 0-d on the CPU; torch's meta kernel, its decomposition,
    gives a size-0 window's gradient the shape (0,)."""
    return ((), spec[1], ()) if len(input_sizes) == 0 else spec


@lowering("unfold_backward", spec=_unfold_backward_spec)
def unfold_backward(grad_in, input_sizes, dim, size, step):
    """Every window element's gradient added back at the input position it viewed. As in
    torch, grad_in's other dimensions broadcast to input_sizes (istft's window envelope passes
    one batch row for all: torch._refs.istft, torch.compile), it holds grad_in.shape[dim]
    windows, and window elements past the input's end add nothing."""
    input_sizes = [int(s) for s in input_sizes]
    nd = len(input_sizes)
    if nd == 0:
        return mx.reshape(mx.sum(grad_in), ())
    d = _dim(dim, nd)
    grad_in = mx.reshape(grad_in, (1,) * (nd + 1 - grad_in.ndim) + tuple(grad_in.shape))
    nwin = grad_in.shape[d]
    grad_in = mx.broadcast_to(grad_in, input_sizes[:d] + [nwin] + input_sizes[d + 1:] + [size])
    if grad_in.size == 0:  # nothing to add back (MLX's scatter cannot take empty updates)
        return mx.zeros(input_sizes, dtype=grad_in.dtype)
    # (..., nwin, ..., size) -> (nwin, size, ...) -> (nwin*size, ...)
    g = mx.moveaxis(mx.moveaxis(grad_in, -1, 0), d + 1, 0)
    g = mx.reshape(g, (nwin * size,) + tuple(g.shape[2:]))
    pos = mx.reshape(mx.arange(nwin)[:, None] * step + mx.arange(size)[None, :], (-1,))
    if (nwin - 1) * step + size > input_sizes[d]:  # more windows than fit: drop the overhang
        inside = pos < input_sizes[d]
        g = mx.where(mx.reshape(inside, (-1,) + (1,) * (g.ndim - 1)), g, 0)
        pos = mx.where(inside, pos, 0)
    acc = mx.zeros((input_sizes[d],) + tuple(g.shape[1:]), dtype=grad_in.dtype)
    return mx.moveaxis(accumulate_at(acc, pos, g), 0, d)


# ----------------------------------------------------------------------------------------------
# Complex views: the same storage seen as float pairs and back.


def _reinterpret(self: torch.Tensor, dtype: torch.dtype, sizes, strides, offset: int):
    out = torch.empty(0, dtype=dtype, device=self.device)
    return out.set_(self.untyped_storage(), offset, sizes, strides)


@torch_kernel("view_as_real")
def view_as_real(self):
    if self.dtype != torch.complex64:
        raise RuntimeError("view_as_real is only supported for complex tensors")
    return _reinterpret(self, torch.float32, list(self.shape) + [2],
                        [2 * s for s in self.stride()] + [1], 2 * self.storage_offset())


@torch_kernel("view_as_complex")
def view_as_complex(self):
    if self.dtype == torch.float16:  # torch gives complex32, which mlx cannot hold
        raise TypeError("mlx does not support dtype torch.complex32 (view_as_complex of a "
                        "float16 tensor); use float32, which gives complex64")
    if self.dtype != torch.float32:
        raise RuntimeError(f"view_as_complex is only supported for float and double tensors, "
                           f"but got a tensor of scalar type: {self.dtype}")
    if self.dim() == 0 or self.shape[-1] != 2:
        raise RuntimeError("Tensor must have a last dimension of size 2")
    if self.stride(-1) != 1:
        raise RuntimeError("Tensor must have a last dimension with stride 1")
    if any(s % 2 for s in self.stride()[:-1]) or self.storage_offset() % 2:
        raise RuntimeError("Tensor must have a stride divisible by 2 for all but last dimension")
    return _reinterpret(self, torch.complex64, list(self.shape[:-1]),
                        [s // 2 for s in self.stride()[:-1]], self.storage_offset() // 2)


@lowering("repeat_interleave.Tensor", meta=False)  # the length is the sum of the repeats
def repeat_interleave(repeats, output_size=None):
    """[0] * repeats[0] + [1] * repeats[1] + ...: each position i of the result holds the number
    of run starts at or before i, minus one (a scatter of run starts and a cumsum, O(n))."""
    if repeats.ndim != 1:
        raise RuntimeError("repeat_interleave only accept 1D vector as repeat")
    if repeats.dtype not in (mx.int64, mx.int32):
        raise RuntimeError("repeats has to be Long or Int tensor")
    r = repeats.astype(mx.int64)
    if r.size and mx.any(r < 0).item():
        raise RuntimeError("repeats can not be negative")
    total = int(mx.sum(r).item()) if r.size else 0
    if output_size is not None and output_size != total:
        raise RuntimeError("allocated size does not match required size")
    if total == 0:
        return mx.zeros((0,), dtype=repeats.dtype)
    starts = mx.cumsum(r) - r  # where each run begins; empty runs share a start
    # int32 marks below 2**31 outputs: MLX's GPU scatter takes no 8-byte types
    mark_dtype = mx.int32 if total < 2**31 else mx.int64
    marks = mx.zeros((total + 1,), dtype=mark_dtype).at[starts].add(
        mx.ones(starts.shape, dtype=mark_dtype))
    return (mx.cumsum(marks[:total]) - 1).astype(repeats.dtype)
