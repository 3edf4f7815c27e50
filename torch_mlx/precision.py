"""float32 matrix products on MLX's GPU follow torch's precision setting.

torch computes float32 products in full float32 unless told otherwise
(``torch.set_float32_matmul_precision("high")``, ``torch.backends.cuda.matmul.allow_tf32``).
MLX's GPU backends use TF32 tensor cores for float32 GEMMs and convolutions unless
``MLX_ENABLE_TF32=0`` (CUDA: cuBLASLt's fast-TF32 compute type and cuDNN's tensor-core engines;
Metal: the neural-accelerator path of chips that have one), and MLX reads that variable once
per process (on CUDA as its GPU backend sets up). So the C++ runtime sets it from torch's setting
at the device's first use (unless the user set it), and torch_mlx's first float32 product on the
GPU checks with a probe product which mode MLX actually took (MLX may have been used first).
From then on:

- torch asks for "highest" and MLX is in float32 mode: plain products (the default case);
- torch allows TF32 and MLX is in TF32 mode: plain products, at tensor-core speed;
- torch asks for "highest" but MLX is in TF32 mode: each product is computed from operands split
  into a TF32 part and a remainder, as three TF32 products (3xTF32), whose error is float32's;
- torch allows TF32 but MLX is in float32 mode: float32 products ("high" allows TF32, it does
  not require it), and one warning says to choose TF32 before the first float32 product.

``torch.backends.mlx.matmul.allow_tf32`` mirrors ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

import os
import types
import warnings

import mlx.core as mx
import torch

from . import _C

# torch's default until the device's first use, when the C++ runtime sets it from torch's
# precision at that moment (MLX's CUDA backend reads it as it sets up: csrc/allocator.cpp).
# A process started by one that imported torch_mlx (vLLM's engine core, a test's child) inherits
# the variable as torch_mlx set it: the marker tells it apart from a user's choice
_OURS = "TORCH_MLX_SET_TF32"
_USER_SET = "MLX_ENABLE_TF32" in os.environ and _OURS not in os.environ
if not _USER_SET:
    os.environ["MLX_ENABLE_TF32"] = "0"
    os.environ[_OURS] = "1"
    _C._set_tf32_follows_torch(True)

_mode: str | None = None  # "ieee" or "tf32": how MLX computes float32 GEMMs in this process
_warned = False


def _wants_tf32() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def _on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def mlx_mode() -> str | None:
    """How MLX's GPU computes float32 GEMMs in this process ("ieee", "tf32"), None until torch_mlx's
    first float32 product on the GPU has fixed it."""
    return _mode


def ensure() -> None:
    """Find MLX's float32 GEMM mode (see the module docstring) if the GPU is in use and it is not
    known yet. Evaluates one small product: call outside mx.compile's tracing."""
    global _mode
    if _mode is not None or not _on_gpu():
        return
    # MLX reads the variable at its first float32 GEMM (CUDA: as it builds its first cuBLASLt
    # float32 plan), normally the probe below: torch's setting now is the one that counts.
    if not _USER_SET:
        os.environ["MLX_ENABLE_TF32"] = "1" if _wants_tf32() else "0"
    # 1 + 2**-20 needs 20 mantissa bits; TF32 keeps 10. A 256-cube product is a GEMM large
    # enough for cuBLASLt to pick tensor-core kernels when TF32 is allowed (for a 32-cube it may
    # pick a float32 SIMT kernel either way): exact 256 + 2**-12 in float32, 256 in TF32.
    a = mx.full((256, 256), 1 + 2.0 ** -20, mx.float32)
    probe = (a @ mx.ones((256, 256), mx.float32))[0, 0].item()
    _mode = "tf32" if probe == 256.0 else "ieee"


def _split(x):
    """x = hi + lo with hi exact in TF32 (the top 10 mantissa bits) and lo the exact remainder."""
    hi = mx.view(mx.view(x, mx.uint32) & 0xFFFFE000, mx.float32)
    return hi, x - hi


def _product_3xtf32(a, b):
    if mx.issubdtype(a.dtype, mx.complexfloating):
        ar, ai, br, bi = mx.real(a), mx.imag(a), mx.real(b), mx.imag(b)
        real = _product_3xtf32(ar, br) - _product_3xtf32(ai, bi)
        imag = _product_3xtf32(ar, bi) + _product_3xtf32(ai, br)
        return real + 1j * imag
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return mx.matmul(a_hi, b_hi) + (mx.matmul(a_hi, b_lo) + mx.matmul(a_lo, b_hi))


def needs_split(dtype) -> bool:
    """Whether a product of this dtype must be computed as 3xTF32 to honour torch's setting."""
    global _warned
    if dtype not in (mx.float32, mx.complex64) or _mode is None or not _on_gpu():
        return False
    if _mode == "ieee":
        if _wants_tf32() and not _warned:
            _warned = True
            warnings.warn("torch_mlx: TF32 was allowed after the first use of the 'mlx' device, "
                          "which fixed MLX's mode for this process: float32 products stay in "
                          "float32. Allow TF32 before the device's first use (or set "
                          "MLX_ENABLE_TF32=1) to use it.", stacklevel=3)
        return False
    return not _wants_tf32()


def _empty_contraction(a, b):
    """The zeros of an ``a @ b`` with nothing to sum (matrices with an inner size of 0), or None.
    MLX's CUDA GEMM kills the process on K = 0 (addmm of (5, 0) @ (0, 10) on the H100)."""
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != 0:
        return None
    batch = mx.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return mx.zeros(batch + (a.shape[-2], b.shape[-1]), mx.result_type(a, b))


def matmul(a, b):
    """``a @ b`` for floating and complex arrays, in the precision torch asks for."""
    zeros = _empty_contraction(a, b)
    if zeros is not None:
        return zeros
    if needs_split(a.dtype):
        return _product_3xtf32(a, b)
    return mx.matmul(a, b)


def addmm(c, a, b, alpha, beta):
    """``beta * c + alpha * (a @ b)``, fused by MLX unless the product must be split."""
    zeros = _empty_contraction(a, b)
    if zeros is not None:
        return zeros + (c if beta == 1 else c * beta)
    if needs_split(a.dtype):
        product = _product_3xtf32(a, b)
        if alpha != 1:
            product = product * alpha
        return product if beta == 0 else product + (c if beta == 1 else c * beta)
    return mx.addmm(c, a, b, alpha=alpha, beta=beta)


class _MatmulFlags:
    """``torch.backends.mlx.matmul``: the same switches as ``torch.backends.cuda.matmul``."""

    @property
    def allow_tf32(self) -> bool:
        return _wants_tf32()

    @allow_tf32.setter
    def allow_tf32(self, value: bool) -> None:
        torch.set_float32_matmul_precision("high" if value else "highest")

    @property
    def fp32_precision(self) -> str:
        return "tf32" if _wants_tf32() else "ieee"

    @fp32_precision.setter
    def fp32_precision(self, value: str) -> None:
        if value not in ("ieee", "tf32"):
            raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {value!r}")
        self.allow_tf32 = value == "tf32"


def install_backend_module() -> None:
    """``torch.backends.mlx``, with ``matmul.allow_tf32`` / ``matmul.fp32_precision``."""
    module = types.ModuleType("torch.backends.mlx", "MLX backend switches (torch_mlx)")
    module.matmul = _MatmulFlags()
    module.mlx_float32_gemm_mode = mlx_mode
    torch.backends.mlx = module
