"""Indexing: index.Tensor, index_put, index_select/copy/add/fill/reduce, gather, scatter*,
masked_*, where, nonzero, take, put, embedding.

Functional ops are MLX lowerings (eager and compiled). In-place ops that write into part of an
existing tensor (``index_put_``, ``index_copy_``, ``scatter_``, ``masked_fill_``, ...) are
registered explicitly with ``@torch_kernel``: the adapter's derived in-place kernel would compute
the whole functional result and copy it back, O(size of the destination). Here MLX computes only
what is written -- the element offsets into the destination's storage and the values -- and
``_store`` writes them through the zero-copy CPU alias of the same (unified) memory, so a write
into a KV cache costs O(bytes written). MLX itself cannot write into an existing buffer: its
scatter produces a new array.

Index errors follow the CPU kernels: the same exception type and message, and the same rules on
negative indices (``index``/``index_fill``/``take``/``put`` wrap them, ``gather``/``scatter``/
``index_add``/``index_copy``/``index_select`` reject them).
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import torch

from .. import _C
from . import registry
from .registry import lowering, to_mx_dtype, torch_kernel

_INDEX_DTYPES = (mx.int64, mx.int32)
_MASK_DTYPES = (mx.bool_, mx.uint8)


def _dim(d: int, ndim: int) -> int:
    """Wrap a dimension like torch (a 0-d tensor has one addressable dimension, 0 / -1)."""
    n = max(ndim, 1)
    if not -n <= d < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], "
                         f"but got {d})")
    return d + n if d < 0 else d


def _i64(a: mx.array) -> mx.array:
    return a if a.dtype == mx.int64 else a.astype(mx.int64)


def _wrap_checked(idx: mx.array, size: int, dim: int, negative: bool = True,
                  exc=IndexError, msg: str | None = None) -> mx.array:
    """``idx`` as int64 in [0, size), raising torch's error for an out-of-range entry.

    ``negative``: indices in [-size, 0) count from the end (advanced indexing, take, put,
    index_fill); otherwise they are errors (gather, scatter, index_add, ...). The check reads
    the evaluated indices on the host (zero-copy: memory is unified), which costs far less than
    a chain of MLX reductions; the wrap is an MLX op only when an index is negative."""
    if idx.size == 0:
        return _i64(idx)
    if registry.tracing():  # no evaluation inside mx.compile: the check is eager-only
        idx = _i64(idx)
        return mx.where(idx < 0, idx + size, idx) if negative else idx
    # checked as given, cast after: an index tensor torch made is already evaluated, so reading
    # it costs no MLX round trip (its int64 cast would be one more evaluation, a wait each)
    host = _host(idx).numpy()
    idx = _i64(idx)
    low = -size if negative else 0
    smallest, largest = host.min(), host.max()
    if smallest < low or largest >= size:
        flat = host.reshape(-1)
        i = int(flat[np.argmax((flat < low) | (flat >= size))])
        raise exc(msg.format(i=i) if msg is not None else
                  f"index {i} is out of bounds for dimension {dim} with size {size}")
    return mx.where(idx < 0, idx + size, idx) if negative and smallest < 0 else idx


def _host(a: mx.array) -> torch.Tensor:
    """A CPU tensor over the bytes of an MLX array (evaluating it), no copy."""
    if a.dtype == mx.bfloat16:  # no NumPy dtype: go through a torch storage
        return _C.cpu_alias(_C.from_mlx(a))
    return torch.from_numpy(np.asarray(a))


def _nonzero_flat(mask: mx.array) -> mx.array:
    """Row-major positions (int64) of the true entries of a flattened mask.

    The count is data dependent, so it is evaluated; positions are then scattered to their rank
    (O(n), no sort). False entries are sent to a scratch slot past the end. Positions are int32
    below 2**31 elements: MLX's GPU scatter takes no 8-byte types."""
    flat = mx.reshape(mask, (-1,)).astype(mx.bool_)
    n = int(mx.sum(flat.astype(mx.int64)).item())
    if n == flat.size:
        return mx.arange(n, dtype=mx.int64)
    pos_dtype = mx.int32 if flat.size < 2**31 else mx.int64
    rank = mx.cumsum(flat.astype(pos_dtype)) - 1
    dest = mx.where(flat, rank, n)
    out = mx.zeros((n + 1,), dtype=pos_dtype)
    out[dest] = mx.arange(flat.size, dtype=pos_dtype)
    return out[:n].astype(mx.int64)


def _unravel(pos: mx.array, shape) -> list[mx.array]:
    """Row-major flat positions -> one coordinate array per dimension of ``shape``."""
    coords, rem = [], pos
    for d in reversed(range(len(shape))):
        size = max(int(shape[d]), 1)
        coords.append(rem % size)
        rem = rem // size
    return coords[::-1]


def _nonzero(mask: mx.array) -> mx.array:
    pos = _nonzero_flat(mask)
    if mask.ndim == 0:
        return mx.zeros((pos.size, 0), dtype=mx.int64)
    return mx.stack(_unravel(pos, mask.shape), axis=1) if pos.size else \
        mx.zeros((0, mask.ndim), dtype=mx.int64)


def _grid(shape, strides) -> mx.array:
    """sum_d arange(shape[d]) * strides[d], broadcast over ``shape`` (int64)."""
    total = mx.zeros(tuple(shape), dtype=mx.int64)
    nd = len(shape)
    for d, (n, st) in enumerate(zip(shape, strides)):
        if n > 1 and st:
            view = [1] * nd
            view[d] = n
            total = total + mx.reshape(mx.arange(n, dtype=mx.int64) * st, view)
    return total


