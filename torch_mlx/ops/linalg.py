"""Linear algebra: products (mm, bmm, addmm, baddbmm, addbmm, mv, addmv, dot, vdot, addr),
trace, cross, distances (cdist, pdist), decompositions and solvers (LU, Cholesky, QR and
Householder, SVD, eigh, eig, triangular, least squares, pinv, matrix_exp).

matmul, linear, einsum, tensordot, inner, outer and kron are CompositeImplicitAutograd: torch
decomposes them into the products below before they reach the device.
"""
import math

import mlx.core as mx
import torch

from .. import precision
from .nn import _gelu
from .registry import lowering, torch_kernel, tracing


def _is_inexact(a) -> bool:
    return mx.issubdtype(a.dtype, mx.inexact)


def _matmul(a, b):
    """``a @ b`` for (batched) matrices. MLX's matmul takes floating types only; integer
    products are summed exactly (with the wrap-around of the integer dtype, as on CPU). float32
    products on the GPU follow torch's float32 matmul precision (torch_mlx/precision.py)."""
    if _is_inexact(a):
        if not tracing():  # compiled graphs: MlxGraph.forward did it before tracing
            precision.ensure()
        return precision.matmul(a, b)
    return mx.sum(mx.expand_dims(a, -1) * mx.expand_dims(b, -3), axis=-2)


def _addmm(self, a, b, beta, alpha):
    """``beta * self + alpha * (a @ b)``. For floating types MLX's fused addmm scales and adds
    in the product's accumulator and rounds once, as torch's CPU gemm does (a separate
    multiply and add would round a half-precision product twice). With beta == 0 torch
    ignores ``self``, so NaN and inf in it do not propagate."""
    if not _is_inexact(a):
        return _add_scaled(self, _matmul(a, b), beta, alpha)
    if beta == 0:
        self = mx.zeros((), a.dtype)
    if not tracing():
        precision.ensure()
    return precision.addmm(self, a, b, alpha, beta)


def _add_scaled(self, product, beta, alpha):
    """``beta * self + alpha * product``. With beta == 0 torch ignores ``self`` entirely, so
    NaN and inf in it do not propagate. For integer and bool products the CPU kernels convert
    the scalars to the tensor's type first (C's truncation: alpha=0.6 is 0, 2.6 is 2), so the
    result stays exact integer arithmetic."""
    if not _is_inexact(product):
        convert = bool if product.dtype == mx.bool_ else int
        beta, alpha = convert(beta), convert(alpha)
    if alpha != 1:
        product = product * alpha
    if beta == 0:
        return product
    return product + (self if beta == 1 else self * beta)


@lowering("mm")
def mm(self, mat2):
    return _matmul(self, mat2)


def _bmm(a, b):
    """Batched products. torch's CPU bmm/baddbmm compute a product with fewer than 400
    multiply-adds per batch entry as a plain sequential sum over k (in float for half types);
    doing the same reproduces its rounding exactly, where a BLAS kernel's blocked sums differ
    in the last bits. Larger products go to BLAS on both sides."""
    if not _is_small_bmm(a, b):
        return _matmul(a, b)
    n, k = a.shape[-2:]
    p = b.shape[-1]
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    total = mx.zeros(mx.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (n, p), mx.float32)
    for i in range(k):
        total = total + a[..., :, i:i + 1] * b[..., i:i + 1, :]
    return total


def _is_small_bmm(a, b):
    real = _is_inexact(a) and not mx.issubdtype(a.dtype, mx.complexfloating)
    return real and a.shape[-2] * a.shape[-1] * b.shape[-1] < 400


@lowering("bmm")
def bmm(self, mat2):
    return _bmm(self, mat2)


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
    return _addmm(self, mat1, mat2, beta, alpha)


@lowering("_addmm_activation")
def addmm_activation(self, mat1, mat2, beta=1, alpha=1, use_gelu=False):
    """addmm followed by relu, or by gelu's tanh approximation (as torch's CPU kernel does)."""
    out = addmm(self, mat1, mat2, beta, alpha)
    return _gelu(out, "tanh") if use_gelu else mx.maximum(out, 0)


@lowering("addmv")
def addmv(self, mat, vec, beta=1, alpha=1):
    return _addmm(self[..., None], mat, vec[:, None], beta, alpha)[:, 0]


@lowering("baddbmm")
def baddbmm(self, batch1, batch2, beta=1, alpha=1):
    if _is_small_bmm(batch1, batch2):  # the CPU's sequential kernel, scaled in float
        return _add_scaled(self.astype(mx.float32), _bmm(batch1, batch2), beta, alpha)
    return _addmm(self, batch1, batch2, beta, alpha)


@lowering("addbmm")
def addbmm(self, batch1, batch2, beta=1, alpha=1):
    """The batch of products summed as torch's CPU kernel does: one fused addmm per batch entry
    into the running result (beta applied once, then accumulated with beta = 1), each rounded
    to the result dtype. Integers: one exact (n, b*m) @ (b*m, p) product."""
    b, n, m = batch1.shape
    if not _is_inexact(batch1) or b == 0:
        lhs = mx.reshape(mx.transpose(batch1, (1, 0, 2)), (n, b * m))
        rhs = mx.reshape(batch2, (b * m, batch2.shape[2]))
        return _addmm(self, lhs, rhs, beta, alpha)
    out = _addmm(mx.broadcast_to(self, (n, batch2.shape[2])), batch1[0], batch2[0], beta, alpha)
    for i in range(1, b):
        out = precision.addmm(out, batch1[i], batch2[i], alpha, 1)
    return out


@lowering("addr")
def addr(self, vec1, vec2, beta=1, alpha=1):
    """beta * self + (alpha * vec1) * vec2 in the tensors' dtype, one rounding per operation
    in that order, as torch's CPU kernel (half results bit-exact); beta = 0 ignores self."""
    if not _is_inexact(vec1):
        return _add_scaled(self, mx.multiply(vec1[:, None], vec2[None, :]), beta, alpha)
    dtype = vec1.dtype
    scaled = vec1 if alpha == 1 else mx.array(alpha, dtype) * vec1
    outer = scaled[:, None] * vec2[None, :]
    if beta == 0:
        return outer
    return (self if beta == 1 else mx.array(beta, dtype) * self.astype(dtype)) + outer


