"""Discrete Fourier transforms: the three aten primitives every torch.fft function (fft, ifft,
rfft, irfft, hfft, ihfft and their 2-d / n-d forms) and stft reduce to, on ``mlx.core.fft``.

- ``_fft_r2c(self, dim, normalization, onesided)``: real -> complex, forward;
- ``_fft_c2r(self, dim, normalization, last_dim_size)``: onesided complex -> real, backward;
  the last transformed dimension of the result has ``last_dim_size`` elements;
- ``_fft_c2c(self, dim, normalization, forward)``: complex -> complex.

torch has already padded or trimmed the signal, promoted integer inputs to float32 and
conjugated where its hfft / ihfft ask for it. ``normalization`` is torch's fft_norm_mode:
0 none, 1 1/sqrt(n), 2 1/n, with n the number of elements of the transformed (real) signal.
MLX's inverse transforms divide by n themselves; the lowerings undo that and apply torch's mode.
Like torch's CPU kernels they take float32 / complex64 only (no half precision).
"""
import math

import mlx.core as mx

from .registry import lowering


def _check_dtype(self, name: str):
    if self.dtype not in (mx.float32, mx.complex64):
        # torch's CPU FFT rejects half types with a RuntimeError; so does mlx
        raise RuntimeError(f"mlx FFT ({name}) doesn't support tensors of type: "
                           f"{_TYPE_NAMES.get(self.dtype, self.dtype)}")


_TYPE_NAMES = {mx.float16: "Half", mx.bfloat16: "BFloat16"}


def _scale(n: int, normalization: int) -> float:
    """torch's fft_norm_mode as a factor on the unnormalised transform."""
    if normalization == 1:
        return 1.0 / math.sqrt(n)
    if normalization == 2:
        return 1.0 / n
    return 1.0


def _inverse_scale(n: int, normalization: int) -> float:
    """The factor on MLX's inverse transform (already divided by n) that gives torch's mode."""
    return {0: float(n), 1: math.sqrt(n)}.get(normalization, 1.0)


def _scaled(x, factor: float):
    return x if factor == 1.0 else x * mx.array(factor, dtype=mx.float32)


def _signal_size(shape, dim) -> int:
    return math.prod(shape[d] for d in dim)


@lowering("_fft_r2c")
def _fft_r2c(self, dim, normalization, onesided):
    _check_dtype(self, "r2c")
    dim = [d % self.ndim for d in dim]
    n = _signal_size(self.shape, dim)
    if self.size == 0:
        shape = list(self.shape)
        if onesided:
            shape[dim[-1]] = shape[dim[-1]] // 2 + 1
        return mx.zeros(shape, mx.complex64)
    if onesided:
        out = mx.fft.rfftn(self, axes=dim)
    else:  # the full spectrum, Hermitian-symmetric
        out = mx.fft.fftn(self.astype(mx.complex64), axes=dim)
    return _scaled(out, _scale(n, normalization))


@lowering("_fft_c2r")
def _fft_c2r(self, dim, normalization, last_dim_size):
    _check_dtype(self, "c2r")
    dim = [d % self.ndim for d in dim]
    sizes = [self.shape[d] for d in dim[:-1]] + [last_dim_size]
    n = math.prod(sizes)
    if self.size == 0 or n == 0:
        shape = list(self.shape)
        shape[dim[-1]] = last_dim_size
        return mx.zeros(shape, mx.float32)
    out = mx.fft.irfftn(self, s=sizes, axes=dim)  # divided by n
    return _scaled(out, _inverse_scale(n, normalization))


@lowering("_fft_c2c")
def _fft_c2c(self, dim, normalization, forward):
    _check_dtype(self, "c2c")
    if not dim:
        return mx.array(self)
    dim = [d % self.ndim for d in dim]
    n = _signal_size(self.shape, dim)
    if self.size == 0:  # an empty batch (torch has rejected empty signals already)
        return mx.zeros(self.shape, mx.complex64)
    if forward:
        return _scaled(mx.fft.fftn(self, axes=dim), _scale(n, normalization))
    return _scaled(mx.fft.ifftn(self, axes=dim), _inverse_scale(n, normalization))
