"""View ops inside compiled graphs.

In eager mode a view must alias its input's storage, so views are native C++ kernels
(csrc/memory_ops.cpp) and ATen's composites over ``as_strided``. Inside a compiled MLX function
there is no storage to alias: a view is just another MLX op, lowered here with ``eager=False``.
"""
import mlx.core as mx

from .registry import lowering


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


@lowering("view", "_unsafe_view", "reshape", eager=False)
def view(self, size):
    return mx.reshape(self, [int(s) for s in size])


@lowering("permute", eager=False)
def permute(self, dims):
    return mx.transpose(self, [_dim(d, self.ndim) for d in dims])


@lowering("transpose.int", eager=False)
def transpose(self, dim0, dim1):
    return mx.swapaxes(self, dim0, dim1)


@lowering("t", eager=False)
def t(self):
    return mx.transpose(self) if self.ndim == 2 else self


@lowering("expand", eager=False)
def expand(self, size, implicit=False):
    lead = len(size) - self.ndim
    shape = [self.shape[i - lead] if int(s) == -1 else int(s) for i, s in enumerate(size)]
    return mx.broadcast_to(self, shape)


@lowering("slice.Tensor", eager=False)
def slice_(self, dim=0, start=None, end=None, step=1):
    dim = _dim(dim, self.ndim)
    n = self.shape[dim]
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None else (end + n if end < 0 else end)
    start, end = min(max(start, 0), n), min(max(end, 0), n)
    end = max(end, start)
    index = (slice(None),) * dim + (slice(start, end, step),)
    return self[index]


@lowering("select.int", eager=False)
def select(self, dim, index):
    dim = _dim(dim, self.ndim)
    index = index + self.shape[dim] if index < 0 else index
    return self[(slice(None),) * dim + (index,)]


@lowering("unsqueeze", eager=False)
def unsqueeze(self, dim):
    return mx.expand_dims(self, _dim(dim, self.ndim + 1))


@lowering("squeeze", eager=False)
def squeeze(self):
    return mx.squeeze(self) if self.ndim else self


@lowering("squeeze.dim", eager=False)
def squeeze_dim(self, dim):
    dim = _dim(dim, self.ndim) if self.ndim else 0
    return mx.squeeze(self, dim) if self.ndim and self.shape[dim] == 1 else self


@lowering("squeeze.dims", eager=False)
def squeeze_dims(self, dim):
    dims = [d for d in (_dim(d, self.ndim) for d in dim) if self.ndim and self.shape[d] == 1]
    return mx.squeeze(self, dims) if dims else self


@lowering("alias", "detach", "lift_fresh_copy", eager=False)
def alias(self):
    return self


@lowering("split_with_sizes", eager=False)
def split_with_sizes(self, split_sizes, dim=0):
    dim = _dim(dim, self.ndim)
    bounds, total = [], 0
    for s in split_sizes[:-1]:
        total += s
        bounds.append(total)
    return mx.split(self, bounds, axis=dim)


@lowering("split.Tensor", eager=False)
def split(self, split_size, dim=0):
    dim = _dim(dim, self.ndim)
    n = self.shape[dim]
    return mx.split(self, list(range(split_size, n, split_size)), axis=dim) if n else [self]


@lowering("unbind.int", eager=False)
def unbind(self, dim=0):
    dim = _dim(dim, self.ndim)
    return [self[(slice(None),) * dim + (i,)] for i in range(self.shape[dim])]


@lowering("diagonal", eager=False)
def diagonal(self, offset=0, dim1=0, dim2=1):
    return mx.diagonal(self, offset, dim1, dim2)


@lowering("slice_scatter", eager=False)
def slice_scatter(self, src, dim=0, start=None, end=None, step=1):
    """``self`` with ``self[dim: start:end:step] = src`` (the functional form of an assignment
    into a slice, e.g. ``q[..., n:] = q_pe`` in DeepSeek's MLA attention)."""
    dim = _dim(dim, self.ndim)
    n = self.shape[dim]
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None else (end + n if end < 0 else end)
    start, end = min(max(start, 0), n), min(max(end, 0), n)
    src = src.astype(self.dtype)
    if step == 1:
        return mx.slice_update(self, src, mx.array([start], dtype=mx.int32), [dim])
    out = mx.array(self)  # a new array object: setitem must not change the caller's `self`
    out[(slice(None),) * dim + (slice(start, max(end, start), step),)] = src
    return out


@lowering("copy", eager=False)
def copy(self, src, non_blocking=False):
    """The functional ``copy_``: ``src`` broadcast to ``self``'s shape in ``self``'s dtype."""
    return mx.broadcast_to(src.astype(self.dtype), self.shape)