def _broadcast_values(values: mx.array, shape, what: str = "indexing result") -> mx.array:
    try:
        return mx.broadcast_to(values, tuple(shape))
    except ValueError:
        raise RuntimeError(f"shape mismatch: value tensor of shape {list(values.shape)} cannot be "
                           f"broadcast to {what} of shape {list(shape)}") from None


# ----------------------------------------------------------------------------------------------
# Writing into existing storage


def _check_writable(self: torch.Tensor) -> None:
    if torch._debug_has_internal_overlap(self) == 1:
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to a "
            "single memory location. Please clone() the tensor before performing the operation.")


def _store(self: torch.Tensor, offsets: mx.array, values: mx.array, reduce: str | None = None,
           include_self: bool = True) -> torch.Tensor:
    """Write ``values`` (broadcast to ``offsets``' shape) at the element ``offsets`` of ``self``
    (relative to its data pointer, in its strides) and return ``self``. Costs O(offsets.size).

    ``reduce`` (``sum``/``prod``/``mean``/``amax``/``amin``) combines with what is there and
    among duplicate offsets, as ``scatter_reduce_`` does; the combination has to happen at the
    destination, so it is done by the CPU kernel that performs the store."""
    if offsets.size == 0 or self.numel() == 0:
        return self
    span = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride()))
    flat = _C.cpu_alias(self).as_strided((span,), (1,))
    want = to_mx_dtype(self.dtype)
    if values.dtype != want:
        values = values.astype(want)
    offs = mx.reshape(_i64(offsets), (-1,))
    vals = mx.reshape(mx.broadcast_to(values, offsets.shape), (-1,))
    mx.eval(offs, vals)  # one evaluation for both
    offs, vals = _host(offs), _host(vals)
    # scatter_ / scatter_add_ on a 1-D alias: CPU's index_put_ is ~500x slower for this shape.
    if reduce is None:
        flat.scatter_(0, offs, vals)
    elif reduce == "sum" and include_self:
        flat.scatter_add_(0, offs, vals)
    else:
        flat.scatter_reduce_(0, offs, vals, reduce, include_self=include_self)
    return self


def _mx(t):
    """An argument of a torch-level kernel as MLX (CPU 0-d tensors become scalars' arrays)."""
    if isinstance(t, torch.Tensor):
        if t.device.type == "mlx":
            return _C.to_mlx(t)
        if t.dim() == 0 and t.device.type == "cpu":
            return mx.array(t.item(), dtype=to_mx_dtype(t.dtype))
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                           f"devices, mlx:0 and {t.device}!")
    return t


def _check(op, *args, **kwargs) -> None:
    """torch's argument checks for ``op`` (its meta kernel, cached by argument metadata)."""
    registry._meta_info(op, args, kwargs, None)


# ----------------------------------------------------------------------------------------------
# Advanced indexing: index.Tensor, index_put


_TYPE_NAMES = {mx.float32: "Float", mx.float16: "Half", mx.bfloat16: "BFloat16",
               mx.int64: "Long", mx.int32: "Int", mx.int16: "Short", mx.int8: "Char",
               mx.uint8: "Byte", mx.bool_: "Bool", mx.complex64: "ComplexFloat"}


def _expand_indices(shape, indices) -> list:
    """torch's ``expandTensors``: bool/uint8 masks become one long index per masked dimension,
    with torch's checks on index dtypes, mask shapes and the number of indices."""
    out = []
    for idx in indices:
        if idx is None:
            out.append(None)
        elif idx.dtype in _MASK_DTYPES:
            pos = len(out)
            if pos + idx.ndim > len(shape):
                raise IndexError(f"too many indices for tensor of dimension {len(shape)}")
            for j in range(idx.ndim):
                if idx.shape[j] != shape[pos + j]:
                    raise IndexError(f"The shape of the mask {list(idx.shape)} at index {j} does "
                                     f"not match the shape of the indexed tensor {list(shape)} "
                                     f"at index {pos + j}")
            if idx.ndim == 0:  # as in ATen, a 0-d mask names no dimension (Python indexing
                continue       # turns x[True] into an unsqueeze before it reaches aten)
            coords = _nonzero(idx)
            out.extend(coords[:, j] for j in range(idx.ndim))
        elif idx.dtype in _INDEX_DTYPES:
            out.append(idx)
        else:
            raise IndexError("tensors used as indices must be long, int, byte or bool tensors")
    if len(out) > len(shape):
        raise IndexError(f"too many indices for tensor of dimension {len(shape)}")
    return out


class _Plan:
    """Where ``self[indices]`` reads from: the indexed dimensions are moved to the front and
    flattened into one, addressed by ``lin``; the result is (broadcast index shape + the other
    dimensions), moved back to the indexed dimensions' place when those were adjacent (NumPy's
    and torch's rule)."""

    def __init__(self, shape, indices):
        shape = tuple(shape)
        indices = _expand_indices(shape, indices)
        self.shape = shape
        self.dims = [d for d, i in enumerate(indices) if i is not None]
        self.rest = [d for d in range(len(shape)) if d not in self.dims]
        wrapped = [_wrap_checked(indices[d], shape[d], d) for d in self.dims]
        self.idx = mx.broadcast_arrays(*wrapped) if len(wrapped) > 1 else wrapped
        self.bshape = tuple(self.idx[0].shape) if self.idx else ()
        self.rest_shape = tuple(shape[d] for d in self.rest)
        dims = self.dims
        self.adjacent = bool(dims) and dims == list(range(dims[0], dims[-1] + 1))
        self.before = dims[0] if self.adjacent else 0

    def lin(self) -> mx.array:
        lin = self.idx[0]
        for k in range(1, len(self.dims)):
            lin = lin * self.shape[self.dims[k]] + self.idx[k]
        return lin

    def front(self, x: mx.array) -> mx.array:
        """``x`` with the indexed dims flattened into dim 0, the others after it."""
        x = mx.transpose(x, self.dims + self.rest) if self.dims != list(range(len(self.dims))) \
            else x
        return mx.reshape(x, (math.prod(self.shape[d] for d in self.dims),) + self.rest_shape)

    def result_shape(self):
        if self.adjacent:
            r = self.rest_shape
            return r[:self.before] + self.bshape + r[self.before:]
        return self.bshape + self.rest_shape

    def to_result(self, out: mx.array) -> mx.array:
        """(bshape + rest) layout -> torch's result layout."""
        if not self.adjacent or self.before == 0:
            return out
        nb = len(self.bshape)
        perm = list(range(nb, nb + self.before)) + list(range(nb)) + \
            list(range(nb + self.before, out.ndim))
        return mx.transpose(out, perm)

    def from_result(self, vals: mx.array) -> mx.array:
        """torch's result layout -> (bshape + rest) layout."""
        if not self.adjacent or self.before == 0:
            return vals
        nb = len(self.bshape)
        perm = list(range(self.before, self.before + nb)) + list(range(self.before)) + \
            list(range(self.before + nb, vals.ndim))
        return mx.transpose(vals, perm)


