"""Linear algebra: mm, bmm, addmm, baddbmm, matmul, linear, dot/mv, einsum via decomposition, linalg.*.

matmul, linear, einsum, tensordot, inner, outer and kron are CompositeImplicitAutograd: torch
decomposes them into the products below before they reach the device.
"""
import mlx.core as mx

from .nn import _gelu
from .registry import lowering


def _is_inexact(a) -> bool:
    return mx.issubdtype(a.dtype, mx.inexact)


def _matmul(a, b):
    """``a @ b`` for (batched) matrices. MLX's matmul takes floating types only; integer
    products are summed exactly (with the wrap-around of the integer dtype, as on CPU)."""
    if _is_inexact(a):
        return mx.matmul(a, b)
    return mx.sum(mx.expand_dims(a, -1) * mx.expand_dims(b, -3), axis=-2)


def _add_scaled(self, product, beta, alpha):
    """``beta * self + alpha * product``. With beta == 0 torch ignores ``self`` entirely, so
    NaN and inf in it do not propagate."""
    if alpha != 1:
        product = product * alpha
    if beta == 0:
        return product
    return product + (self if beta == 1 else self * beta)


@lowering("mm")
def mm(self, mat2):
    return _matmul(self, mat2)


@lowering("bmm")
def bmm(self, mat2):
    return _matmul(self, mat2)


@lowering("mv")
def mv(self, vec):
    return _matmul(self, vec[:, None])[:, 0]


@lowering("dot")
def dot(self, tensor):
    return _matmul(self[None], tensor[:, None])[0, 0]


@lowering("vdot")
def vdot(self, other):
    """The first vector is conjugated (a no-op for real dtypes)."""
    if mx.issubdtype(self.dtype, mx.complexfloating):
        self = mx.conj(self)
    return dot(self, other)


@lowering("addmm")
def addmm(self, mat1, mat2, beta=1, alpha=1):
    return _add_scaled(self, _matmul(mat1, mat2), beta, alpha)


@lowering("_addmm_activation")
def addmm_activation(self, mat1, mat2, beta=1, alpha=1, use_gelu=False):
    """addmm followed by relu, or by gelu's tanh approximation (as torch's CPU kernel does)."""
    out = addmm(self, mat1, mat2, beta, alpha)
    return _gelu(out, "tanh") if use_gelu else mx.maximum(out, 0)


@lowering("addmv")
def addmv(self, mat, vec, beta=1, alpha=1):
    return _add_scaled(self, mv(mat, vec), beta, alpha)


@lowering("baddbmm")
def baddbmm(self, batch1, batch2, beta=1, alpha=1):
    return _add_scaled(self, _matmul(batch1, batch2), beta, alpha)


@lowering("addbmm")
def addbmm(self, batch1, batch2, beta=1, alpha=1):
    """The batch of products summed: one (n, b*m) @ (b*m, p) product."""
    b, n, m = batch1.shape
    lhs = mx.reshape(mx.transpose(batch1, (1, 0, 2)), (n, b * m))
    rhs = mx.reshape(batch2, (b * m, batch2.shape[2]))
    return _add_scaled(self, _matmul(lhs, rhs), beta, alpha)


@lowering("addr")
def addr(self, vec1, vec2, beta=1, alpha=1):
    return _add_scaled(self, mx.multiply(vec1[:, None], vec2[None, :]), beta, alpha)
