"""Sorting, selection and scans: sort, topk, kthvalue, median/nanmedian, mode, cumsum/cumprod,
cummax/cummin, logcumsumexp, unique*, searchsorted/bucketize, histc, bincount.

argsort and msort are composites over ``sort``. Every order here is a *stable* sort (MLX's sort
is stable; NaN sorts last ascending and first descending, as in torch), so ties resolve to the
lowest original index, which is what torch's stable CPU sort and its median return. Ops whose
CPU kernel resolves ties by an unspecified algorithm (non-stable sort, topk, kthvalue) agree on
values always and on indices whenever the selected values are distinct.

Ops whose output length depends on the data (unique*, bincount) are registered with
``meta=False`` and evaluate the length once.
"""
from __future__ import annotations

import builtins
import math

import mlx.core as mx
import numpy as np
import torch

from . import registry
from .registry import accumulate_at, lowering, to_mx_dtype, to_torch_dtype

_LOW_PRECISION = (mx.float16, mx.bfloat16)


def _dim(d: int, ndim: int) -> int:
    n = max(ndim, 1)
    if not -n <= d < n:  # torch's check (ops without a meta kernel reach the lowering)
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], "
                         f"but got {d})")
    return d + n if d < 0 else d


def _i64(a: mx.array) -> mx.array:
    return a if a.dtype == mx.int64 else a.astype(mx.int64)


def _argsort(x: mx.array, axis: int, descending: bool) -> mx.array:
    """Stable argsort (int64). Descending keeps equal elements in their original order: sort
    the reversed sequence ascending, reverse the result and map positions back."""
    if not descending:
        return _i64(mx.argsort(x, axis=axis))
    n = x.shape[axis]
    rev = mx.flip(_i64(mx.argsort(mx.flip(x, axis=axis), axis=axis)), axis=axis)
    return (n - 1) - rev


def _sortable(x: mx.array) -> mx.array:
    return x.astype(mx.uint8) if x.dtype == mx.bool_ else x


@lowering("sort.stable")
def sort(self, stable=None, dim=-1, descending=False):
    if self.ndim == 0:
        return mx.array(self), mx.zeros((), dtype=mx.int64)
    d = _dim(dim, self.ndim)
    idx = _argsort(_sortable(self), d, descending)
    return mx.take_along_axis(self, idx, axis=d), idx


_BITS = {mx.float32: mx.int32, mx.float16: mx.int16, mx.bfloat16: mx.int16}


def _order_key(x: mx.array, largest: bool) -> mx.array:
    """An integer key whose ascending order is torch's order for topk: NaN above +inf (every
    NaN alike), descending when ``largest``. Floats map to integers through their bits (sign
    magnitude -> two's complement order), so the selection is exact, with no ties between NaN
    and infinities. -0.0 and 0.0 get distinct keys; torch treats them as equal values."""
    if x.dtype == mx.bool_:
        key = x.astype(mx.int8)
    elif x.dtype in _BITS:
        nan = mx.array(math.nan, dtype=x.dtype)
        bits = mx.view(mx.where(mx.isnan(x), nan, x), _BITS[x.dtype])
        nbits = 8 * bits.itemsize
        key = mx.bitwise_xor(bits, mx.bitwise_and(mx.right_shift(bits, nbits - 1),
                                                  (1 << (nbits - 1)) - 1))
    else:
        key = x
    return mx.bitwise_invert(key) if largest else key


@lowering("topk")
def topk(self, k, dim=-1, largest=True, sorted=True):
    """O(n) selection (argpartition on an exact order key), then a stable sort of the k
    candidates by (key, index). Which of several equal values at the k-th place is returned is
    unspecified, as on the CPU."""
    if self.ndim == 0:
        return mx.array(self), mx.zeros((), dtype=mx.int64)
    d = _dim(dim, self.ndim)
    n = self.shape[d]
    if k == 0 or n == 0:
        shape = list(self.shape)
        shape[d] = k
        return mx.zeros(shape, dtype=self.dtype), mx.zeros(shape, dtype=mx.int64)
    key = _order_key(self, largest)
    if k < n:
        cand = mx.take(mx.argpartition(key, k - 1, axis=d), mx.arange(k), axis=d)
        cand = mx.sort(cand, axis=d)  # index order, so the stable sort breaks ties by index
    else:
        cand = mx.broadcast_to(mx.reshape(mx.arange(n), [n if i == d else 1
                                                         for i in range(self.ndim)]),
                               self.shape)
    order = mx.argsort(mx.take_along_axis(key, cand, axis=d), axis=d)
    idx = _i64(mx.take_along_axis(cand, order, axis=d))
    return mx.take_along_axis(self, idx, axis=d), idx