def _index_list_op(name: str):
    """Register an MLX lowering whose ``Tensor?[] indices`` may hold CPU tensors.

    torch lets advanced indexing of a device tensor use CPU index tensors (CUDA moves them to
    the device); the adapter rightly rejects mixed devices for every other op. So the eager
    kernel is a torch-level one that moves such indices to "mlx" and then runs the lowering
    through the adapter; the lowering itself is the table entry the compiled path uses."""
    op = registry.overload(name)

    def register(fn):
        kernel = None

        def eager(self, indices, *args, **kwargs):
            nonlocal kernel
            if kernel is None:
                kernel = registry.functional_kernel(op, registry.TABLE[name])
            return kernel(self, _on_device(indices, self.device), *args, **kwargs)

        torch_kernel(name)(eager)  # before the lowering: a name may not be registered twice
        out = registry.out_variant(op)
        if out is not None:
            torch_kernel(registry._qualname(out))(
                registry.out_kernel(out, op, registry.out_names(out._schema)))
        return lowering(name, meta=False, eager=False)(fn)

    return register


def _on_device(indices, device):
    return [i.to(device) if isinstance(i, torch.Tensor) and i.device.type == "cpu" else i
            for i in indices]


@_index_list_op("index.Tensor")  # boolean masks make the result shape data dependent
def index(self, indices):
    if len(indices) > max(self.ndim, 0) and not any(
            i is not None and i.dtype in _MASK_DTYPES for i in indices):
        raise IndexError(f"too many indices for tensor of dimension {self.ndim}")
    plan = _Plan(self.shape, indices)
    if not plan.dims:
        return mx.array(self)
    if len(plan.dims) == 1:  # one index tensor: a take along its dimension has torch's layout
        return mx.take(self, plan.idx[0], axis=plan.dims[0])
    out = mx.take(plan.front(self), mx.reshape(plan.lin(), (-1,)), axis=0)
    return plan.to_result(mx.reshape(out, plan.bshape + plan.rest_shape))


def _check_put_dtype(self_dtype, values: mx.array) -> None:
    if values.dtype != self_dtype:
        raise RuntimeError(
            "Index put requires the source and destination dtypes match, got "
            f"{_TYPE_NAMES.get(self_dtype, self_dtype)} for the destination and "
            f"{_TYPE_NAMES.get(values.dtype, values.dtype)} for the source.")


def _index_put_values(self_dtype, plan: _Plan, values: mx.array) -> mx.array:
    _check_put_dtype(self_dtype, values)
    vals = _broadcast_values(values, plan.result_shape())
    return plan.from_result(vals)  # bshape + rest layout


@_index_list_op("index_put")
def index_put(self, indices, values, accumulate=False):
    plan = _Plan(self.shape, indices)
    if not plan.dims:  # self[...] = values over every element
        _check_put_dtype(self.dtype, values)
        vals = _broadcast_values(values, self.shape)
        return mx.add(self, vals) if accumulate else mx.array(vals)
    vals = _index_put_values(self.dtype, plan, values)
    x = plan.front(self)
    lin = mx.reshape(plan.lin(), (-1,))
    vals = mx.reshape(vals, (math.prod(plan.bshape),) + plan.rest_shape)
    if accumulate:
        x = registry.accumulate_at(x, lin, vals)
    else:
        x = mx.reshape(x, x.shape)  # a new array object: __setitem__ rebinds only it
        x[lin] = vals
    # undo front(): unflatten, then the inverse permutation
    x = mx.reshape(x, tuple(self.shape[d] for d in plan.dims) + plan.rest_shape)
    perm = plan.dims + plan.rest
    inv = [perm.index(d) for d in range(len(perm))]
    return mx.transpose(x, inv)


def _index_put_inplace(self, indices, values, accumulate=False, unsafe=False):
    _check_writable(self)
    if len(indices) > self.dim() and not any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
        raise IndexError(f"too many indices for tensor of dimension {self.dim()}")
    if self.numel() == 0:
        return self
    indices = _on_device(indices, self.device)
    plan = _Plan(self.shape, [_mx(i) if i is not None else None for i in indices])
    values = _mx(values)
    strides = self.stride()
    if not plan.dims:
        _check_put_dtype(to_mx_dtype(self.dtype), values)
        offsets = _grid(self.shape, strides)
        vals = _broadcast_values(values, self.shape)
    else:
        vals = _index_put_values(to_mx_dtype(self.dtype), plan, values)
        off_idx = mx.zeros(plan.bshape, dtype=mx.int64)
        for k, d in enumerate(plan.dims):
            off_idx = off_idx + plan.idx[k] * strides[d]
        off_rest = _grid(plan.rest_shape, [strides[d] for d in plan.rest])
        nr = len(plan.rest_shape)
        offsets = mx.reshape(off_idx, plan.bshape + (1,) * nr) + off_rest
    return _store(self, offsets, vals, "sum" if accumulate else None)


