"""Reductions: sum, mean, prod, amax/amin, max/min (dim), argmax/argmin, all/any, var/std, norms,
logsumexp.

torch's meta kernels fix the result dtype and shape; a lowering chooses the accumulation dtype
as torch's CPU kernels do: integers and bools sum and multiply in int64, half-precision floats
accumulate in float32 (MLX would accumulate float16 in float16 and overflow).
"""
import math

import mlx.core as mx

from .registry import accumulate_at, lowering


def _axes(dim, ndim: int) -> tuple:
    """torch's dim argument as MLX axes: None or [] reduces every dimension."""
    if ndim == 0:
        return ()
    if dim is None:
        return tuple(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return tuple(range(ndim))
    return tuple(sorted(d % ndim for d in dims))


def _is_float(a) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def _accumulate(x, dtype=None):
    """``x`` in the dtype torch accumulates a sum or product in."""
    if dtype is not None:
        x = x.astype(dtype)
    if x.dtype in (mx.float16, mx.bfloat16):
        return x.astype(mx.float32)
    if x.dtype == mx.bool_ or mx.issubdtype(x.dtype, mx.integer):
        return x.astype(mx.int64)
    return x


def _count(x, axes) -> int:
    return math.prod(x.shape[a] for a in axes)


def _reduced_shape(x, axes, keepdims):
    return [1 if i in axes else n for i, n in enumerate(x.shape) if keepdims or i not in axes]


def _with_identity(reduce, identity):
    """An MLX reduction whose empty inputs give the identity directly: MLX's evaluation of a
    reduction over a zero-size array has stalled for minutes in long runs (prod over a (3, 0)
    tensor in the conformance sweep), and the answer needs no evaluation."""
    def reduced(x, axis=None, keepdims=False):
        if x.size:
            return reduce(x, axis=axis, keepdims=keepdims)
        axes = tuple(range(x.ndim)) if axis is None else axis
        return mx.full(_reduced_shape(x, axes, keepdims), identity, x.dtype)
    return reduced


_sum = _with_identity(mx.sum, 0)
_prod = _with_identity(mx.prod, 1)
_all = _with_identity(mx.all, True)
_any = _with_identity(mx.any, False)
# max/min have no identity: an empty input reaches them only when the result is empty too (torch
# raises for a reduction over an empty dimension), so the fill value is never seen
_max = _with_identity(mx.max, 0)
_min = _with_identity(mx.min, 0)


@lowering("sum.dim_IntList", "sum")
def sum_(self, dim=None, keepdim=False, dtype=None):
    return _sum(_accumulate(self, dtype), axis=_axes(dim, self.ndim), keepdims=keepdim)


@lowering("nansum")
def nansum(self, dim=None, keepdim=False, dtype=None):
    x = _accumulate(self, dtype)
    if _is_float(x):
        x = mx.where(mx.isnan(x), 0, x)
    return _sum(x, axis=_axes(dim, self.ndim), keepdims=keepdim)


@lowering("mean.dim", "mean")
def mean(self, dim=None, keepdim=False, dtype=None):
    x = _accumulate(self, dtype)
    axes = _axes(dim, self.ndim)
    return _sum(x, axis=axes, keepdims=keepdim) / _count(x, axes)


@lowering("prod.dim_int")
def prod_dim(self, dim, keepdim=False, dtype=None):
    return _prod(_accumulate(self, dtype), axis=_axes(dim, self.ndim), keepdims=keepdim)


@lowering("prod")
def prod(self, dtype=None):
    return _prod(_accumulate(self, dtype))


@lowering("amax")
def amax(self, dim=(), keepdim=False):
    return _max(self, axis=_axes(dim, self.ndim), keepdims=keepdim)  # NaN propagates


@lowering("amin")
def amin(self, dim=(), keepdim=False):
    return _min(self, axis=_axes(dim, self.ndim), keepdims=keepdim)


def _check_full_reduction(name, x):
    if x.size == 0:  # torch's meta kernel does not check this
        raise RuntimeError(f"{name}(): Expected reduction dim to be specified for input.numel() "
                           f"== 0. Specify the reduction dim with the 'dim' argument.")


@lowering("max")
def max_(self):
    _check_full_reduction("max", self)
    return _max(self)


@lowering("min")
def min_(self):
    _check_full_reduction("min", self)
    return _min(self)


@lowering("aminmax")
def aminmax(self, dim=None, keepdim=False):
    axes = _axes(dim, self.ndim)
    return (_min(self, axis=axes, keepdims=keepdim),
            _max(self, axis=axes, keepdims=keepdim))


def _arg(fn, x, dim, keepdim, name):
    # MLX's argmax/argmin pick the first extreme, and a NaN counts as the extreme, as in torch
    if x.ndim == 0:
        return mx.array(0)
    if dim is None:
        index = fn(mx.reshape(x, (-1,)))
        return mx.reshape(index, (1,) * x.ndim) if keepdim else index
    axis = dim % x.ndim
    if x.shape[axis] == 0:
        raise IndexError(f"{name}(): Expected reduction dim {dim} to have non-zero size.")
    if x.size == 0:  # other dimensions are empty: an empty result
        shape = list(x.shape)
        shape[axis:axis + 1] = [1] if keepdim else []
        return mx.zeros(shape, mx.int64)
    return fn(x, axis=axis, keepdims=keepdim)


@lowering("argmax")
def argmax(self, dim=None, keepdim=False):
    return _arg(mx.argmax, self, dim, keepdim, "argmax")


@lowering("argmin")
def argmin(self, dim=None, keepdim=False):
    return _arg(mx.argmin, self, dim, keepdim, "argmin")


@lowering("max.dim")
def max_dim(self, dim, keepdim=False):
    indices = _arg(mx.argmax, self, dim, keepdim, "max")
    return _max(self, axis=_axes(dim, self.ndim), keepdims=keepdim), indices


@lowering("min.dim")
def min_dim(self, dim, keepdim=False):
    indices = _arg(mx.argmin, self, dim, keepdim, "min")
    return _min(self, axis=_axes(dim, self.ndim), keepdims=keepdim), indices


def _truth(x):
    return x if x.dtype == mx.bool_ else x != 0  # NaN is true


@lowering("all", "all.dim", "all.dims")
def all_(self, dim=None, keepdim=False):
    return _all(_truth(self), axis=_axes(dim, self.ndim), keepdims=keepdim)


@lowering("any", "any.dim", "any.dims")
def any_(self, dim=None, keepdim=False):
    return _any(_truth(self), axis=_axes(dim, self.ndim), keepdims=keepdim)


@lowering("count_nonzero.dim_IntList", "count_nonzero")
def count_nonzero(self, dim=None):
    return _sum(_truth(self).astype(mx.int64), axis=_axes(dim, self.ndim))


def _var(x, dim, correction, keepdim):
    """Two-pass variance: sum((x - mean)^2) / max(0, N - correction); N - correction <= 0 gives
    inf or NaN, as in torch."""
    x = _accumulate(x)
    axes = _axes(dim, x.ndim)
    n = _count(x, axes)
    mean = _sum(x, axis=axes, keepdims=True) / n
    centered = x - mean
    if centered.dtype == mx.complex64:
        sq = mx.real(centered * mx.conj(centered))
    else:
        sq = centered * centered
    var = _sum(sq, axis=axes, keepdims=keepdim) / max(0, n - (1 if correction is None else
                                                                  correction))
    return var, mean if keepdim else mx.squeeze(mean, axis=axes)


@lowering("var.correction")
def var(self, dim=None, correction=None, keepdim=False):
    return _var(self, dim, correction, keepdim)[0]


@lowering("std.correction")
def std(self, dim=None, correction=None, keepdim=False):
    return mx.sqrt(_var(self, dim, correction, keepdim)[0])


@lowering("var_mean.correction")
def var_mean(self, dim=None, correction=None, keepdim=False):
    return _var(self, dim, correction, keepdim)


@lowering("std_mean.correction")
def std_mean(self, dim=None, correction=None, keepdim=False):
    var, mean = _var(self, dim, correction, keepdim)
    return mx.sqrt(var), mean


def _vector_norm(x, ord, dim, keepdim, dtype=None):
    x = mx.abs(_accumulate(x, dtype))
    axes = _axes(dim, x.ndim)
    if ord == math.inf:
        return _max(x, axis=axes, keepdims=keepdim)
    if ord == -math.inf:
        return _min(x, axis=axes, keepdims=keepdim)
    if ord == 0:
        return _sum((x != 0).astype(x.dtype), axis=axes, keepdims=keepdim)
    if ord == 1:
        return _sum(x, axis=axes, keepdims=keepdim)
    if ord == 2:
        return mx.sqrt(_sum(x * x, axis=axes, keepdims=keepdim))
    return mx.power(_sum(mx.power(x, ord), axis=axes, keepdims=keepdim), 1.0 / ord)


@lowering("linalg_vector_norm")
def linalg_vector_norm(self, ord=2, dim=None, keepdim=False, dtype=None):
    return _vector_norm(self, ord, dim, keepdim, dtype)


@lowering("norm.ScalarOpt_dim", "norm.ScalarOpt_dim_dtype")
def norm_dim(self, p=2, dim=(), keepdim=False, dtype=None):
    return _vector_norm(self, 2 if p is None else p, dim, keepdim, dtype)


@lowering("norm.Scalar", "norm.ScalarOpt_dtype")
def norm(self, p=2, dtype=None):
    return _vector_norm(self, 2 if p is None else p, None, False, dtype)


@lowering("logsumexp")
def logsumexp(self, dim, keepdim=False):
    # torch's composite: shifted by the maximum, with infinite maxima replaced by 0 (all -inf
    # gives -inf, any +inf gives +inf); every step rounds to the input dtype, the sum
    # accumulates in float32
    x = self if _is_float(self) else self.astype(mx.float32)
    axes = _axes(dim, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        return mx.log(_sum(mx.exp(x), axis=axes, keepdims=keepdim))
    maxes = _max(x, axis=axes, keepdims=True)
    maxes = mx.where(mx.isinf(maxes), mx.array(0, x.dtype), maxes)
    total = _sum(_accumulate(mx.exp(x - maxes)), axis=axes, keepdims=True).astype(x.dtype)
    out = mx.log(total) + maxes
    return out if keepdim else mx.squeeze(out, axis=axes)


@lowering("hash_tensor")
def hash_tensor(self, dim=(), keepdim=False, mode=0):
    """XOR of the elements' 64-bit patterns (mode 0, the only one torch has): floating values
    widened to float64, integers sign-extended to int64, bools 0/1, all read as uint64."""
    if mode != 0:
        raise RuntimeError(f"hash_tensor only supports mode=0, got {mode}")
    if mx.issubdtype(self.dtype, mx.floating):  # float64 exists on MLX's CPU stream
        bits = mx.view(self.astype(mx.float64, stream=mx.cpu), mx.uint64, stream=mx.cpu)
    elif self.dtype == mx.bool_:
        bits = self.astype(mx.uint64)
    else:
        bits = mx.view(self.astype(mx.int64), mx.uint64)
    axes = _axes(dim, self.ndim)
    kept = [a for a in range(self.ndim) if a not in axes]
    x = mx.transpose(bits, kept + list(axes)) if self.ndim else bits
    x = mx.reshape(x, [self.shape[a] for a in kept] + [_count(self, axes)])
    while x.shape[-1] > 1:  # pairwise XOR halves: log2(n) steps
        n = x.shape[-1]
        if n % 2:
            x = mx.concatenate([x, mx.zeros(x.shape[:-1] + (1,), mx.uint64)], axis=-1)
            n += 1
        x = mx.bitwise_xor(x[..., :n // 2], x[..., n // 2:])
    if x.shape[-1] == 0:  # an empty reduction: XOR's identity
        x = mx.zeros(x.shape[:-1] + (1,), mx.uint64)
    return mx.reshape(x[..., 0], _reduced_shape(self, axes, keepdim))


_SEGMENT_IDENTITY = {"sum": 0, "mean": 0, "prod": 1, "max": -math.inf, "min": math.inf}


@lowering("segment_reduce")
def segment_reduce(data, reduce, lengths=None, indices=None, offsets=None, axis=0,
                   unsafe=False, initial=None):
    """Reductions over consecutive segments of ``data`` along ``axis`` (lengths, or offsets
    whose differences are the lengths), as torch's CPU kernel: every element is scattered into
    its segment's slot (sum / prod / max / min), NaN propagates through max and min, an empty
    segment gives ``initial`` or the reduction's identity, and a mean divides the sum (initial
    included) by the length, NaN for an empty segment without ``initial``."""
    if reduce not in _SEGMENT_IDENTITY:
        raise RuntimeError(f"segment_reduce: unsupported reduction {reduce}")
    if lengths is None:
        lengths = offsets[..., 1:] - offsets[..., :-1]
    axis %= data.ndim
    outer, n, rest = data.shape[:axis], data.shape[axis], data.shape[axis + 1:]
    b, r, s = math.prod(outer), math.prod(rest), lengths.shape[-1]
    lens = mx.reshape(lengths, (b, s)).astype(mx.int64)
    ends = mx.cumsum(lens, axis=-1)
    # each element's segment; elements past the last end (none when the lengths add up, as
    # torch checks unless unsafe) land in an extra slot that is dropped
    seg = mx.sum(ends[:, :, None] <= mx.arange(n)[None, None, :], axis=1)
    slots = mx.reshape(mx.arange(b)[:, None] * (s + 1) + seg, (-1,))
    vals = mx.reshape(data, (b * n, r))
    start = _SEGMENT_IDENTITY[reduce] if initial is None else initial
    out = mx.full((b * (s + 1), r), start, data.dtype)
    if b * n * r:
        if reduce in ("sum", "mean"):
            out = accumulate_at(out, slots, vals)
        elif reduce == "prod":
            out = accumulate_at(out, slots, vals, "multiply")
        else:
            out = out.at[slots].maximum(vals) if reduce == "max" else out.at[slots].minimum(vals)
            if _is_float(data):
                nans = mx.zeros(out.shape, mx.int32).at[slots].add(mx.isnan(vals).astype(mx.int32))
                out = mx.where(nans > 0, math.nan, out)
    out = mx.reshape(out, (b, s + 1, r))[:, :s]
    if reduce == "mean":
        count = lens[:, :, None]
        mean = out / mx.maximum(count, 1).astype(out.dtype)
        empty = out if initial is not None else mx.full(out.shape, math.nan, out.dtype)
        out = mx.where(count > 0, mean, empty)
    return mx.reshape(out, outer + (s,) + rest)