def _keep(x: mx.array, d: int, keepdim: bool) -> mx.array:
    return x if keepdim else mx.squeeze(x, d)


def _pick(self, d: int, pos: mx.array, keepdim: bool):
    """Values and indices at sorted position ``pos`` (keepdims layout) along ``d``."""
    idx = _argsort(_sortable(self), d, False)
    at = mx.take_along_axis(idx, pos, axis=d)
    vals = mx.take_along_axis(self, at, axis=d)
    return _keep(vals, d, keepdim), _keep(at, d, keepdim)


@lowering("kthvalue")
def kthvalue(self, k, dim=-1, keepdim=False):
    if self.ndim == 0:
        return mx.array(self), mx.zeros((), dtype=mx.int64)
    d = _dim(dim, self.ndim)
    shape = list(self.shape)
    shape[d] = 1
    return _pick(self, d, mx.full(shape, k - 1, dtype=mx.int64), keepdim)


def _nan_count(self, d: int) -> mx.array:
    if not mx.issubdtype(self.dtype, mx.floating):
        shape = list(self.shape)
        shape[d] = 1
        return mx.zeros(shape, dtype=mx.int64)
    return mx.sum(mx.isnan(self), axis=d, keepdims=True).astype(mx.int64)


def _median_dim(self, dim, keepdim, ignore_nan: bool):
    if self.ndim == 0:
        return mx.array(self), mx.zeros((), dtype=mx.int64)
    d = _dim(dim, self.ndim)
    n = self.shape[d]
    nans = _nan_count(self, d)
    if ignore_nan:  # the lower median of the non-NaN values; a NaN row gives its first NaN
        count = n - nans
        pos = mx.where(count > 0, (count - 1) // 2, 0)
    else:  # any NaN makes the median NaN: the first NaN, which sorts first among the NaNs
        pos = mx.where(nans > 0, n - nans, mx.array((n - 1) // 2, dtype=mx.int64))
    return _pick(self, d, pos, keepdim)


@lowering("median.dim")
def median_dim(self, dim, keepdim=False):
    return _median_dim(self, dim, keepdim, False)


@lowering("nanmedian.dim")
def nanmedian_dim(self, dim, keepdim=False):
    return _median_dim(self, dim, keepdim, True)


def _median_all(self, ignore_nan: bool):
    if self.size == 0:
        return mx.array(math.nan, dtype=self.dtype)
    return _median_dim(mx.reshape(self, (-1,)), 0, False, ignore_nan)[0]


@lowering("median")
def median(self):
    return _median_all(self, False)


@lowering("nanmedian")
def nanmedian(self):
    return _median_all(self, True)


@lowering("mode")
def mode(self, dim=-1, keepdim=False):
    """The most frequent value (the smallest among equally frequent ones) and the index of its
    last occurrence, along ``dim``."""
    if self.ndim == 0:
        return mx.array(self), mx.zeros((), dtype=mx.int64)
    d = _dim(dim, self.ndim)
    x = mx.moveaxis(self, d, -1)
    n = x.shape[-1]
    idx = _argsort(_sortable(x), -1, False)
    s = mx.take_along_axis(x, idx, axis=-1)
    pos = mx.arange(n, dtype=mx.int64)
    if n > 1:
        differs = s[..., 1:] != s[..., :-1]
        true = mx.ones(s.shape[:-1] + (1,), dtype=mx.bool_)
        starts = mx.concatenate([true, differs], axis=-1)
        ends = mx.concatenate([differs, true], axis=-1)
    else:
        starts = ends = mx.ones(s.shape, dtype=mx.bool_)
    run_start = mx.cummax(mx.where(starts, pos, 0), axis=-1)
    length = mx.where(ends, pos - run_start + 1, 0)
    best = mx.argmax(length == mx.max(length, axis=-1, keepdims=True), axis=-1, keepdims=True)
    vals = mx.take_along_axis(s, best, axis=-1)
    # the stable sort keeps a run's original indices ascending: its last is the largest
    at = mx.take_along_axis(idx, best, axis=-1)
    vals, at = mx.moveaxis(vals, -1, d), mx.moveaxis(at, -1, d)
    return _keep(vals, d, keepdim), _keep(at, d, keepdim)


# ----------------------------------------------------------------------------------------------
# Scans


def _scan_dtype(self, dtype):
    if dtype is not None:
        return dtype
    if self.dtype == mx.bool_ or mx.issubdtype(self.dtype, mx.integer):
        return mx.int64
    return self.dtype


def _scan(fn, self, dim, dtype):
    out_dtype = _scan_dtype(self, dtype)
    x = self.astype(out_dtype)
    if self.ndim == 0:
        return x
    # half-precision scans accumulate in float32, as torch's CPU kernels do
    work = x.astype(mx.float32) if out_dtype in _LOW_PRECISION else x
    return fn(work, axis=_dim(dim, self.ndim)).astype(out_dtype)


@lowering("cumsum")
def cumsum(self, dim, dtype=None):
    return _scan(mx.cumsum, self, dim, dtype)


@lowering("cumprod")
def cumprod(self, dim, dtype=None):
    return _scan(mx.cumprod, self, dim, dtype)


def _same(a: mx.array, b: mx.array) -> mx.array:
    """Equal, counting NaN as equal to NaN."""
    eq = a == b
    if mx.issubdtype(a.dtype, mx.floating):
        eq = mx.logical_or(eq, mx.logical_and(mx.isnan(a), mx.isnan(b)))
    return eq


def _cum_extreme(self, dim, largest: bool):
    """Running max/min and the index of the last element equal to it (torch updates the index on
    ties and on NaN, which then sticks: NaN propagates)."""
    if self.ndim == 0:
        return mx.array(self), mx.zeros((), dtype=mx.int64)
    d = _dim(dim, self.ndim)
    if self.shape[d] == 0:
        return mx.array(self), mx.zeros(self.shape, dtype=mx.int64)
    x = self.astype(mx.uint8) if self.dtype == mx.bool_ else self
    vals = mx.cummax(x, axis=d) if largest else mx.cummin(x, axis=d)
    if mx.issubdtype(x.dtype, mx.floating):  # NaN sticks once seen
        seen = mx.cummax(mx.isnan(x).astype(mx.uint8), axis=d) > 0
        vals = mx.where(seen, mx.array(math.nan, dtype=x.dtype), vals)
    n = self.shape[d]
    shape = [1] * self.ndim
    shape[d] = n
    pos = mx.reshape(mx.arange(n, dtype=mx.int64), shape)
    idx = mx.cummax(mx.where(_same(x, vals), pos, 0), axis=d)
    return vals.astype(self.dtype), idx


@lowering("cummax")
def cummax(self, dim):
    return _cum_extreme(self, dim, True)


@lowering("cummin")
def cummin(self, dim):
    return _cum_extreme(self, dim, False)


@lowering("_logcumsumexp")
def logcumsumexp(self, dim):
    if self.ndim == 0:
        return mx.array(self)
    work = self.astype(mx.float32) if self.dtype in _LOW_PRECISION else self
    return mx.logcumsumexp(work, axis=_dim(dim, self.ndim)).astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# unique


def _runs(differs: mx.array, n: int):
    """From "row i differs from row i-1" (i = 1..n-1) over n sorted rows: the run id of each
    row, the start position and length of each run (the number of runs is evaluated)."""
    from .indexing import _nonzero_flat  # the shared O(n) compaction

    if n == 0:
        empty = mx.zeros((0,), dtype=mx.int64)
        return empty, empty, empty
    starts_mask = mx.concatenate([mx.ones((1,), dtype=mx.bool_), differs])
    run_id = mx.cumsum(starts_mask.astype(mx.int64)) - 1
    starts = _nonzero_flat(starts_mask)
    counts = mx.concatenate([starts[1:], mx.array([n], dtype=mx.int64)]) - starts
    return run_id, starts, counts


def _inverse(perm: mx.array, run_id: mx.array) -> mx.array:
    """For each original row, the id of the run its sorted position belongs to."""
    inv = mx.zeros(perm.shape, dtype=mx.int64)
    if perm.size:
        inv[perm] = run_id
    return inv


def _unique_flat(self, return_inverse, return_counts):
    x = mx.reshape(self, (-1,))
    empty = mx.zeros((0,), dtype=mx.int64)
    perm = _argsort(_sortable(x), 0, False)
    s = x[perm]
    differs = s[1:] != s[:-1] if x.size else mx.zeros((0,), dtype=mx.bool_)
    run_id, starts, counts = _runs(differs, x.size)
    values = s[starts]
    inverse = mx.reshape(_inverse(perm, run_id), self.shape) if return_inverse else empty
    return values, inverse, counts if return_counts else empty


@lowering("_unique2", meta=False)
def unique2(self, sorted=True, return_inverse=False, return_counts=False):
    # CPU returns sorted values whether or not sorted=True is asked for.
    return _unique_flat(self, return_inverse, return_counts)


@lowering("_unique", meta=False)
def unique(self, sorted=True, return_inverse=False):
    values, inverse, _ = _unique_flat(self, return_inverse, False)
    return values, inverse


def _lex_argsort(rows: mx.array) -> mx.array:
    """Stable lexicographic order of the rows of a 2-D array: stable sorts by each column,
    last column first."""
    perm = mx.arange(rows.shape[0], dtype=mx.int64)
    for c in reversed(range(rows.shape[1])):
        key = _sortable(rows[perm, c])
        perm = perm[_argsort(key, 0, False)]
    return perm


def _unique_slices(self, dim, consecutive: bool, return_inverse, return_counts):
    d = _dim(dim, self.ndim)
    if self.size == 0 and self.shape[d] != 0 or self.ndim == 0:
        raise RuntimeError("There are 0 sized dimensions, and they aren't selected, so unique "
                           "cannot be applied")
    moved = mx.moveaxis(self, d, 0)
    n = moved.shape[0]
    rows = mx.reshape(moved, (n, math.prod(moved.shape[1:])))
    perm = mx.arange(n, dtype=mx.int64) if consecutive else _lex_argsort(rows)
    s = rows[perm]
    differs = mx.any(s[1:] != s[:-1], axis=1) if n > 1 else mx.zeros((max(n - 1, 0),), mx.bool_)
    run_id, starts, counts = _runs(differs, n)
    values = mx.moveaxis(mx.reshape(s[starts], (starts.size,) + moved.shape[1:]), 0, d)
    return values, _inverse(perm, run_id), counts


@lowering("unique_dim", meta=False)
def unique_dim(self, dim, sorted=True, return_inverse=False, return_counts=False):
    return _unique_slices(self, dim, False, return_inverse, return_counts)


@lowering("unique_dim_consecutive", meta=False)
def unique_dim_consecutive(self, dim, return_inverse=False, return_counts=False):
    return _unique_slices(self, dim, True, return_inverse, return_counts)


@lowering("unique_consecutive", meta=False)
def unique_consecutive(self, return_inverse=False, return_counts=False, dim=None):
    if dim is not None:
        return _unique_slices(self, dim, True, return_inverse, return_counts)
    x = mx.reshape(self, (-1,))
    empty = mx.zeros((0,), dtype=mx.int64)
    differs = x[1:] != x[:-1] if x.size else mx.zeros((0,), dtype=mx.bool_)
    run_id, starts, counts = _runs(differs, x.size)
    inverse = mx.reshape(run_id, self.shape) if return_inverse else empty
    return x[starts], inverse, counts if return_counts else empty


# ----------------------------------------------------------------------------------------------
# Binary search


def _search(boundaries: mx.array, values: mx.array, right: bool) -> mx.array:
    """torch's CPU bucket search: the first position whose boundary is not below the value
    (``>=``; ``>`` for right=True), with the comparisons written as the CPU kernel writes them
    so that NaN on either side lands where it does there. ``boundaries`` is 1-D, or has the
    leading dimensions of ``values``. Vectorised bisection: ceil(log2(n + 1)) steps."""
    n = boundaries.shape[-1]
    lo = mx.zeros(values.shape, dtype=mx.int64)
    hi = mx.full(values.shape, n, dtype=mx.int64)
    for _ in range(max(n, 1).bit_length()):
        mid = (lo + hi) // 2
        safe = mx.minimum(mid, n - 1)
        if boundaries.ndim == 1:
            b = mx.take(boundaries, safe)
        else:
            b = mx.take_along_axis(boundaries, safe, axis=-1)
        go_right = mx.logical_not(b > values if right else b >= values)
        active = lo < hi
        lo = mx.where(mx.logical_and(active, go_right), mid + 1, lo)
        hi = mx.where(mx.logical_and(active, mx.logical_not(go_right)), mid, hi)
    return lo


def _common(a: mx.array, b: mx.array):
    dtype = to_mx_dtype(torch.promote_types(to_torch_dtype(a.dtype), to_torch_dtype(b.dtype)))
    return a.astype(dtype), b.astype(dtype)


@lowering("searchsorted.Tensor", "searchsorted.Scalar")
def searchsorted(sorted_sequence, self, out_int32=False, right=False, side=None, sorter=None):
    if side is not None:
        right = side == "right"
    values = self if isinstance(self, mx.array) else mx.array(self)
    seq = sorted_sequence
    if sorter is not None:
        seq = mx.take_along_axis(seq, _i64(sorter), axis=-1)
    if seq.shape[-1] == 0:
        return mx.zeros(values.shape, dtype=mx.int32 if out_int32 else mx.int64)
    seq, values = _common(seq, values)
    out = _search(seq, values, right)
    return out.astype(mx.int32) if out_int32 else out


@lowering("bucketize.Tensor", "bucketize.Scalar")
def bucketize(self, boundaries, out_int32=False, right=False):
    if boundaries.ndim != 1:
        raise RuntimeError(f"boundaries tensor must be 1 dimension, but got dim({boundaries.ndim})")
    values = self if isinstance(self, mx.array) else mx.array(self)
    if boundaries.size == 0:
        return mx.zeros(values.shape, dtype=mx.int32 if out_int32 else mx.int64)
    boundaries, values = _common(boundaries, values)
    out = _search(boundaries, values, right)
    return out.astype(mx.int32) if out_int32 else out


# ----------------------------------------------------------------------------------------------
# Counting


def _widen_equal_range(left: float, right: float, dtype) -> tuple[float, float]:
    """histc's empty range [v, v]: one below and above, or the next representable values where
    1 is below the dtype's resolution (torch's bins_edges_correction)."""
    if dtype in (mx.float32,):
        f = np.float32
        lo = min(float(np.nextafter(f(left), f(-np.inf))), left - 1.0)
        hi = max(float(np.nextafter(f(right), f(np.inf))), right + 1.0)
        return lo, hi
    return left - 1.0, right + 1.0


@lowering("histc")
def histc(self, bins=100, min=0, max=0):
    left, right = float(min), float(max)
    x = mx.reshape(self, (-1,))
    if left == right and x.size:
        if registry.tracing():
            raise RuntimeError("histc with an inferred range cannot be compiled")
        left, right = float(mx.min(x).item()), float(mx.max(x).item())
    if left == right:
        left, right = _widen_equal_range(left, right, self.dtype)
    if not (math.isfinite(left) and math.isfinite(right)):
        raise RuntimeError(f"torch.histc: range of [{left}, {right}] is not finite")
    if not left < right:
        raise RuntimeError("torch.histc: max must be larger than min")
    # The CPU kernel's arithmetic, in the input dtype: bin = trunc((x - lo) * bins / (hi - lo)).
    lo, hi = mx.array(left, dtype=self.dtype), mx.array(right, dtype=self.dtype)
    inside = mx.logical_and(x >= lo, x <= hi)  # also drops NaN
    pos = mx.floor(((x - lo) * mx.array(bins, dtype=self.dtype)) / (hi - lo))
    pos = mx.where(inside, pos, 0).astype(mx.int64)
    pos = mx.minimum(pos, bins - 1)  # the last bin includes its right edge
    return mx.zeros((bins,), dtype=self.dtype).at[pos].add(inside.astype(self.dtype))


@lowering("bincount", meta=False)  # the length is max(self) + 1
def bincount(self, weights=None, minlength=0):
    if minlength < 0:
        raise RuntimeError("minlength should be >= 0")
    if self.ndim != 1 or self.dtype == mx.bool_ or not mx.issubdtype(self.dtype, mx.integer):
        raise RuntimeError("bincount only supports 1-d non-negative integral inputs.")
    if weights is not None and (weights.ndim != 1 or weights.shape[0] != self.shape[0]):
        raise RuntimeError("weights should be 1-d and have the same length as input")
    out_dtype = mx.int64 if weights is None else (
        weights.dtype if weights.dtype == mx.float32 else None)
    if out_dtype is None:  # CPU counts non-float32 weights in float64
        raise TypeError("mlx does not support dtype torch.float64 (bincount of weights that are "
                        "not float32 returns float64); pass float32 weights")
    if self.size == 0:
        return mx.zeros((minlength,), dtype=out_dtype)
    if mx.min(self).item() < 0:
        raise RuntimeError("bincount only supports 1-d non-negative integral inputs.")
    n = int(mx.max(self).item()) + 1
    size = n if n > minlength else minlength
    add = mx.ones(self.shape, dtype=out_dtype) if weights is None else weights
    return accumulate_at(mx.zeros((size,), dtype=out_dtype), _i64(self), add)


def _linspace(start: float, end: float, steps: int, dtype) -> mx.array:
    """torch's CPU linspace: the first half counts up from start, the second half down from end
    (so both ends are exact), with the step in the output dtype."""
    lo, hi = mx.array(start, dtype=dtype), mx.array(end, dtype=dtype)
    if steps == 1:
        return mx.reshape(lo, (1,))
    step = (hi - lo) / mx.array(steps - 1, dtype=dtype)
    i = mx.arange(steps)
    up = lo + step * i.astype(dtype)
    down = hi - step * (steps - 1 - i).astype(dtype)
    return mx.where(i < steps // 2, up, down)


def _histogramdd(points: mx.array, edges: list, weight, density: bool) -> mx.array:
    """Counts (or summed weights) of the rows of ``points`` (M, D) per D-dimensional bin of the
    increasing per-dimension ``edges``: bin i of a dimension holds edges[i] <= x < edges[i + 1],
    its last bin also the right edge; a point outside the edges or with a NaN coordinate is
    dropped (torch's rule)."""
    dtype = points.dtype
    shape = [e.shape[0] - 1 for e in edges]
    flat = mx.zeros((points.shape[0],), dtype=mx.int64)
    inside = mx.ones((points.shape[0],), dtype=mx.bool_)
    for d, e in enumerate(edges):
        x = points[:, d]
        inside = mx.logical_and(inside, mx.logical_and(x >= e[0], x <= e[-1]))
        pos = mx.clip(_search(e, x, True) - 1, 0, shape[d] - 1)
        flat = flat * shape[d] + pos
    w = mx.ones((points.shape[0],), dtype=dtype) if weight is None else \
        mx.reshape(weight, (-1,)).astype(dtype)
    hist = accumulate_at(mx.zeros((math.prod(shape),), dtype=dtype), mx.where(inside, flat, 0),
                         mx.where(inside, w, mx.zeros((), dtype)))
    hist = mx.reshape(hist, shape)
    if density:
        hist = hist / mx.sum(hist)
        for d, e in enumerate(edges):
            view = [1] * len(edges)
            view[d] = shape[d]
            hist = hist / mx.reshape(e[1:] - e[:-1], view)
    return hist


def _histogram(self, edges: mx.array, weight, density: bool) -> mx.array:
    return _histogramdd(mx.reshape(self, (-1, 1)), [edges], weight, density)


def _histogram_checks(self, weight):
    if not mx.issubdtype(self.dtype, mx.floating):
        raise RuntimeError("torch.histogram: input tensor and bins tensors should have the same "
                           "dtype, and be floating point")
    if weight is not None and tuple(weight.shape) != tuple(self.shape):
        raise RuntimeError("torch.histogram: if weight tensor is provided it should have the "
                           "same shape as the input tensor excluding its innermost dimension")


def _outer_edges(points: mx.array, range_, what: str) -> list[tuple[float, float]]:
    """torch's select_outer_bin_edges: the given range, (0, 1) for no points, else each
    dimension's min and max; an empty range widens by 0.5 each way."""
    dims = points.shape[1]
    if range_ is not None:
        pairs = [(float(range_[2 * d]), float(range_[2 * d + 1])) for d in builtins.range(dims)]
    elif points.shape[0] == 0:
        pairs = [(0.0, 1.0)] * dims
    else:
        if registry.tracing():
            raise RuntimeError(f"{what} with an inferred range cannot be compiled")
        lo, hi = mx.min(points, axis=0), mx.max(points, axis=0)
        mx.eval(lo, hi)
        pairs = list(zip(lo.tolist(), hi.tolist()))
    out = []
    for d, (left, right) in enumerate(pairs):
        if not (math.isfinite(left) and math.isfinite(right)):
            raise RuntimeError(f"{what}: dimension {d}'s range [{left}, {right}] is not finite"
                               if dims > 1 or what.endswith("dd") else
                               f"{what}: range of [{left}, {right}] is not finite")
        if left > right:
            raise RuntimeError(f"{what}: min should not exceed max, but got min {left} max "
                               f"{right}")
        out.append((left - 0.5, right + 0.5) if left == right else (left, right))
    return out


@lowering("histogram.bin_ct")
def histogram_bin_ct(self, bins=100, range=None, weight=None, density=False):
    _histogram_checks(self, weight)
    [(left, right)] = _outer_edges(mx.reshape(self, (-1, 1)), range, "torch.histogram")
    edges = _linspace(left, right, bins + 1, self.dtype)
    return _histogram(self, edges, weight, density), edges


@lowering("histogram.bins_tensor")
def histogram_bins_tensor(self, bins, weight=None, density=False):
    _histogram_checks(self, weight)
    edges = bins.astype(self.dtype)
    return _histogram(self, edges, weight, density), mx.array(edges)


def _points(self) -> mx.array:
    return mx.reshape(self, (-1, self.shape[-1]))


def _check_bin_count(self, bins) -> None:
    if len(bins) != self.shape[-1]:
        raise RuntimeError("histogramdd: The size of bins must be equal to the innermost "
                           "dimension of the input.")


def _bin_edges(self, bins, range_):
    _check_bin_count(self, bins)
    pts = _points(self)
    pairs = _outer_edges(pts, range_, "torch.histogramdd")
    return [_linspace(lo, hi, n + 1, self.dtype) for (lo, hi), n in zip(pairs, bins)]


@lowering("_histogramdd_bin_edges")
def histogramdd_bin_edges(self, bins, range=None, weight=None, density=False):
    return _bin_edges(self, bins, range)


@lowering("_histogramdd_from_bin_cts")
def histogramdd_from_bin_cts(self, bins, range=None, weight=None, density=False):
    return _histogramdd(_points(self), _bin_edges(self, bins, range), weight, density)


@lowering("_histogramdd_from_bin_tensors")
def histogramdd_from_bin_tensors(self, bins, weight=None, density=False):
    _check_bin_count(self, bins)
    return _histogramdd(_points(self), [b.astype(self.dtype) for b in bins], weight, density)