torch_kernel("index_put_")(_index_put_inplace)
torch_kernel("_index_put_impl_")(_index_put_inplace)


# ----------------------------------------------------------------------------------------------
# index_select, index_copy, index_add, index_fill, index_reduce, take, put, embedding


def _index_1d(index: mx.array, what: str) -> mx.array:
    if index.ndim > 1:
        raise IndexError(f"{what}(): Index is supposed to be a vector")
    return mx.reshape(index, (-1,))


def _along(shape, strides, dim: int, index: mx.array) -> mx.array:
    """Storage offsets of ``t.index_select(dim, index)`` for a tensor of (shape, strides):
    shape with dim replaced by len(index)."""
    n = index.size
    sub = list(shape)
    sub[dim] = n
    others = list(strides)
    others[dim] = 0
    view = [1] * len(shape)
    view[dim] = n
    return _grid(sub, others) + mx.reshape(index * strides[dim], view)


@lowering("index_select")
def index_select(self, dim, index):
    # CPU's kernel checks the index dtype; the meta kernel does not.
    if index.dtype not in (mx.int32, mx.int64):
        raise RuntimeError("index_select(): Expected dtype int32 or int64 for index")
    dim = _dim(dim, self.ndim)
    size = self.shape[dim] if self.ndim else 1
    idx = _wrap_checked(mx.reshape(index, (-1,)), size, dim, negative=False,
                        msg="index out of range in self")
    if self.ndim == 0:
        return mx.array(self)
    return mx.take(self, idx, axis=dim)


def _source_nd(x: mx.array, ndim: int) -> mx.array:
    """A 0-d self/source pairs with 1-element tensors in the index_* ops."""
    return mx.reshape(x, (1,) * max(ndim, 1)) if x.ndim == 0 else x


def _index_copy_args(self, dim, index, name):
    dim = _dim(dim, self.ndim)
    idx = _index_1d(index, name)
    size = self.shape[dim] if self.ndim else 1
    return dim, idx, size


@lowering("index_copy")
def index_copy(self, dim, index, source):
    dim, idx, size = _index_copy_args(self, dim, index, "index_copy")
    idx = _wrap_checked(idx, size, dim, negative=False,
                        msg="index_copy_(): index {i} is out of bounds for dimension "
                            f"{dim} with size {size}")
    if idx.size == 0:
        return self
    x, src = _source_nd(self, 1), _source_nd(source, 1)
    # one scatter whose input is self itself (no transposed copy), of source's slices (the
    # indexed axis kept, size 1): MLX computes it in self's buffer where it may donate it, which
    # is how a compiled graph writes a lent KV cache in place (torch_mlx.compile)
    updates = mx.expand_dims(mx.moveaxis(src.astype(self.dtype), dim, 0), dim + 1)
    return mx.reshape(_C.scatter(x, [idx], updates, [dim]), self.shape)


def _check_source_shape(self_shape, source_shape, dim: int) -> None:
    """index_add's CPU check, which its meta kernel lacks: source has self's shape but at dim."""
    if len(self_shape) != len(source_shape) or any(
            a != b for i, (a, b) in enumerate(zip(self_shape, source_shape)) if i != dim):
        raise RuntimeError("source tensor shape must match self tensor shape, excluding the "
                           f"specified dimension. Got self.shape = {list(self_shape)} "
                           f"source.shape = {list(source_shape)}")


@lowering("index_add")
def index_add(self, dim, index, source, alpha=1):
    dim, idx, size = _index_copy_args(self, dim, index, "index_add")
    _check_source_shape(self.shape, source.shape, dim)
    idx = _wrap_checked(idx, size, dim, negative=False, exc=RuntimeError)
    src = _source_nd(source, 1).astype(self.dtype)
    if alpha != 1:
        src = src * alpha if self.dtype != mx.bool_ else mx.logical_and(src, bool(alpha))
    x = mx.swapaxes(_source_nd(self, 1), 0, dim)
    if self.dtype == mx.bool_:
        x = x.astype(mx.int32).at[idx].add(mx.swapaxes(src, 0, dim).astype(mx.int32)) != 0
    else:
        x = registry.accumulate_at(x, idx, mx.swapaxes(src, 0, dim))
    return mx.reshape(mx.swapaxes(x, 0, dim), self.shape)


def _fill_value(value, dtype):
    if isinstance(value, mx.array):
        return value.astype(dtype)
    return mx.array(value, dtype=dtype)


@lowering("index_fill.int_Scalar", "index_fill.int_Tensor")
def index_fill(self, dim, index, value):
    dim = _dim(dim, self.ndim)
    size = self.shape[dim] if self.ndim else 1
    idx = _wrap_checked(_index_1d(index, "index_fill"), size, dim)
    x = mx.swapaxes(_source_nd(self, 1), 0, dim)
    x = mx.reshape(x, x.shape)
    x[idx] = _fill_value(value, self.dtype)
    return mx.reshape(mx.swapaxes(x, 0, dim), self.shape)


def _extreme(dtype, reduce: str):
    """The identity of amax (lowest value) / amin (highest value) for ``dtype``."""
    if dtype == mx.bool_:
        return reduce == "amin"
    if mx.issubdtype(dtype, mx.floating):
        return -math.inf if reduce == "amax" else math.inf
    info = mx.iinfo(dtype)
    return info.min if reduce == "amax" else info.max