@lowering("trace")
def trace(self):
    return mx.sum(mx.diagonal(self))


@lowering("linalg_cross")
def linalg_cross(self, other, dim=-1):
    shape = mx.broadcast_shapes(self.shape, other.shape)
    return mx.linalg.cross(mx.broadcast_to(self, shape), mx.broadcast_to(other, shape), axis=dim,
                           stream=mx.cpu)


# ----------------------------------------------------------------------------------------------
# Matrix decompositions. MLX's linalg routines run on the CPU stream only (LAPACK: the same
# factorizations as torch's CPU kernels). MLX raises (or crashes, for empty matrices) where
# LAPACK reports a singular or indefinite matrix; torch's *_ex ops instead return an info code
# and whatever LAPACK produced, so singular batch entries are replaced before MLX sees them and
# their results are NaN. Pivots are LAPACK's: 1-based int32 row swaps.

_CPU = mx.cpu


def _eye_like(a):
    return mx.broadcast_to(mx.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _batch_broadcast(a, b):
    """Broadcast the batch dims of a matrix a and a matrix b."""
    batch = mx.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return mx.broadcast_to(a, batch + a.shape[-2:]), mx.broadcast_to(b, batch + b.shape[-2:])


def _first_failure(bad):
    """LAPACK's info: the 1-based index of the first failing pivot along the last axis, 0 if
    none fails."""
    if bad.shape[-1] == 0:
        return mx.zeros(bad.shape[:-1], mx.int32)
    first = mx.argmax(bad, axis=-1).astype(mx.int32) + 1
    return mx.where(mx.any(bad, axis=-1), first, 0)


def _lu_factor(a):
    """(LU, 0-based pivots, info) of square or rectangular matrices (getrf)."""
    if a.size == 0:
        k = min(a.shape[-2:])
        return a, mx.zeros(a.shape[:-2] + (k,), mx.int32), mx.zeros(a.shape[:-2], mx.int32)
    lu, piv = mx.linalg.lu_factor(a, stream=_CPU)
    info = _first_failure(mx.diagonal(lu, axis1=-2, axis2=-1) == 0)
    return lu, piv.astype(mx.int32), info


def _permutation(piv, m):
    """Row order of P^T A from LAPACK's sequential swaps (row i <-> row piv[i])."""
    perm = mx.broadcast_to(mx.arange(m), piv.shape[:-1] + (m,))
    rows = mx.arange(m)
    for i in range(piv.shape[-1]):
        j = piv[..., i:i + 1]
        at_i = mx.take_along_axis(perm, mx.broadcast_to(mx.array([i]), j.shape), -1)
        at_j = mx.take_along_axis(perm, j, -1)
        perm = mx.where(rows == i, at_j, mx.where(rows == j, at_i, perm))
    return perm


def _unit_lower(lu):
    k = min(lu.shape[-2:])
    lower = mx.tril(lu[..., :, :k], -1)
    return lower + mx.eye(lu.shape[-2], k, dtype=lu.dtype)


def _solve_triangular(a, b, upper, unit=False):
    """a x = b for triangular a (only its `upper` or lower triangle is read). A zero on the
    diagonal gives NaN (LAPACK would return inf/NaN; MLX raises)."""
    if a.size == 0 or b.size == 0:
        return mx.zeros(mx.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + b.shape[-2:], b.dtype)
    a, b = _batch_broadcast(a, b)
    if unit:
        a = mx.where(mx.eye(a.shape[-1], dtype=mx.bool_), 1, a)
    singular = mx.any(mx.diagonal(a, axis1=-2, axis2=-1) == 0, axis=-1)[..., None, None]
    x = mx.linalg.solve_triangular(mx.where(singular, _eye_like(a), a), b, upper=upper,
                                   stream=_CPU)
    return mx.where(singular, mx.nan, x)


def _lu_solve(lu, piv, b, adjoint=False):
    """A x = b (or A^H x = b) from A's LU factors, P^T A = L U: getrs."""
    perm = _permutation(piv, lu.shape[-1])
    lower, upper = _unit_lower(lu), mx.triu(lu)
    if adjoint:  # A^H = U^H L^H P^T, so x = P L^-H U^-H b
        y = _solve_triangular(mx.swapaxes(upper, -1, -2), b, upper=False)
        z = _solve_triangular(mx.swapaxes(lower, -1, -2), y, upper=True, unit=True)
        return _take_rows(z, mx.argsort(perm, axis=-1))
    y = _solve_triangular(lower, _take_rows(b, perm), upper=False, unit=True)
    return _solve_triangular(upper, y, upper=True)


def _take_rows(b, perm):
    """b's rows in the order perm (batch dims broadcast)."""
    batch = mx.broadcast_shapes(b.shape[:-2], perm.shape[:-1])
    b = mx.broadcast_to(b, batch + b.shape[-2:])
    index = mx.broadcast_to(perm[..., None], batch + (perm.shape[-1], b.shape[-1]))
    return mx.take_along_axis(b, index, -2)


@lowering("linalg_lu_factor_ex")
def linalg_lu_factor_ex(A, pivot=True, check_errors=False):
    if not pivot:
        raise RuntimeError("linalg.lu_factor: LU without pivoting is not implemented on the CPU")
    lu, piv, info = _lu_factor(A)
    _check_info(info, "torch.linalg.lu_factor_ex", check_errors)
    return lu, piv + 1, info


def _check_info(info, api, check_errors):
    if check_errors and not tracing() and info.size and mx.any(info != 0).item():
        raise torch.linalg.LinAlgError(f"{api}: The factorization could not be completed "
                                       "because the input is not invertible.")


@lowering("lu_unpack")
def lu_unpack(LU_data, LU_pivots, unpack_data=True, unpack_pivots=True):
    """(P, L, U) with A = P L U."""
    m, n = LU_data.shape[-2:]
    k = min(m, n)
    P = L = U = None
    if unpack_data:
        L = _unit_lower(LU_data)
        U = mx.triu(LU_data[..., :k, :])
    if unpack_pivots:
        perm = _permutation(LU_pivots.astype(mx.int32) - 1, m)
        # P^T A = rows of A in the order perm, so P[perm[i], i] = 1
        P = (perm[..., None, :] == mx.arange(m)[:, None]).astype(LU_data.dtype)
    empty = mx.zeros((0,), LU_data.dtype)
    return (P if P is not None else empty, L if L is not None else empty,
            U if U is not None else empty)


@lowering("linalg_lu")
def linalg_lu(A, pivot=True):
    if not pivot:
        raise RuntimeError("linalg.lu: LU without pivoting is not implemented on the CPU")
    lu, piv, _ = _lu_factor(A)
    return lu_unpack(lu, piv + 1)


@lowering("linalg_lu_solve")
def linalg_lu_solve(LU, pivots, B, left=True, adjoint=False):
    piv = pivots.astype(mx.int32) - 1
    if left:
        return _lu_solve(LU, piv, B, adjoint)
    # X A = B  <=>  A^H X^H = B^H
    xh = _lu_solve(LU, piv, mx.swapaxes(B, -1, -2), not adjoint)
    return mx.swapaxes(xh, -1, -2)


def _solve_rhs_is_vector(A, B):
    return B.ndim == 1 or (B.ndim == A.ndim - 1 and B.shape == A.shape[:-1])


@lowering("_linalg_solve_ex")
def linalg_solve_ex(A, B, left=True, check_errors=False):
    """(result, LU, pivots, info): getrf of A, then getrs (of A^T for X A = B)."""
    lu, piv, info = _lu_factor(A)
    _check_info(info, "torch.linalg.solve_ex", check_errors)
    if _solve_rhs_is_vector(A, B):
        x = _lu_solve(lu, piv, B[..., None])[..., 0]
    elif left:
        x = _lu_solve(lu, piv, B)
    else:  # X A = B  <=>  A^T X^T = B^T
        x = mx.swapaxes(_lu_solve(lu, piv, mx.swapaxes(B, -1, -2), adjoint=True), -1, -2)
    return x, lu, piv + 1, info


@lowering("linalg_inv_ex")
def linalg_inv_ex(A, check_errors=False):
    lu, piv, info = _lu_factor(A)
    _check_info(info, "torch.linalg.inv_ex", check_errors)
    if A.size == 0:
        return A, info
    return _lu_solve(lu, piv, _eye_like(A)), info


# det and slogdet. torch's CPU kernels factor A^T when A is row-major contiguous and real (LAPACK
# then reads it without a copy; det(A^T) = det(A)) and A otherwise, and their backward solves
# with the LU accordingly. Which one is decided by the tensor's strides, which a lowering does
# not see, so these are torch-level kernels over linalg_lu_factor_ex.


def _lu_of_det_input(A):
    transpose = A.is_contiguous() and not A.is_complex()
    return torch.ops.aten.linalg_lu_factor_ex(A.mT if transpose else A)[:2]


def _permutation_sign(pivots):
    rows = torch.arange(1, pivots.shape[-1] + 1, device=pivots.device, dtype=pivots.dtype)
    swaps = (pivots != rows).sum(-1)
    return 1 - 2 * (swaps % 2).to(torch.float32)


@torch_kernel("_linalg_det")
def linalg_det(A):
    LU, pivots = _lu_of_det_input(A)
    det = _permutation_sign(pivots) * LU.diagonal(dim1=-2, dim2=-1).prod(-1)
    return det.to(A.dtype), LU, pivots


@torch_kernel("_linalg_slogdet")
def linalg_slogdet(A):
    LU, pivots = _lu_of_det_input(A)
    diag = LU.diagonal(dim1=-2, dim2=-1)
    sign = (_permutation_sign(pivots) * diag.sign().prod(-1)).to(A.dtype)
    return sign, diag.abs().log().sum(-1), LU, pivots


# Cholesky: LAPACK's potrf stops at the first non-positive pivot, leaving it unrooted on the
# diagonal, so info is the first diagonal entry that is not > 0.


def _cholesky(A, upper):
    if A.size == 0:
        return A, mx.zeros(A.shape[:-2], mx.int32)
    factor = mx.linalg.cholesky(A, upper=upper, stream=_CPU)
    info = _first_failure(~(mx.diagonal(factor, axis1=-2, axis2=-1) > 0))
    return factor, info


def _check_positive_definite(info, api):
    if not tracing() and info.size and mx.any(info != 0).item():
        order = mx.max(info).item()
        raise torch.linalg.LinAlgError(
            f"{api}: The factorization could not be completed because the input is not "
            f"positive-definite (the leading minor of order {order} is not positive-definite).")


@lowering("linalg_cholesky_ex")
def linalg_cholesky_ex(self, upper=False, check_errors=False):
    factor, info = _cholesky(self, upper)
    if check_errors:
        _check_positive_definite(info, "linalg.cholesky_ex")
    return factor, info


@lowering("cholesky")
def cholesky(self, upper=False):
    factor, info = _cholesky(self, upper)
    _check_positive_definite(info, "cholesky")
    return factor


@lowering("cholesky_inverse")
def cholesky_inverse(self, upper=False):
    """(L L^H)^-1 (or (U^H U)^-1) from the factor."""
    if self.size == 0:
        return self
    return mx.linalg.cholesky_inv(self, upper=upper, stream=_CPU)


@lowering("_cholesky_solve_helper")
def cholesky_solve_helper(self, A, upper):
    """Solve L L^H X = B (or U^H U X = B) with two triangular solves."""
    lower = mx.swapaxes(A, -1, -2) if upper else A
    y = _solve_triangular(lower, self, upper=False)
    return _solve_triangular(mx.swapaxes(lower, -1, -2), y, upper=True)


@lowering("linalg_solve_triangular")
def linalg_solve_triangular(self, B, upper, left=True, unitriangular=False):
    if left:
        return _solve_triangular(self, B, upper, unitriangular)
    # X A = B  <=>  A^T X^T = B^T
    xt = _solve_triangular(mx.swapaxes(self, -1, -2), mx.swapaxes(B, -1, -2), not upper,
                           unitriangular)
    return mx.swapaxes(xt, -1, -2)


@lowering("triangular_solve")
def triangular_solve(self, A, upper=True, transpose=False, unitriangular=False):
    """(solution of A X = B, or A^T X = B, and a copy of A broadcast to the batch)."""
    coefficient = mx.swapaxes(A, -1, -2) if transpose else A
    solution = _solve_triangular(coefficient, self, upper != transpose, unitriangular)
    batch = solution.shape[:-2]
    return solution, mx.array(mx.broadcast_to(A, batch + A.shape[-2:]))


# ----------------------------------------------------------------------------------------------
# SVD and eigendecompositions (LAPACK through MLX; singular vectors and eigenvectors are unique
# only up to sign or phase, which torch leaves unspecified too).


def _empty():
    return mx.zeros((0,), mx.float32)


def _eye(rows, cols, batch):
    return mx.broadcast_to(mx.eye(rows, cols), batch + (rows, cols))


@lowering("_linalg_svd")
def linalg_svd(A, full_matrices=False, compute_uv=True, driver=None):
    """(U, S, Vh); U and Vh are empty when compute_uv is False."""
    batch, (m, n) = A.shape[:-2], A.shape[-2:]
    k = min(m, n)
    if A.size == 0:  # MLX's LAPACK calls reject empty matrices; torch gives identities
        s = mx.zeros(batch + (k,), A.dtype)
        if not compute_uv:
            return _empty(), s, _empty()
        return (_eye(m, m if full_matrices else k, batch), s,
                _eye(n if full_matrices else k, n, batch))
    if not compute_uv:
        return _empty(), mx.linalg.svd(A, compute_uv=False, stream=_CPU), _empty()
    u, s, vh = mx.linalg.svd(A, stream=_CPU)  # always the full U and Vh
    if not full_matrices:
        u, vh = u[..., :, :k], vh[..., :k, :]
    return u, s, vh


@lowering("_linalg_eigh")
def linalg_eigh(A, UPLO="L", compute_v=True):
    """(eigenvalues ascending, eigenvectors); eigenvectors empty when compute_v is False.
    Only the UPLO triangle of A is read."""
    if A.size == 0:
        return mx.zeros(A.shape[:-1], A.dtype), (A if compute_v else _empty())
    if not compute_v:
        return mx.linalg.eigvalsh(A, UPLO=UPLO, stream=_CPU), _empty()
    return mx.linalg.eigh(A, UPLO=UPLO, stream=_CPU)


# MLX hands LAPACK's geev its row-major buffer, which LAPACK reads as the transpose: mx eig(X)
# runs geev on X^T and returns eigenvalues in X^T's order. torch runs geev on A, so the
# eigenvalues are computed as MLX's eig(A^T) to come out in torch's order. The right
# eigenvectors Y of A^T are the left eigenvectors of A (Y^T A = W Y^T), so A's right
# eigenvectors are the columns of Y^-T, normalised as geev does: unit norm, largest component
# real.


@lowering("linalg_eig")
def linalg_eig(self):
    if self.size == 0:
        return (mx.zeros(self.shape[:-1], mx.complex64), mx.zeros(self.shape, mx.complex64))
    w, y = mx.linalg.eig(mx.swapaxes(self, -1, -2), stream=_CPU)
    v = _complex_inverse(mx.swapaxes(y, -1, -2))
    v = v / mx.sqrt(mx.sum(mx.abs(v) ** 2, axis=-2, keepdims=True))
    largest = mx.take_along_axis(v, mx.argmax(mx.abs(v), axis=-2)[..., None, :], axis=-2)
    v = v * mx.conj(largest / mx.abs(largest))
    # a real eigenvalue has a real eigenvector: drop the inversion's rounding residue
    real = (mx.imag(w) == 0)[..., None, :]
    return w, mx.where(real, mx.real(v).astype(mx.complex64), v)


def _complex_inverse(m):
    """The inverse of a complex matrix through its real embedding [[X, -Y], [Y, X]] (MLX's
    LAPACK routines take real matrices only)."""
    n = m.shape[-1]
    x, y = mx.real(m), mx.imag(m)
    embedded = mx.concatenate([mx.concatenate([x, -y], axis=-1),
                               mx.concatenate([y, x], axis=-1)], axis=-2)
    inverse = mx.linalg.inv(embedded, stream=_CPU)
    return inverse[..., :n, :n] + 1j * inverse[..., n:, :n]


@lowering("_linalg_eigvals")
def linalg_eigvals(self):
    if self.size == 0:
        return mx.zeros(self.shape[:-1], mx.complex64)
    return mx.linalg.eigvals(mx.swapaxes(self, -1, -2), stream=_CPU)


# ----------------------------------------------------------------------------------------------
# QR. Reduced QR is MLX's (LAPACK geqrf + orgqr). The ops that expose Householder reflectors
# (geqrf, householder_product, ormqr) and the complete Q of a tall matrix, which MLX does not
# provide, build them here with LAPACK's conventions (dlarfg: beta = -sign(alpha) ||x||,
# tau = (beta - alpha) / beta, v[0] = 1), so they agree with torch's CPU results.


def _reflector(x):
    """(v, tau, beta) with (I - tau v v^T) x = beta e_1, for the vectors x (..., l)."""
    alpha, rest = x[..., 0], x[..., 1:]
    rest_norm = mx.sqrt(mx.sum(rest * rest, axis=-1))
    norm = mx.sqrt(alpha * alpha + rest_norm * rest_norm)
    beta = mx.where(alpha >= 0, -norm, norm)
    trivial = rest_norm == 0  # already a multiple of e_1: H = I
    tau = mx.where(trivial, 0, (beta - alpha) / mx.where(trivial, 1, beta))
    scale = mx.where(trivial, 0, 1 / mx.where(trivial, 1, alpha - beta))
    v = mx.concatenate([mx.ones_like(alpha)[..., None], rest * scale[..., None]], axis=-1)
    return v, tau, mx.where(trivial, alpha, beta)


def _reflect_left(c, v, tau):
    """(I - tau v v^T) c for matrices c (..., l, p) and vectors v (..., l)."""
    w = mx.sum(v[..., :, None] * c, axis=-2, keepdims=True)
    return c - tau[..., None, None] * v[..., :, None] * w


def _reflect_right(c, v, tau):
    """c (I - tau v v^T) for matrices c (..., p, l)."""
    w = mx.sum(c * v[..., None, :], axis=-1, keepdims=True)
    return c - tau[..., None, None] * w * v[..., None, :]


def _geqrf(a):
    """(R with the reflectors below its diagonal, tau), as LAPACK's geqrf."""
    m, n = a.shape[-2:]
    taus = []
    for j in range(min(m, n)):
        v, tau, beta = _reflector(a[..., j:, j])
        if j + 1 < n:
            a[..., j:, j + 1:] = _reflect_left(a[..., j:, j + 1:], v, tau)
        a[..., j:, j] = mx.concatenate([beta[..., None], v[..., 1:]], axis=-1)
        taus.append(tau)
    tau = mx.stack(taus, axis=-1) if taus else mx.zeros(a.shape[:-2] + (0,), a.dtype)
    return a, tau


def _reflector_vector(a, i):
    """The i-th reflector stored below the diagonal of a, with its implicit leading 1."""
    below = a[..., i + 1:, i]
    return mx.concatenate([mx.ones(a.shape[:-2] + (1,), a.dtype), below], axis=-1)


def _apply_q(a, tau, c, left=True, transpose=False):
    """Q c, Q^T c, c Q or c Q^T for Q = H_1 ... H_k given by geqrf's (a, tau)."""
    k = tau.shape[-1]
    order = range(k) if left == transpose else reversed(range(k))
    for i in order:
        v, t = _reflector_vector(a, i), tau[..., i]
        if left:
            c[..., i:, :] = _reflect_left(c[..., i:, :], v, t)
        else:
            c[..., :, i:] = _reflect_right(c[..., :, i:], v, t)
    return c


@lowering("geqrf")
def geqrf(self):
    return _geqrf(mx.array(self))


@lowering("linalg_householder_product")
def linalg_householder_product(input, tau):
    """The first n columns of H_1 ... H_k (LAPACK's orgqr)."""
    m, n = input.shape[-2:]
    batch = mx.broadcast_shapes(input.shape[:-2], tau.shape[:-1])
    eye = mx.array(_eye(m, n, batch))
    return _apply_q(mx.broadcast_to(input, batch + (m, n)), tau, eye)


@lowering("ormqr")
def ormqr(self, input2, input3, left=True, transpose=False):
    return _apply_q(self, input2, mx.array(input3), left, transpose)


@lowering("linalg_qr")
def linalg_qr(A, mode="reduced"):
    """(Q, R); Q is empty for mode "r"."""
    batch, (m, n) = A.shape[:-2], A.shape[-2:]
    if mode == "complete" and m > n:  # Q is m x m: orgqr over all m columns
        a, tau = _geqrf(mx.array(A))
        return _apply_q(a, tau, mx.array(_eye(m, m, batch))), mx.triu(a)
    if A.size == 0:
        k = m if mode == "complete" else min(m, n)
        q = _empty() if mode == "r" else _eye(m, k, batch)
        return q, mx.zeros(batch + (k, n), A.dtype)
    q, r = mx.linalg.qr(A, stream=_CPU)
    return (_empty() if mode == "r" else q), r


@lowering("linalg_pinv.atol_rtol_tensor")
def linalg_pinv(self, atol=None, rtol=None, hermitian=False):
    """Moore-Penrose inverse as torch computes it: singular values (or |eigenvalues| when
    hermitian) at most max(atol, rtol * largest) are dropped. Without tolerances rtol is
    eps * max(m, n); with only atol > 0 it is 0. (torch's own composite builds these defaults
    as float64 tensors on the device, which "mlx" has no storage for.)"""
    m, n = self.shape[-2:]
    if rtol is None:
        default = mx.finfo(mx.float32).eps * max(m, n)
        rtol = default if atol is None else mx.where(atol > 0, 0.0, default)
    atol = 0.0 if atol is None else atol
    if self.size == 0:
        return mx.zeros(self.shape[:-2] + (n, m), self.dtype)
    if hermitian:
        s, u = mx.linalg.eigh(self, stream=_CPU)
        largest = mx.max(mx.abs(s), axis=-1, keepdims=True)
        keep = mx.abs(s) > mx.maximum(atol, rtol * largest)
        return mx.matmul(u * mx.where(keep, 1 / s, 0)[..., None, :], mx.swapaxes(u, -1, -2))
    u, s, vh = linalg_svd(self)
    keep = s > mx.maximum(atol, rtol * s[..., :1])
    return mx.matmul(mx.swapaxes(vh, -1, -2) * mx.where(keep, 1 / s, 0)[..., None, :],
                     mx.swapaxes(u, -1, -2))


# ----------------------------------------------------------------------------------------------
# Distances: cdist (x1 rows against x2 rows) and pdist (pairs i < j of one set of rows).


def _p_norm(diff, p, axis=-1):
    """The p-norm of differences, with torch's p = 0 (count of nonzeros) and p = inf."""
    a = mx.abs(diff)
    if p == 0:
        return mx.sum(a != 0, axis=axis).astype(diff.dtype)
    if p == math.inf:
        return mx.max(a, axis=axis)
    if p == 1:
        return mx.sum(a, axis=axis)
    if p == 2:
        return mx.sqrt(mx.sum(a * a, axis=axis))
    return mx.power(mx.sum(mx.power(a, p), axis=axis), 1.0 / p)


def _p_norm_grad(diff, dist, grad, p):
    """d dist / d diff times grad (torch's Distance backward, 0 where dist is 0)."""
    dist, grad = dist[..., None], grad[..., None]
    if p == 0:
        return mx.zeros_like(diff)
    if p == 1:
        return grad * mx.sign(diff)
    if p == math.inf:
        return grad * mx.sign(diff) * (mx.abs(diff) == dist)
    safe = mx.where(dist == 0, 1, dist)
    if p == 2:
        out = grad * diff / safe
    elif p < 2:
        out = mx.sign(diff) * mx.power(mx.abs(diff), p - 1) * grad / mx.power(safe, p - 1)
        if p < 1:
            out = mx.where(diff == 0, 0, out)
    else:
        out = diff * mx.power(mx.abs(diff), p - 2) * grad / mx.power(safe, p - 1)
    return mx.where(dist == 0, 0, out)


def _pairwise_diff(x1, x2):
    """(..., P, R, M) differences of every x1 row and x2 row, batch dims broadcast."""
    return mx.expand_dims(x1, -2) - mx.expand_dims(x2, -3)


@lowering("_cdist_forward")
def cdist_forward(x1, x2, p, compute_mode):
    """The direct distances (torch's cdist routes the matrix-product form of p = 2 through
    _euclidean_dist instead)."""
    return _p_norm(_pairwise_diff(x1, x2), p)


@lowering("_cdist_backward")
def cdist_backward(grad, x1, x2, p, cdist):
    """The gradient for x1 expanded to the broadcast batch (autograd reduces it), or zeros of
    x1's shape when there is nothing to differentiate, as torch's kernel returns."""
    if grad.size == 0 or x1.size == 0:
        return mx.zeros(x1.shape, x1.dtype)
    diff = _pairwise_diff(x1, x2)
    return mx.sum(_p_norm_grad(diff, cdist, grad, p), axis=-2)


def _pairs(n):
    """Row indices (i, j), i < j, in torch's pdist order."""
    i = [a for a in range(n) for _ in range(a + 1, n)]
    j = [b for a in range(n) for b in range(a + 1, n)]
    return mx.array(i, mx.int32), mx.array(j, mx.int32)


@lowering("_pdist_forward")
def pdist_forward(self, p=2.0):
    i, j = _pairs(self.shape[0])
    return _p_norm(mx.take(self, i, axis=0) - mx.take(self, j, axis=0), p)


@lowering("_pdist_backward")
def pdist_backward(grad, self, p, pdist):
    i, j = _pairs(self.shape[0])
    pair_grad = _p_norm_grad(mx.take(self, i, axis=0) - mx.take(self, j, axis=0), pdist, grad, p)
    out = mx.zeros(self.shape, pair_grad.dtype)
    return out.at[i].add(pair_grad).at[j].add(-pair_grad)


@lowering("linalg_matrix_exp")
def linalg_matrix_exp(self):
    """Scaling and squaring: exp(A) = exp(A / 2^s)^(2^s) with ||A / 2^s||_1 <= 1/2 and a
    degree-18 Taylor polynomial, evaluated in float64 on the CPU stream and rounded once, so
    the result is as accurate as float32 can hold (torch's float32 kernel is within a few ulp
    of it)."""
    if self.size == 0:
        return self
    a = self.astype(mx.float64, stream=_CPU)
    norm = mx.max(mx.sum(mx.abs(a, stream=_CPU), axis=-2, stream=_CPU), axis=-1, stream=_CPU)
    squarings = mx.maximum(mx.ceil(mx.log2(norm / 0.5, stream=_CPU), stream=_CPU), 0,
                           stream=_CPU)
    if tracing():  # a compiled graph cannot read the norms: square as often as float32 allows
        steps = 130
    else:
        steps = int(mx.max(squarings).item()) if mx.all(mx.isfinite(squarings)).item() else 0
    scaled = a / mx.power(2.0, squarings, stream=_CPU)[..., None, None]
    eye = mx.broadcast_to(mx.eye(a.shape[-1], dtype=mx.float64), a.shape)
    result, term = eye, eye
    for k in range(1, 19):
        term = mx.matmul(term, scaled, stream=_CPU) / k
        result = result + term
    for i in range(steps):  # each matrix is squared as many times as it was halved
        squared = mx.matmul(result, result, stream=_CPU)
        result = mx.where((i < squarings)[..., None, None], squared, result)
    return result.astype(self.dtype, stream=_CPU)


@lowering("linalg_lstsq", meta=False)
def linalg_lstsq(self, b, rcond=None, driver=None):
    """(solution, residuals, rank, singular_values) as torch's CPU drivers report them: the
    minimum-norm least-squares solution, singular values below rcond * largest treated as 0;
    rank for gelsy/gelsd/gelss (default gelsy), singular values for gelsd/gelss, residuals
    |A x - b|^2 per column when m > n (gels always, gelsd/gelss when every matrix has full
    rank, gelsy never)."""
    if self.ndim < 2:
        raise RuntimeError("torch.linalg.lstsq: input must have at least 2 dimensions.")
    driver = driver or "gelsy"
    m, n = self.shape[-2:]
    vector = b.ndim == self.ndim - 1
    rhs = b[..., None] if vector else b
    a, rhs = _batch_broadcast(self, rhs)
    batch = a.shape[:-2]
    rcond = mx.finfo(mx.float32).eps * max(m, n) if rcond is None or rcond < 0 else rcond
    if a.size == 0 or rhs.size == 0:
        x = mx.zeros(batch + (n, rhs.shape[-1]), a.dtype)
        s = mx.zeros(batch + (min(m, n),), a.dtype)
        rank = mx.zeros(batch, mx.int64)
    else:
        u, s, vh = linalg_svd(a)
        keep = s > rcond * s[..., :1]
        inverse_s = mx.where(keep, 1 / mx.where(keep, s, 1), 0)
        coefficients = mx.matmul(mx.swapaxes(u, -1, -2), rhs) * inverse_s[..., :, None]
        x = mx.matmul(mx.swapaxes(vh, -1, -2), coefficients)
        rank = mx.sum(keep, axis=-1).astype(mx.int64)
    empty = mx.zeros((0,), a.dtype)
    residuals = empty
    full_rank = driver == "gels" or (driver in ("gelsd", "gelss") and a.size > 0
                                     and mx.all(rank == n).item())
    if m > n and driver != "gelsy" and full_rank:
        r = mx.matmul(a, x) - rhs
        residuals = mx.sum(r * r, axis=-2)
        residuals = residuals[..., 0] if vector else residuals
    return (x[..., 0] if vector else x, residuals,
            rank if driver != "gels" else mx.zeros((0,), mx.int64),
            s if driver in ("gelsd", "gelss") else empty)


# ----------------------------------------------------------------------------------------------
# LDL^T with Bunch-Kaufman pivoting (LAPACK's sytrf for the lower triangle; MLX has no such
# routine). The choice between 1x1 and 2x2 pivots depends on the values, so each matrix is
# factored by its own sequence of MLX steps, read back as it goes: eager only.

_BUNCH_KAUFMAN_ALPHA = (1 + math.sqrt(17)) / 8


def _first_argmax(v):
    """LAPACK's idamax: the first index of the largest |v| (0-based)."""
    return int(mx.argmax(mx.abs(v)).item())


def _swap_rows_cols(a, k, kk, kp, kstep):
    """dsytf2's interchange of rows and columns kk and kp of the trailing matrix (lower)."""
    n = a.shape[0]
    if kp < n - 1:
        a[kp + 1:, kk], a[kp + 1:, kp] = a[kp + 1:, kp], a[kp + 1:, kk]
    a[kk + 1:kp, kk], a[kp, kk + 1:kp] = a[kp, kk + 1:kp], a[kk + 1:kp, kk]
    a[kk, kk], a[kp, kp] = a[kp, kp], a[kk, kk]
    if kstep == 2:
        a[k + 1, k], a[kp, k] = a[kp, k], a[k + 1, k]
    return a


def _sytf2_lower(a):
    """(LD, 1-based pivots, info) for one symmetric matrix, as LAPACK's dsytf2 (UPLO = L)."""
    n = a.shape[0]
    a = mx.array(a)
    pivots, info, k = [0] * n, 0, 0
    while k < n:
        kstep = 1
        absakk = abs(a[k, k].item())
        imax = k + 1 + _first_argmax(a[k + 1:, k]) if k < n - 1 else k
        colmax = abs(a[imax, k].item()) if k < n - 1 else 0.0
        if max(absakk, colmax) == 0 or math.isnan(absakk):
            info = info or k + 1
            kp = k
        else:
            if absakk >= _BUNCH_KAUFMAN_ALPHA * colmax:
                kp = k
            else:
                rowmax = abs(a[imax, k + _first_argmax(a[imax, k:imax])].item())
                if imax < n - 1:
                    jmax = imax + 1 + _first_argmax(a[imax + 1:, imax])
                    rowmax = max(rowmax, abs(a[jmax, imax].item()))
                if absakk >= _BUNCH_KAUFMAN_ALPHA * colmax * (colmax / rowmax):
                    kp = k
                elif abs(a[imax, imax].item()) >= _BUNCH_KAUFMAN_ALPHA * rowmax:
                    kp = imax
                else:
                    kp, kstep = imax, 2
            kk = k + kstep - 1
            if kp != kk:
                a = _swap_rows_cols(a, k, kk, kp, kstep)
            if kstep == 1 and k < n - 1:  # A22 -= x x^T / d; L column = x / d
                x = a[k + 1:, k]
                a[k + 1:, k + 1:] = a[k + 1:, k + 1:] - (1 / a[k, k]) * x[:, None] * x[None, :]
                a[k + 1:, k] = x * (1 / a[k, k])
            elif kstep == 2 and k < n - 2:  # the 2x2 block's inverse applied to two columns
                d21 = a[k + 1, k]
                d11, d22 = a[k + 1, k + 1] / d21, a[k, k] / d21
                d21 = (1 / (d11 * d22 - 1)) / d21
                xk, xk1 = a[k + 2:, k], a[k + 2:, k + 1]
                wk = d21 * (d11 * xk - xk1)
                wkp1 = d21 * (d22 * xk1 - xk)
                a[k + 2:, k + 2:] = a[k + 2:, k + 2:] - xk[:, None] * wk[None, :] \
                    - xk1[:, None] * wkp1[None, :]
                a[k + 2:, k], a[k + 2:, k + 1] = wk, wkp1
        if kstep == 1:
            pivots[k] = kp + 1
        else:
            pivots[k] = pivots[k + 1] = -(kp + 1)
        k += kstep
    return mx.tril(a), pivots, info


@lowering("linalg_ldl_factor_ex")
def linalg_ldl_factor_ex(self, hermitian=False, check_errors=False):
    """(LD, pivots, info): L below the diagonal (unit diagonal implied), D's 1x1 and 2x2 blocks
    on and next to it; a 2x2 block's two pivots are both -(row it was swapped with)."""
    n = self.shape[-1]
    batch = self.shape[:-2]
    flat = mx.reshape(self, (math.prod(batch), n, n))
    factors = [_sytf2_lower(flat[i]) for i in range(flat.shape[0])]
    ld = mx.stack([f[0] for f in factors]) if factors else flat
    pivots = mx.array([f[1] for f in factors], mx.int32).reshape(batch + (n,))
    info = mx.array([f[2] for f in factors], mx.int32).reshape(batch)
    if check_errors and info.size and mx.any(info != 0).item():
        raise torch.linalg.LinAlgError("torch.linalg.ldl_factor_ex: The factorization could not "
                                       "be completed because the input is singular.")
    return mx.reshape(ld, self.shape), pivots, info


def _sytrs_lower(ld, pivots, b):
    """Solve A X = B from one matrix's dsytf2 factors (LAPACK's dsytrs, UPLO = L)."""
    n = ld.shape[0]
    b = mx.array(b)
    k = 0
    while k < n:  # L D Y = P^T B
        if pivots[k] > 0:
            kp = pivots[k] - 1
            if kp != k:
                b[k], b[kp] = b[kp], b[k]
            if k < n - 1:
                b[k + 1:] = b[k + 1:] - ld[k + 1:, k][:, None] * b[k][None, :]
            b[k] = b[k] / ld[k, k]
            k += 1
        else:
            kp = -pivots[k] - 1
            if kp != k + 1:
                b[k + 1], b[kp] = b[kp], b[k + 1]
            if k < n - 2:
                b[k + 2:] = b[k + 2:] - ld[k + 2:, k][:, None] * b[k][None, :] \
                    - ld[k + 2:, k + 1][:, None] * b[k + 1][None, :]
            akm1k = ld[k + 1, k]
            akm1, ak = ld[k, k] / akm1k, ld[k + 1, k + 1] / akm1k
            denom = akm1 * ak - 1
            bkm1, bk = b[k] / akm1k, b[k + 1] / akm1k
            b[k], b[k + 1] = (ak * bkm1 - bk) / denom, (akm1 * bk - bkm1) / denom
            k += 2
    k = n - 1
    while k >= 0:  # L^T X = Y, undoing the interchanges
        if pivots[k] > 0:
            if k < n - 1:
                b[k] = b[k] - mx.sum(ld[k + 1:, k][:, None] * b[k + 1:], axis=0)
            kp = pivots[k] - 1
            if kp != k:
                b[k], b[kp] = b[kp], b[k]
            k -= 1
        else:
            if k < n - 1:
                b[k] = b[k] - mx.sum(ld[k + 1:, k][:, None] * b[k + 1:], axis=0)
                b[k - 1] = b[k - 1] - mx.sum(ld[k + 1:, k - 1][:, None] * b[k + 1:], axis=0)
            kp = -pivots[k] - 1
            if kp != k:
                b[k], b[kp] = b[kp], b[k]
            k -= 2
    return b


@lowering("linalg_ldl_solve")
def linalg_ldl_solve(LD, pivots, B, hermitian=False):
    n = LD.shape[-1]
    ld, b = _batch_broadcast(LD, B)
    piv = mx.broadcast_to(pivots, ld.shape[:-1])
    count = math.prod(ld.shape[:-2])
    flat_ld, flat_b = mx.reshape(ld, (count, n, n)), mx.reshape(b, (count,) + b.shape[-2:])
    flat_piv = mx.reshape(piv, (count, n)).tolist()
    solved = [_sytrs_lower(flat_ld[i], flat_piv[i], flat_b[i]) for i in range(flat_ld.shape[0])]
    return mx.reshape(mx.stack(solved), b.shape) if solved else b


# ----------------------------------------------------------------------------------------------
# Tolerance overloads of pinv and matrix_rank. torch's C++ composites build their tolerances as
# float64 tensors on the input's device, which "mlx" has no storage for (TypeError); these
# kernels build the same tolerances in float32 (get_atol_rtol's rules) and compute the same.
# pinv's are autograd-level kernels: they reach linalg_pinv.atol_rtol_tensor, whose derivative
# formula records the backward (a PrivateUse1-only kernel would make autograd warn).


def _tolerances(input, atol, rtol):
    """(atol, rtol) as float32 tensors on the input's device, following torch's get_atol_rtol:
    atol defaults to 0; rtol to eps * max(m, n), or to 0 when atol > 0 is given."""
    def as_tensor(v):
        if v is None or isinstance(v, torch.Tensor):
            return v
        return torch.full((), v, dtype=torch.float32, device=input.device)

    atol, rtol = as_tensor(atol), as_tensor(rtol)
    if rtol is None:
        default = torch.finfo(torch.float32).eps * max(input.shape[-2:])
        rtol = as_tensor(default) if atol is None else torch.where(atol > 0, 0.0, default)
    if atol is None:
        atol = as_tensor(0.0)
    return atol, rtol


@torch_kernel("linalg_pinv.atol_rtol_float", autograd=True)
def linalg_pinv_float(self, atol=None, rtol=None, hermitian=False):
    atol, rtol = _tolerances(self, atol, rtol)
    return torch.ops.aten.linalg_pinv.atol_rtol_tensor(self, atol=atol, rtol=rtol,
                                                       hermitian=hermitian)


@torch_kernel("linalg_pinv", autograd=True)
def linalg_pinv_rcond(self, rcond, hermitian=False):
    """NumPy's rcond is a relative tolerance (atol 0)."""
    return linalg_pinv_float(self, 0.0, rcond, hermitian)


@torch_kernel("pinverse", autograd=True)
def pinverse(self, rcond=1e-15):
    return linalg_pinv_float(self, 0.0, rcond, False)


@torch_kernel("linalg_matrix_rank.atol_rtol_tensor")
def linalg_matrix_rank(input, atol=None, rtol=None, hermitian=False):
    """The number of singular values (|eigenvalues| when hermitian) above
    max(atol, rtol * largest), per matrix, as torch's matrix_rank_impl."""
    if input.dim() < 2:
        raise RuntimeError("torch.linalg.matrix_rank: The input tensor input must have at least "
                           "2 dimensions.")
    atol, rtol = _tolerances(input, atol, rtol)
    if input.numel() == 0:
        return torch.zeros(input.shape[:-2], dtype=torch.int64, device=input.device)
    if hermitian:
        s = torch.linalg.eigvalsh(input).abs()
        largest = s.amax(dim=-1, keepdim=True)
    else:
        s = torch.linalg.svdvals(input)
        largest = s[..., :1]
    tol = torch.maximum(atol.unsqueeze(-1), rtol.unsqueeze(-1) * largest)
    return (s > tol).sum(-1)


@torch_kernel("linalg_matrix_rank.atol_rtol_float")
def linalg_matrix_rank_float(self, atol=None, rtol=None, hermitian=False):
    return linalg_matrix_rank(self, atol, rtol, hermitian)


@torch_kernel("linalg_matrix_rank", "linalg_matrix_rank.tol_tensor")
def linalg_matrix_rank_tol(input, tol, hermitian=False):
    """A single tolerance is absolute (rtol 0)."""
    return linalg_matrix_rank(input, tol, 0.0, hermitian)