def _scatter_reduce(x: mx.array, key, src: mx.array, reduce: str, include_self: bool,
                    touched_shape) -> mx.array:
    """``x`` with ``src`` combined in at ``key`` (an ``.at[]`` key) by ``reduce``, torch's
    ``scatter_reduce`` semantics: positions no index names keep their value; with
    ``include_self=False`` touched positions start from the reduction's identity; amax/amin
    propagate NaN; mean divides by the count (floor division for integers)."""
    dtype = x.dtype
    is_float = mx.issubdtype(dtype, mx.floating)
    touched = mx.zeros(x.shape, dtype=mx.int32).at[key].add(
        mx.ones(touched_shape, dtype=mx.int32))
    hit = touched > 0
    work = x.astype(mx.int32) if dtype == mx.bool_ else x
    s = src.astype(work.dtype)
    if reduce in ("sum", "mean"):
        base = work if include_self else mx.where(hit, mx.zeros_like(work), work)
        out = registry.accumulate_at(base, key, s)
        if reduce == "mean":
            count = touched + (1 if include_self else 0)
            count = mx.maximum(count, 1)
            if is_float:
                out = mx.where(hit, out / count.astype(dtype), out)
            else:
                out = mx.where(hit, mx.floor_divide(out, count.astype(out.dtype)), out)
    elif reduce == "prod":
        base = work if include_self else mx.where(hit, mx.ones_like(work), work)
        out = registry.accumulate_at(base, key, s, "multiply")
    elif reduce in ("amax", "amin"):
        ident = mx.array(_extreme(work.dtype, reduce), dtype=work.dtype)
        base = work if include_self else mx.where(hit, ident, work)
        out = base.at[key].maximum(s) if reduce == "amax" else base.at[key].minimum(s)
        if is_float:  # MLX's scatter max/min drop NaN; torch's propagate it
            nan_in = mx.zeros(x.shape, dtype=mx.int32).at[key].add(
                mx.isnan(s).astype(mx.int32)) > 0
            if include_self:
                nan_in = mx.logical_or(nan_in, mx.logical_and(hit, mx.isnan(work)))
            out = mx.where(nan_in, mx.array(math.nan, dtype=dtype), out)
    else:
        raise RuntimeError(f"reduce argument must be either sum, prod, mean, amax or amin, got "
                           f"{reduce}")
    if dtype == mx.bool_:
        out = out != 0
    return out.astype(dtype)


@lowering("index_reduce")
def index_reduce(self, dim, index, source, reduce, include_self=True):
    dim = _dim(dim, self.ndim)
    size = self.shape[dim] if self.ndim else 1
    idx = _wrap_checked(_index_1d(index, "index_reduce"), size, dim, negative=False,
                        msg="index out of range in self")
    x = mx.swapaxes(_source_nd(self, 1), 0, dim)
    src = mx.swapaxes(_source_nd(source, 1), 0, dim)
    out = _scatter_reduce(x, idx, src, reduce, include_self, src.shape)
    return mx.reshape(mx.swapaxes(out, 0, dim), self.shape)


@lowering("take")
def take(self, index):
    n = self.size
    if n == 0 and index.size:
        raise IndexError("take(): tried to take from an empty tensor")
    idx = _wrap_checked(index, n, 0,
                        msg="out of range: tried to access index {i} on a tensor of "
                            f"{n} elements.")
    return mx.take(mx.reshape(self, (-1,)), idx) if idx.size else \
        mx.zeros(index.shape, dtype=self.dtype)


def _put_index(self_shape, index: mx.array) -> mx.array:
    n = math.prod(self_shape)
    return _wrap_checked(mx.reshape(index, (-1,)), n, 0,
                         msg="out of range: tried to access index {i} on a tensor of "
                             f"{n} elements.")


@lowering("put")
def put(self, index, source, accumulate=False):
    idx = _put_index(self.shape, index)
    if idx.size == 0:
        return mx.array(self)
    flat = mx.reshape(self, (-1,))
    src = mx.reshape(source, (-1,)).astype(self.dtype)
    if accumulate:
        flat = registry.accumulate_at(flat, idx, src)
    else:
        flat = mx.reshape(flat, flat.shape)
        flat[idx] = src
    return mx.reshape(flat, self.shape)


@lowering("embedding")
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    # padding_idx, scale_grad_by_freq and sparse only change the backward.
    idx = _wrap_checked(indices, weight.shape[0], 0, negative=False,
                        msg="index out of range in self")
    return mx.take(weight, idx, axis=0)


# In place: the values and offsets of the written rows only.


@torch_kernel("index_copy_")
def index_copy_(self, dim, index, source):
    _check(torch.ops.aten.index_copy_.default, self, dim, index, source)
    _check_writable(self)
    if self.numel() == 0 or index.numel() == 0:
        return self
    d = _dim(dim, self.dim())
    size = self.shape[d] if self.dim() else 1
    idx = _wrap_checked(_index_1d(_mx(index), "index_copy"), size, d, negative=False,
                        msg="index_copy_(): index {i} is out of bounds for dimension "
                            f"{d} with size {size}")
    shape, strides = (list(self.shape) or [1]), (list(self.stride()) or [1])
    offsets = _along(shape, strides, d, idx)
    return _store(self, offsets, mx.reshape(_mx(source), offsets.shape))


@torch_kernel("index_add_")
def index_add_(self, dim, index, source, *, alpha=1):
    _check(torch.ops.aten.index_add_.default, self, dim, index, source, alpha=alpha)
    _check_writable(self)
    d = _dim(dim, self.dim())
    _check_source_shape(self.shape, source.shape, d)
    if self.numel() == 0 or index.numel() == 0:
        return self
    size = self.shape[d] if self.dim() else 1
    idx = _wrap_checked(_index_1d(_mx(index), "index_add"), size, d, negative=False,
                        exc=RuntimeError)
    shape, strides = (list(self.shape) or [1]), (list(self.stride()) or [1])
    offsets = _along(shape, strides, d, idx)
    src = mx.reshape(_mx(source), offsets.shape)
    if alpha != 1:
        src = src * alpha if self.dtype != torch.bool else mx.logical_and(src, bool(alpha))
    if self.dtype == torch.bool:
        return _store(self, offsets, src, "amax")  # logical or
    return _store(self, offsets, src, "sum")


def _index_fill_(self, dim, index, value):
    op = torch.ops.aten.index_fill_.int_Tensor if isinstance(value, torch.Tensor) \
        else torch.ops.aten.index_fill_.int_Scalar
    _check(op, self, dim, index, value)
    _check_writable(self)
    if self.numel() == 0 or index.numel() == 0:
        return self
    d = _dim(dim, self.dim())
    size = self.shape[d] if self.dim() else 1
    idx = _wrap_checked(_index_1d(_mx(index), "index_fill"), size, d)
    shape, strides = (list(self.shape) or [1]), (list(self.stride()) or [1])
    return _store(self, _along(shape, strides, d, idx),
                  _fill_value(_mx(value), to_mx_dtype(self.dtype)))


torch_kernel("index_fill_.int_Scalar", "index_fill_.int_Tensor")(_index_fill_)


@torch_kernel("index_reduce_")
def index_reduce_(self, dim, index, source, reduce, *, include_self=True):
    _check(torch.ops.aten.index_reduce_.default, self, dim, index, source, reduce,
           include_self=include_self)
    _check_writable(self)
    if self.numel() == 0 or index.numel() == 0:
        return self
    d = _dim(dim, self.dim())
    size = self.shape[d] if self.dim() else 1
    idx = _wrap_checked(_index_1d(_mx(index), "index_reduce"), size, d, negative=False,
                        msg="index out of range in self")
    shape, strides = (list(self.shape) or [1]), (list(self.stride()) or [1])
    offsets = _along(shape, strides, d, idx)
    return _store(self, offsets, mx.reshape(_mx(source), offsets.shape), reduce, include_self)


@torch_kernel("put_")
def put_(self, index, source, accumulate=False):
    _check(torch.ops.aten.put_.default, self, index, source, accumulate)
    _check_writable(self)
    if index.numel() == 0:
        return self
    idx = _put_index(tuple(self.shape), _mx(index))
    # logical (row-major) index -> storage offset through self's strides
    coords = _unravel(idx, tuple(self.shape) or (1,))
    offsets = mx.zeros(idx.shape, dtype=mx.int64)
    for c, st in zip(coords, self.stride() or (1,)):
        offsets = offsets + c * st
    src = mx.reshape(_mx(source), (-1,))
    return _store(self, offsets, src, "sum" if accumulate else None)


# ----------------------------------------------------------------------------------------------
# gather / scatter


def _check_gather_index(index: mx.array, size: int, dim: int) -> mx.array:
    return _wrap_checked(index, size, dim, negative=False, exc=RuntimeError)


@lowering("gather")
def gather(self, dim, index, sparse_grad=False):
    dim = _dim(dim, self.ndim)
    if index.size == 0:
        return mx.zeros(index.shape, dtype=self.dtype)
    if self.ndim == 0:
        _check_gather_index(index, 1, dim)
        return mx.broadcast_to(self, index.shape)
    idx = _check_gather_index(index, self.shape[dim], dim)
    # torch lets index be smaller than self in the other dimensions: read the leading block.
    block = tuple(slice(0, index.shape[d]) if d != dim else slice(None)
                  for d in range(self.ndim))
    return mx.take_along_axis(self[block], idx, axis=dim)


def _scatter_key(index: mx.array, dim: int):
    """The ``.at[]`` key (one coordinate array per dimension) of ``scatter`` along ``dim``."""
    nd = index.ndim
    key = []
    for d in range(nd):
        if d == dim:
            key.append(index)
        else:
            view = [1] * nd
            view[d] = index.shape[d]
            key.append(mx.broadcast_to(mx.reshape(mx.arange(index.shape[d]), view),
                                       index.shape))
    return tuple(key)


def _scatter_src(src, index: mx.array, dtype):
    if not isinstance(src, mx.array) or src.ndim == 0:
        return mx.broadcast_to(_fill_value(src, dtype), index.shape)
    block = tuple(slice(0, n) for n in index.shape)
    return src[block].astype(dtype)


def _scatter_prepare(self, dim, index):
    dim = _dim(dim, self.ndim)
    x = _source_nd(self, 1)
    idx = _source_nd(index, 1)
    idx = _check_gather_index(idx, x.shape[dim], dim)
    return dim, x, idx


_SCATTER_REDUCE = {"add": "sum", "multiply": "prod"}


@lowering("scatter.src", "scatter.value", "scatter.reduce", "scatter.value_reduce")
def scatter(self, dim, index, src=None, value=None, reduce=None):
    # scatter.value names its fill argument "value"; the adapter passes it positionally.
    if src is None:
        src = value
    if index.size == 0:
        return mx.array(self)
    dim, x, idx = _scatter_prepare(self, dim, index)
    vals = _scatter_src(src, idx, self.dtype)
    key = _scatter_key(idx, dim)
    if reduce is None:
        x = mx.reshape(x, x.shape)
        x[key] = vals
    else:
        x = _scatter_reduce(x, key, vals, _SCATTER_REDUCE[reduce], True, idx.shape)
    return mx.reshape(x, self.shape)


@lowering("scatter_add")
def scatter_add(self, dim, index, src):
    if index.size == 0:
        return mx.array(self)
    dim, x, idx = _scatter_prepare(self, dim, index)
    vals = _scatter_src(_source_nd(src, 1), idx, self.dtype)
    x = _scatter_reduce(x, _scatter_key(idx, dim), vals, "sum", True, idx.shape)
    return mx.reshape(x, self.shape)


@lowering("scatter_reduce.two")
def scatter_reduce(self, dim, index, src, reduce, include_self=True):
    if index.size == 0:
        return mx.array(self)
    dim, x, idx = _scatter_prepare(self, dim, index)
    vals = _scatter_src(_source_nd(src, 1), idx, self.dtype)
    x = _scatter_reduce(x, _scatter_key(idx, dim), vals, reduce, include_self, idx.shape)
    return mx.reshape(x, self.shape)


def _scatter_offsets(self: torch.Tensor, dim: int, idx: mx.array) -> mx.array:
    strides = list(self.stride()) or [1]
    others = list(strides)
    others[dim] = 0
    return _grid(idx.shape, others) + idx * strides[dim]


def _scatter_inplace(self, dim, index, src, reduce=None, include_self=True):
    _check_writable(self)
    if index.numel() == 0:
        return self
    d = _dim(dim, self.dim())
    idx = _source_nd(_mx(index), 1)
    size = self.shape[d] if self.dim() else 1
    idx = _check_gather_index(idx, size, d)
    vals = _scatter_src(_source_nd(_mx(src), 1) if isinstance(src, torch.Tensor) else src,
                        idx, to_mx_dtype(self.dtype))
    return _store(self, _scatter_offsets(self, d, idx), vals, reduce, include_self)


@torch_kernel("scatter_.src")
def scatter__src(self, dim, index, src):
    _check(torch.ops.aten.scatter_.src, self, dim, index, src)
    return _scatter_inplace(self, dim, index, src)


@torch_kernel("scatter_.value")
def scatter__value(self, dim, index, value):
    _check(torch.ops.aten.scatter_.value, self, dim, index, value)
    return _scatter_inplace(self, dim, index, value)


@torch_kernel("scatter_.reduce")
def scatter__reduce(self, dim, index, src, *, reduce):
    _check(torch.ops.aten.scatter_.reduce, self, dim, index, src, reduce=reduce)
    return _scatter_inplace(self, dim, index, src, _SCATTER_REDUCE[reduce])


@torch_kernel("scatter_.value_reduce")
def scatter__value_reduce(self, dim, index, value, *, reduce):
    _check(torch.ops.aten.scatter_.value_reduce, self, dim, index, value, reduce=reduce)
    return _scatter_inplace(self, dim, index, value, _SCATTER_REDUCE[reduce])


@torch_kernel("scatter_add_")
def scatter_add_(self, dim, index, src):
    _check(torch.ops.aten.scatter_add_.default, self, dim, index, src)
    return _scatter_inplace(self, dim, index, src, "sum")


@torch_kernel("scatter_reduce_.two")
def scatter_reduce_(self, dim, index, src, reduce, *, include_self=True):
    _check(torch.ops.aten.scatter_reduce_.two, self, dim, index, src, reduce,
           include_self=include_self)
    return _scatter_inplace(self, dim, index, src, reduce, include_self)


# ----------------------------------------------------------------------------------------------
# Masks: masked_fill, masked_select, masked_scatter, where, nonzero


def _check_mask(mask: mx.array, op: str) -> None:
    if mask.dtype != mx.bool_:
        raise RuntimeError(f"{op} only supports boolean masks, but got mask with dtype "
                           f"{registry.to_torch_dtype(mask.dtype)}".replace("torch.", ""))


@lowering("masked_fill.Scalar", "masked_fill.Tensor")
def masked_fill(self, mask, value):
    _check_mask(mask, "masked_fill_")
    return mx.where(mask, _fill_value(value, self.dtype), self)


def _mask_offsets(self: torch.Tensor, mask: mx.array) -> mx.array:
    """Storage offsets of self's elements where ``mask`` (broadcastable to self) is true.

    Dimensions along which the mask is broadcast are not materialised: the nonzero runs over
    the mask as given, so the cost is O(mask size + elements written)."""
    shape, strides = tuple(self.shape), self.stride()
    nd = len(shape)
    mshape = (1,) * (nd - mask.ndim) + tuple(mask.shape)
    m = mx.reshape(mask, mshape)
    kept = [d for d in range(nd) if mshape[d] == shape[d]]  # dims the mask spans
    spread = [d for d in range(nd) if d not in kept]  # dims it is broadcast along
    m = mx.reshape(m, tuple(shape[d] for d in kept))
    pos = _nonzero_flat(m)
    coords = _unravel(pos, tuple(shape[d] for d in kept)) if kept else []
    off = mx.zeros(pos.shape, dtype=mx.int64)
    for c, d in zip(coords, kept):
        off = off + c * strides[d]
    if not spread:
        return off
    grid = _grid([shape[d] for d in spread], [strides[d] for d in spread])
    return mx.reshape(off, (-1, 1)) + mx.reshape(grid, (1, -1))


def _masked_fill_(self, mask, value):
    op = torch.ops.aten.masked_fill_.Tensor if isinstance(value, torch.Tensor) \
        else torch.ops.aten.masked_fill_.Scalar
    _check(op, self, mask, value)
    _check_writable(self)
    if self.numel() == 0:
        return self
    m = _mx(mask)
    _check_mask(m, "masked_fill_")
    return _store(self, _mask_offsets(self, m), _fill_value(_mx(value), to_mx_dtype(self.dtype)))


torch_kernel("masked_fill_.Scalar", "masked_fill_.Tensor")(_masked_fill_)


@lowering("masked_select", meta=False)  # the result's length is the number of true entries
def masked_select(self, mask):
    if mask.dtype != mx.bool_:
        raise RuntimeError(
            f"masked_select: expected BoolTensor for mask")
    try:
        shape = mx.broadcast_shapes(self.shape, mask.shape)
    except ValueError:
        raise RuntimeError(f"The size of tensor a ({self.shape[-1]}) must match the size of "
                           f"tensor b ({mask.shape[-1]}) at non-singleton dimension") from None
    pos = _nonzero_flat(mx.broadcast_to(mask, shape))
    return mx.take(mx.reshape(mx.broadcast_to(self, shape), (-1,)), pos)


def _scatter_source_positions(mask: mx.array, source: mx.array):
    """For each true entry of ``mask``, the position in ``source`` it takes (its rank)."""
    flat = mx.reshape(mask, (-1,))
    count = int(mx.sum(flat.astype(mx.int64)).item())
    if count > source.size:
        raise RuntimeError("Number of elements of source < number of ones in mask")
    return flat, count


@lowering("masked_scatter")
def masked_scatter(self, mask, source):
    if mask.dtype != mx.bool_:
        raise RuntimeError(f"masked_scatter_ only supports boolean masks, but got mask with "
                           f"dtype {registry.to_torch_dtype(mask.dtype)}".replace("torch.", ""))
    shape = mx.broadcast_shapes(self.shape, mask.shape)  # torch expands self and mask
    m, self = mx.broadcast_to(mask, shape), mx.broadcast_to(self, shape)
    flat, count = _scatter_source_positions(m, source)
    if count == 0:
        return mx.array(self)
    rank = mx.cumsum(flat.astype(mx.int64)) - 1
    src = mx.reshape(source, (-1,)).astype(self.dtype)
    vals = mx.take(src, mx.clip(rank, 0, source.size - 1))
    return mx.where(m, mx.reshape(vals, shape), self)


@torch_kernel("masked_scatter_")
def masked_scatter_(self, mask, source):
    _check(torch.ops.aten.masked_scatter_.default, self, mask, source)
    _check_writable(self)
    m = _mx(mask)
    if m.dtype != mx.bool_:
        raise RuntimeError(f"masked_scatter_ only supports boolean masks, but got mask with "
                           f"dtype {registry.to_torch_dtype(m.dtype)}".replace("torch.", ""))
    if self.numel() == 0:
        return self
    try:  # source is read in self's row-major order over the expanded mask
        m = mx.broadcast_to(m, tuple(self.shape))
    except ValueError:
        raise RuntimeError(f"expand(mask of shape {list(m.shape)}, size={list(self.shape)}): "
                           "the mask must be broadcastable to self") from None
    src = _mx(source)
    flat, count = _scatter_source_positions(m, src)
    if count == 0:
        return self
    pos = _nonzero_flat(flat)
    offsets = mx.zeros(pos.shape, dtype=mx.int64)
    for c, st in zip(_unravel(pos, tuple(self.shape)), self.stride()):
        offsets = offsets + c * st
    return _store(self, offsets, mx.reshape(src, (-1,))[:count])


@lowering("where.self")
def where(condition, self, other):
    # The meta kernel gives the promoted dtype; compute in it so no precision is lost.
    dtype = mx.result_type(self, other) if isinstance(self, mx.array) else None
    if dtype is not None and isinstance(other, mx.array) and self.dtype != other.dtype:
        self, other = self.astype(dtype), other.astype(dtype)
    return mx.where(condition, self, other)


@lowering("nonzero", meta=False)  # the number of rows is the number of nonzero entries
def nonzero(self):
    return _nonzero(self != 0 if self.dtype != mx.bool_ else self)


@lowering("nonzero_static")
def nonzero_static(self, size, fill_value=-1):
    coords = _nonzero(self != 0 if self.dtype != mx.bool_ else self)
    n = coords.shape[0]
    if n >= size:
        return coords[:size]
    pad = mx.full((size - n, coords.shape[1]), fill_value, dtype=mx.int64)
    return mx.concatenate([coords, pad], axis=0)


@torch_kernel("embedding_renorm_")
def embedding_renorm_(self, indices, max_norm, norm_type):
    """Rescale, in place, the rows of ``self`` named in ``indices`` whose ``norm_type``-norm
    exceeds ``max_norm`` (``F.embedding(max_norm=...)``). Only those rows are written."""
    _check_writable(self)
    if self.dim() != 2:
        raise RuntimeError(f"embedding_renorm_(): Expected 2-D tensor for argument #1 'self' "
                           f"(got {self.dim()}-D tensor)")
    idx = _mx(indices)
    if idx.size == 0 or self.numel() == 0:
        return self
    touched = mx.zeros((self.shape[0],), dtype=mx.int32).at[
        _wrap_checked(mx.reshape(idx, (-1,)), self.shape[0], 0, negative=False,
                      msg="index out of range in self")].add(1)
    rows = _nonzero_flat(touched > 0)
    w = mx.take(_C.to_mlx(self), rows, axis=0)
    a = mx.abs(w).astype(mx.float32)
    if norm_type == math.inf:
        norm = mx.max(a, axis=1)
    elif norm_type == 0:
        norm = mx.sum(a != 0, axis=1).astype(mx.float32)
    else:
        norm = mx.power(mx.sum(mx.power(a, norm_type), axis=1), 1.0 / norm_type)
    # as the CPU kernel: row.norm() in the row's dtype, scale = max_norm / (norm + 1e-7) as a
    # scalar, row *= scale computed in float32 and rounded once
    norm = norm.astype(w.dtype).astype(mx.float32)
    scale = mx.where(norm > max_norm, max_norm / (norm + 1e-7), 1.0)
    new = (w.astype(mx.float32) * mx.reshape(scale, (-1, 1))).astype(w.dtype)
    offsets = _along(list(self.shape), list(self.stride()), 0, rows)
    return _store(self, offsets, new)
