"""Elementwise ops: unary, binary, comparison, logical and bitwise, and the special functions.

Each lowering computes what torch's CPU kernel computes. The adapter has already cast tensor
inputs to torch's computation dtype (``promote=``), so half-precision inputs arrive as float32,
as in torch's own "opmath" kernels; ``opmath=False`` marks the few ops whose CPU kernels round
every step to half precision instead (trunc division, logit) or work on the dtype's bits.
Where MLX's op means something else than torch's (integer pow with negative exponents, shifts
past the bit width, fmod, floor division of floats, gcd) the lowering spells torch's definition
out in MLX ops, and where MLX's function is less accurate than float32 allows (exp beyond
|x| = 10, erf near 0) it is computed from an accurate core. Dtypes the CPU has no kernel for
raise the CPU's NotImplementedError (meta kernels do not check dtypes).
"""
import functools
import math

import mlx.core as mx
import torch

from .. import _C
from . import registry as _registry
from .registry import PROMOTE, lowering, torch_kernel, tracing

# ----------------------------------------------------------------------------------------------
# Helpers

_INT_VIEW = {mx.float32: mx.int32, mx.float16: mx.int16, mx.bfloat16: mx.int16}


def _is_float(a) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def _is_int(a) -> bool:
    return mx.issubdtype(a.dtype, mx.integer)


def _is_signed(a) -> bool:
    return mx.issubdtype(a.dtype, mx.signedinteger)


def _signbit(x):
    """The sign bit, also of -0.0 and of NaNs (read from the bits, not by comparison)."""
    if x.dtype in _INT_VIEW:
        return mx.view(x, _INT_VIEW[x.dtype]) < 0
    if x.dtype == mx.bool_ or mx.issubdtype(x.dtype, mx.unsignedinteger):
        return mx.zeros(x.shape, mx.bool_)
    return x < 0


def _copysign(magnitude, sign):
    mag = mx.abs(magnitude)
    return mx.where(_signbit(sign), -mag, mag)


def _check_no_zero_divisor(other):
    """Integer division by zero raises in torch; the check needs the values, so it runs in eager
    mode only (a compiled graph cannot evaluate while it traces)."""
    if tracing():
        return
    if isinstance(other, mx.array):
        if other.dtype == mx.bool_ or _is_int(other):
            if mx.any(other == 0).item():
                raise RuntimeError("ZeroDivisionError")
    elif isinstance(other, (bool, int)) and other == 0:
        raise RuntimeError("ZeroDivisionError")


_TYPE_NAMES = {mx.bool_: "Bool", mx.uint8: "Byte", mx.int8: "Char", mx.int16: "Short",
               mx.int32: "Int", mx.int64: "Long", mx.float16: "Half", mx.bfloat16: "BFloat16",
               mx.float32: "Float", mx.uint16: "UInt16", mx.uint32: "UInt32",
               mx.uint64: "UInt64", mx.complex64: "ComplexFloat"}


def _two_sum(a, b):
    """(s, e): s = a + b rounded, e its exact rounding error (Knuth)."""
    s = a + b
    back = s - a
    return s, (a - (s - back)) + (b - back)


def fma32(a, b, c):
    """a * b + c rounded once in float32, as the fused multiply-adds of torch's vectorised CPU
    kernels (GCC contracts their a * b + c): Boldo and Melquiond's emulation (IEEE TC 2008),
    a * b = p + e exactly (Dekker's product of 12-bit halves), c + p = s + t exactly, then
    s + round_to_odd(t + e), whose one rounding is the fused one. Operands whose halves would
    overflow (|a|, |b| >= 1e30) or non-finite results fall back to a * b + c."""
    def split(v):
        t = v * 4097.0
        hi = t - (t - v)
        return hi, v - hi
    (ah, al), (bh, bl) = split(a), split(b)
    p = a * b
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    s, t = _two_sum(c, p)
    u, err = _two_sum(t, e)  # round t + e to odd: to the odd neighbour when inexact
    bits = mx.view(u, mx.int32)
    toward = mx.where((err > 0) == (u > 0), 1, -1).astype(mx.int32)
    odd = mx.where((err != 0) & ((bits & 1) == 0), mx.view(bits + toward, mx.float32), u)
    fused = s + mx.stop_gradient(odd)  # differentiable as a * b + c (no vjp through view)
    safe = (mx.abs(a) < 1e30) & (mx.abs(b) < 1e30) & mx.isfinite(fused)
    exact_product_plus_inf = mx.isinf(c) & mx.isfinite(a) & mx.isfinite(b)  # (p may be inf)
    return mx.where(safe, fused, mx.where(exact_product_plus_inf, c, p + c))


def _require(x, name: str, *, bool_=True, ints=True, floats=True):
    """Raise as torch's CPU kernel does for a dtype it has no kernel for (meta kernels do not
    check dtypes). ``x`` is the computation-dtype operand."""
    ok = (bool_ if x.dtype == mx.bool_ else ints if _is_int(x) else floats if _is_float(x)
          else True)
    if not ok:
        raise NotImplementedError(f'"{name}" not implemented for \'{_TYPE_NAMES[x.dtype]}\'')


def _opmath(x):
    """Half-precision values computed in float32, as torch's CPU kernels do."""
    if isinstance(x, mx.array) and x.dtype in (mx.float16, mx.bfloat16):
        return x.astype(mx.float32)
    return x


def _as_array(x, like):
    return x if isinstance(x, mx.array) else mx.array(x, dtype=like.dtype)


# ----------------------------------------------------------------------------------------------
# Unary floating-point functions: integer inputs are computed in the default float dtype.

_FLOAT_UNARY = {
    "expm1": mx.expm1, "log": mx.log, "log2": mx.log2, "log10": mx.log10,
    "log1p": mx.log1p, "sqrt": mx.sqrt, "rsqrt": mx.rsqrt, "sin": mx.sin, "cos": mx.cos,
    "tan": mx.tan, "asin": mx.arcsin, "acos": mx.arccos, "atan": mx.arctan, "sinh": mx.sinh,
    "cosh": mx.cosh, "tanh": mx.tanh, "asinh": mx.arcsinh, "acosh": mx.arccosh,
    "atanh": mx.arctanh, "erfinv": mx.erfinv, "reciprocal": mx.reciprocal,
}
for _name, _fn in _FLOAT_UNARY.items():
    lowering(_name, promote=PROMOTE.INT_TO_FLOAT)(lambda self, _fn=_fn: _fn(self))

_LN2_HI = 0.693359375  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with 9 significant bits
_LN2_LO = -2.12194440e-4


def _exp_float32(x):
    """exp to float32 precision. MLX's exp is off by up to 4e-6 (relative) for |x| > 10; it is
    accurate near 0, so reduce first: x = k ln2 + r, |r| <= ln2 / 2, exp(x) = 2**k exp(r), with
    k ln2 subtracted in two exact-ish parts. 2**k is applied as 2 * 2**(k-1): both factors are
    exact (2**(k-1) is a power of two, subnormal down to k = -148), so the result is finite where
    exp(x) is and rounds once. NaN passes through clip, round and power."""
    xc = mx.clip(x, -104.0, 89.0)  # exp is 0 below and inf above in float32
    k = mx.round(xc * (1 / math.log(2)))
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    return (mx.exp(r) * 2) * mx.power(2.0, k - 1)


# One fused kernel instead of a dozen MLX ops: on the CPU each op in a graph costs 10-20 us, more
# than this arithmetic below a few thousand elements, and the fused loop is faster at 1M too
# (37 vs 41 ms), with bitwise the same results. shapeless: one trace serves every shape.
_exp_float32_fused = mx.compile(_exp_float32, shapeless=True)


def _exp(x):
    if x.dtype != mx.float32:
        return mx.exp(x)
    return _exp_float32_fused(x) if _registry.compile_allowed() else _exp_float32(x)


@lowering("exp", promote=PROMOTE.INT_TO_FLOAT)
def exp(self):
    return _exp(self)


@lowering("sigmoid", promote=PROMOTE.INT_TO_FLOAT)
def sigmoid(self):
    return 1 / (1 + _exp(-self))  # torch's formula: 0 where exp(-x) overflows


# erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)); twelve terms reach float32
# precision for |x| < 1, where MLX's erf loses relative accuracy (it returns 0 for 1e-8 and is
# off by 6e-7 near 1, which 1 - erf(x) would amplify in erfc).
_ERF_SERIES = [(-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(12)]


def _erf(x):
    x2 = x * x
    series = _ERF_SERIES[-1]
    for c in reversed(_ERF_SERIES[:-1]):
        series = series * x2 + c
    return mx.where(mx.abs(x) < 1, (2 / math.sqrt(math.pi)) * x * series, mx.erf(x))


@lowering("erf", promote=PROMOTE.INT_TO_FLOAT)
def erf(self):
    return _erf(self)


@lowering("exp2", promote=PROMOTE.INT_TO_FLOAT)
def exp2(self):
    return mx.power(mx.array(2.0, self.dtype), self)  # exact at integers, unlike exp(x ln 2)


@lowering("deg2rad", promote=PROMOTE.INT_TO_FLOAT)
def deg2rad(self):
    return self * (math.pi / 180)


@lowering("rad2deg", promote=PROMOTE.INT_TO_FLOAT)
def rad2deg(self):
    return self * (180 / math.pi)


@lowering("sinc", promote=PROMOTE.INT_TO_FLOAT)
def sinc(self):
    x = self * math.pi
    return mx.where(self == 0, mx.array(1.0, self.dtype), mx.sin(x) / x)


@lowering("logit", promote=PROMOTE.INT_TO_FLOAT, opmath=False)
def logit(self, eps=None):
    # torch's CPU kernel rounds each step to the input dtype (half stays half)
    x = self
    if eps is not None:  # clamp to [eps, 1 - eps]; NaN passes through
        lo = mx.array(eps, x.dtype)
        hi = 1 - lo
        x = mx.where(x < lo, lo, mx.where(x > hi, hi, x))
    return mx.log(x / (1 - x))


def _exp_minus_square(x):
    """exp(-x*x) without the rounding of x*x: x = hi + lo with hi a multiple of 1/16, so hi*hi
    is exact (|x| < 16 needs 8 significant bits) and exp takes an exact argument plus a small
    one."""
    hi = mx.floor(x * 16) / 16
    return _exp(-hi * hi) * _exp(-(x - hi) * (x + hi))


def _erfc_tail_times_exp(x, terms=40):
    """erfc(x) * exp(x*x) for x >= 1, by the continued fraction
    sqrt(pi) erfc(x) e^(x^2) = 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), evaluated from the
    tail; 40 terms reach float32 precision from x = 1 on."""
    t = x
    for n in range(terms, 0, -1):
        t = x + (n / 2) / t
    return 1 / (math.sqrt(math.pi) * t)


def _erfc_nonneg_tail(x):
    """erfc(x) for x >= 1 to full relative precision (1 - erf(x) would cancel)."""
    safe = mx.clip(x, 1, 20)  # erfc(20) is 0 in float32
    return mx.where(x > 20, 0, _exp_minus_square(safe) * _erfc_tail_times_exp(safe))


@lowering("erfc", promote=PROMOTE.INT_TO_FLOAT)
def erfc(self):
    a = mx.abs(self)
    pos = mx.where(a < 1, 1 - _erf(a), _erfc_nonneg_tail(a))
    return mx.where(self < 0, 2 - pos, pos)


@lowering("special_erfcx", promote=PROMOTE.INT_TO_FLOAT)
def special_erfcx(self):
    a = mx.maximum(self, 1)
    small = _exp(self * self) * (1 - _erf(self))
    return mx.where(self < 1, small, _erfc_tail_times_exp(a))


# ----------------------------------------------------------------------------------------------
# Unary ops that keep the input dtype


@lowering("abs", promote=PROMOTE.DEFAULT)
def abs_(self):
    _require(self, "abs_cpu", bool_=False)
    return mx.abs(self)


@lowering("neg", promote=PROMOTE.DEFAULT)
def neg(self):
    return mx.negative(self)


@lowering("sign", "sgn", promote=PROMOTE.DEFAULT)
def sign(self):
    if self.dtype == mx.bool_:
        return self
    if self.dtype == mx.complex64:  # sgn(z) = z / |z|, 0 at 0
        mag = mx.abs(self)
        return mx.where(mag == 0, mx.array(0, self.dtype), self / mag)
    return mx.sign(self)  # sign(NaN) is 0 in both


@lowering("signbit")
def signbit(self):
    return _signbit(self)


def _rounding(name, fn):
    def rounding(self):
        _require(self, f"{name}_vml_cpu", bool_=False)
        return self if _is_int(self) else fn(self)  # integers are already whole
    return rounding


lowering("ceil", promote=PROMOTE.DEFAULT)(_rounding("ceil", mx.ceil))
lowering("floor", promote=PROMOTE.DEFAULT)(_rounding("floor", mx.floor))
lowering("trunc", promote=PROMOTE.DEFAULT)(_rounding("trunc", mx.trunc))
lowering("round", promote=PROMOTE.DEFAULT)(_rounding("round", mx.round))  # half to even, both


@lowering("round.decimals", promote=PROMOTE.DEFAULT)
def round_decimals(self, decimals=0):
    _require(self, "round_cpu", bool_=False, ints=False)
    # torch: nearbyint(x * 10^d) / 10^d for d > 0, nearbyint(x / 10^-d) * 10^-d otherwise;
    # 10^|d| is inf in the dtype from |d| = 39 on (Python's 10.0 ** 309 would raise)
    scale = mx.array(10.0 ** abs(decimals) if abs(decimals) <= 308 else math.inf,
                     self.dtype)
    if decimals > 0:
        return mx.round(self * scale) / scale
    return mx.round(self / scale) * scale


@lowering("frac", promote=PROMOTE.DEFAULT)
def frac(self):
    _require(self, "frac_cpu", ints=False)
    return self - mx.trunc(self)


@lowering("bitwise_not", promote=PROMOTE.DEFAULT, opmath=False)
def bitwise_not(self):
    _require(self, "bitwise_not_cpu", floats=False)
    return mx.logical_not(self) if self.dtype == mx.bool_ else mx.bitwise_invert(self)


@lowering("isnan")
def isnan(self):
    return mx.isnan(self) if _is_float(self) or self.dtype == mx.complex64 else \
        mx.zeros(self.shape, mx.bool_)


@lowering("isinf")
def isinf(self):
    return mx.isinf(self) if _is_float(self) else mx.zeros(self.shape, mx.bool_)


@lowering("isposinf")
def isposinf(self):
    return mx.isposinf(self) if _is_float(self) else mx.zeros(self.shape, mx.bool_)


@lowering("isneginf")
def isneginf(self):
    return mx.isneginf(self) if _is_float(self) else mx.zeros(self.shape, mx.bool_)


@lowering("nan_to_num")
def nan_to_num(self, nan=None, posinf=None, neginf=None):
    if not _is_float(self):
        return self
    info = mx.finfo(self.dtype)
    x = mx.where(mx.isnan(self), mx.array(0.0 if nan is None else nan, self.dtype), self)
    x = mx.where(mx.isposinf(self), mx.array(info.max if posinf is None else posinf, self.dtype), x)
    return mx.where(mx.isneginf(self), mx.array(info.min if neginf is None else neginf, self.dtype),
                    x)


@lowering("frexp.Tensor")
def frexp(self):
    """x = mantissa * 2**exponent with 0.5 <= |mantissa| < 1, read from the float's bits."""
    int_dtype = _INT_VIEW[self.dtype]
    mant_bits = {mx.float32: 23, mx.float16: 10, mx.bfloat16: 7}[self.dtype]
    exp_mask = {mx.float32: 0xFF, mx.float16: 0x1F, mx.bfloat16: 0xFF}[self.dtype]
    bias = exp_mask // 2
    # subnormals: scale into the normal range first, then correct the exponent
    sub = (mx.abs(self) < 2.0 ** (1 - bias)) & (self != 0)  # below the smallest normal
    scaled = mx.where(sub, self * mx.array(2.0 ** mant_bits, self.dtype), self)
    bits = mx.view(scaled, int_dtype).astype(mx.int32)
    biased = mx.right_shift(bits, mant_bits) & exp_mask
    exponent = biased - (bias - 1) - mx.where(sub, mant_bits, 0)
    # mantissa: the same bits with the exponent field set to 2**-1
    clear = ~(exp_mask << mant_bits)
    mbits = (bits & clear) | ((bias - 1) << mant_bits)
    mantissa = mx.view(mbits.astype(int_dtype), self.dtype)
    special = (self == 0) | mx.isinf(self) | mx.isnan(self)
    return (mx.where(special, self, mantissa),
            mx.where(special, 0, exponent).astype(mx.int32))


# ----------------------------------------------------------------------------------------------
# Arithmetic


# add/sub/rsub: torch's CPU kernel (ufunc-generated, add_stub also for sub) takes its operands
# in the result dtype, so a Python number or a 0-d tensor beside a half tensor is rounded to
# half first, and so is alpha (alpha.to<scalar_t>()); its vectorised loop then computes
# self + alpha * other in float32 and rounds once. Hence opmath=False here: the inputs arrive in
# the result dtype and half types are computed in float32 with alpha rounded to the dtype.
# (Its scalar tail loop, which handles the last numel mod 2 SIMD widths of an inner loop, rounds
# alpha * other to half first; that depends on the machine's vector width and is not copied:
# 1-ulp differences there.)
def _plus_scaled(a, b, alpha, sign):
    """a + sign * alpha * b, as the CPU's add kernel (b a number for add.Scalar / sub.Scalar:
    a Scalar argument, which the adapter passes as it is)."""
    b = _as_array(b, a)
    if a.dtype in (mx.float16, mx.bfloat16):
        scale = sign * mx.array(alpha, a.dtype).astype(mx.float32)  # alpha rounded to the dtype
        return (a.astype(mx.float32) + scale * b.astype(mx.float32)).astype(a.dtype)
    if alpha == 1:
        return mx.add(a, b) if sign > 0 else mx.subtract(a, b)
    return mx.add(a, mx.multiply(b, alpha)) if sign > 0 else mx.subtract(a, mx.multiply(b, alpha))


@lowering("add.Tensor", "add.Scalar", promote=PROMOTE.DEFAULT, opmath=False)
def add(self, other, alpha=1):
    if self.dtype == mx.bool_:  # bool + bool stays boolean: a logical or
        return mx.logical_or(self, mx.logical_and(other, bool(alpha)))
    return _plus_scaled(self, other, alpha, 1)


_SUB_BOOLS = ("Subtraction, the `-` operator, with two bool tensors is not supported. "
              "Use the `^` or `logical_xor()` operator instead.")
_SUB_BOOL = ("Subtraction, the `-` operator, with a bool tensor is not supported. "
             "If you are trying to invert a mask, use the `~` or `logical_not()` operator instead.")


def _sub_check(spec, self, other, alpha=1):
    """torch's sub_check (a bool operand: a tensor, a wrapped number or a Python bool), which
    the CPU's sub and rsub run and torch's meta kernel for them (a Python reference) does not:
    bool_t - 1 computed -1 instead of raising. Runs before the lowering, as a spec hook."""
    def is_bool(x):
        return isinstance(x, bool) or isinstance(x, torch.Tensor) and x.dtype == torch.bool
    if is_bool(self) and is_bool(other):
        raise RuntimeError(_SUB_BOOLS)
    if is_bool(self) or is_bool(other):
        raise RuntimeError(_SUB_BOOL)
    return spec


@lowering("sub.Tensor", "sub.Scalar", promote=PROMOTE.DEFAULT, opmath=False, spec=_sub_check)
def sub(self, other, alpha=1):
    return _plus_scaled(self, other, alpha, -1)


@lowering("rsub.Tensor", "rsub.Scalar", promote=PROMOTE.DEFAULT, opmath=False, spec=_sub_check)
def rsub(self, other, alpha=1):
    if self.dtype == mx.bool_:  # (compiled graphs: no spec hook there)
        raise RuntimeError(_SUB_BOOL)
    return _plus_scaled(_as_array(other, self), self, alpha, -1)  # rsub.Scalar: a number


@lowering("mul.Tensor", "mul.Scalar", promote=PROMOTE.DEFAULT)
def mul(self, other):
    if self.dtype == mx.bool_:
        return mx.logical_and(self, other)
    return mx.multiply(self, other)


@lowering("div.Tensor", "div.Scalar", promote=PROMOTE.INT_TO_FLOAT)
def div(self, other):
    return mx.divide(self, other)


def _float_remainder(a, b):
    """mx.remainder for floats; half types in float32, rounded once, as torch's CPU kernels do
    (MLX's CUDA remainder returns NaN for some bfloat16 inputs: tools/gpu_probe's test run)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        return mx.remainder(a.astype(mx.float32), _as_array(b, a).astype(mx.float32)).astype(a.dtype)
    return mx.remainder(a, b)


def _fmod(a, b):
    """C's fmod / %: the remainder of truncated division (exact), with the dividend's sign.
    Floats: remainder() of the magnitudes is fmod; integers: the floor remainder, corrected."""
    if _is_float(a):
        return _copysign(_float_remainder(mx.abs(a), mx.abs(b)), a)
    r = mx.remainder(a, b)  # integers: from the floor remainder (|INT_MIN| is not representable)
    return mx.where((r != 0) & ((r < 0) != (a < 0)), r - b, r)


def _floor_divide(a, b):
    if not _is_float(a):
        _check_no_zero_divisor(b)
        return mx.floor_divide(a, b)
    # torch (and Python): the quotient of a - fmod(a, b), rounded to the nearest integer
    # (exact for quotients up to 2**24), one less when the remainder's sign differs from b's.
    b = _as_array(b, a)
    mod = _fmod(a, b)
    q = (a - mod) / b
    q = mx.where((mod != 0) & ((b < 0) != (mod < 0)), q - 1, q)
    fq = mx.floor(q)
    fq = mx.where(q - fq > 0.5, fq + 1, fq)
    fq = mx.where(q == 0, _copysign(mx.zeros_like(q), a / b), fq)
    return mx.where(b == 0, a / b, fq)


def _trunc_divide(a, b):
    if not _is_float(a):
        _check_no_zero_divisor(b)
        q = mx.floor_divide(mx.abs(a), mx.abs(b))
        return mx.where((a < 0) != (b < 0), -q, q)
    if a.dtype in (mx.float16, mx.bfloat16):
        # torch 2.13's CPU kernel: the quotient rounded to half, then truncated (torch 2.11's
        # truncated the float32 quotient). Formed in float32 and rounded once here, whatever
        # MLX's half division does on a given backend.
        b = _as_array(b, a)
        return mx.trunc((a.astype(mx.float32) / b.astype(mx.float32)).astype(a.dtype))
    return mx.trunc(a / b)


def _div_mode(self, other, rounding_mode=None):
    if rounding_mode is None:
        if not _is_float(self):
            self = self.astype(mx.float32)
        return mx.divide(self, other)
    if rounding_mode == "trunc":  # half precision: trunc of the quotient rounded to half
        _require(self, "div_trunc_cpu", bool_=False)
        return _trunc_divide(self, other)
    return _floor_divide(_opmath(self), _opmath(other))  # computed in float32 by torch


# The inputs arrive in the result dtype (opmath=False); the modes upcast as torch's kernels do.
lowering("div.Tensor_mode", "div.Scalar_mode", promote=PROMOTE.DEFAULT, opmath=False)(_div_mode)


@lowering("floor_divide", "floor_divide.Scalar", promote=PROMOTE.DEFAULT)
def floor_divide(self, other):
    return _floor_divide(self, other)


@lowering("remainder.Tensor", "remainder.Scalar", promote=PROMOTE.DEFAULT)
def remainder(self, other):
    _require(self, "remainder_cpu", bool_=False)
    if not _is_float(self):
        _check_no_zero_divisor(other)
        return mx.remainder(self, other)
    return _float_remainder(self, other)  # both floor-mod: the result takes the divisor's sign


@lowering("remainder.Scalar_Tensor", promote=PROMOTE.DEFAULT)
def remainder_scalar_tensor(self, other):
    return remainder(_as_array(self, other), other)


@lowering("fmod.Tensor", "fmod.Scalar", promote=PROMOTE.DEFAULT)
def fmod(self, other):
    _require(self, "fmod_cpu", bool_=False)
    if not _is_float(self):
        _check_no_zero_divisor(other)
    return _fmod(self, _as_array(other, self))


def _int_pow(base, exp):
    """torch's integer power: repeated multiplication (wrapping), and for negative exponents
    1 ** -n = 1, (-1) ** -n = +-1, anything else 0."""
    if not _is_signed(base):
        return mx.power(base, exp)
    p = mx.power(base, mx.maximum(exp, 0))
    odd = mx.remainder(exp, 2) != 0
    neg = mx.where(base == 1, 1, mx.where(base == -1, mx.where(odd, -1, 1), 0)).astype(p.dtype)
    return mx.where(exp < 0, neg, p)


def _pow(base, exp):
    _require(base, "pow", bool_=False)
    if _is_int(base):
        return _int_pow(base, _as_array(exp, base))
    return mx.power(base, exp)


@lowering("pow.Tensor_Tensor", promote=PROMOTE.BOOL_TO_LONG)
def pow_tensor_tensor(self, exponent):
    return _pow(self, exponent)


@lowering("pow.Tensor_Scalar", promote=PROMOTE.BOOL_TO_LONG)
def pow_tensor_scalar(self, exponent):
    if _is_int(self) and isinstance(exponent, int) and exponent < 0:
        raise RuntimeError("Integers to negative integer powers are not allowed.")
    return _pow(self, exponent)


@lowering("pow.Scalar", promote=PROMOTE.BOOL_TO_LONG)
def pow_scalar(self, exponent):
    return _pow(_as_array(self, exponent), exponent)


@lowering("maximum", promote=PROMOTE.DEFAULT)
def maximum(self, other):
    return mx.maximum(self, other)  # NaN propagates, as in torch


@lowering("minimum", promote=PROMOTE.DEFAULT)
def minimum(self, other):
    return mx.minimum(self, other)


@lowering("fmax", promote=PROMOTE.DEFAULT)
def fmax(self, other):
    if not _is_float(self):
        return mx.maximum(self, other)
    return mx.where(mx.isnan(self), other, mx.where(mx.isnan(other), self, mx.maximum(self, other)))


@lowering("fmin", promote=PROMOTE.DEFAULT)
def fmin(self, other):
    if not _is_float(self):
        return mx.minimum(self, other)
    return mx.where(mx.isnan(self), other, mx.where(mx.isnan(other), self, mx.minimum(self, other)))


def _clamp(self, min=None, max=None):
    # min(max(x, lo), hi): a NaN anywhere propagates; lo > hi gives hi
    x = self
    if min is not None:
        x = mx.maximum(x, min)
    if max is not None:
        x = mx.minimum(x, max)
    return x


lowering("clamp", "clamp.Tensor", promote=PROMOTE.DEFAULT)(_clamp)


@lowering("clamp_min", "clamp_min.Tensor", promote=PROMOTE.DEFAULT)
def clamp_min(self, min):
    return mx.maximum(self, min)


@lowering("clamp_max", "clamp_max.Tensor", promote=PROMOTE.DEFAULT)
def clamp_max(self, max):
    return mx.minimum(self, max)


@lowering("atan2", promote=PROMOTE.INT_TO_FLOAT)
def atan2(self, other):
    return mx.arctan2(self, other)


@lowering("hypot", promote=PROMOTE.DEFAULT)
def hypot(self, other):
    _require(self, "hypot_cpu", bool_=False, ints=False)
    # max * sqrt(1 + (min/max)^2): no overflow or underflow of the squares
    a, b = mx.abs(self), mx.abs(other)
    hi, lo = mx.maximum(a, b), mx.minimum(a, b)
    r = lo / mx.where(hi == 0, 1, hi)
    h = hi * mx.sqrt(1 + r * r)
    return mx.where(mx.isinf(a) | mx.isinf(b), mx.array(math.inf, h.dtype), h)


@lowering("copysign.Tensor", "copysign.Scalar", promote=PROMOTE.INT_TO_FLOAT)
def copysign(self, other):
    return _copysign(self, _as_array(other, self))


@lowering("nextafter", promote=PROMOTE.DEFAULT, opmath=False)  # bit steps of the dtype itself
def nextafter(self, other):
    """The next representable float after self towards other: one step of the bit pattern."""
    _require(self, "nextafter_cpu", bool_=False, ints=False)
    int_dtype = _INT_VIEW[self.dtype]
    bits = mx.view(self, int_dtype)
    away = (self < other) == (self > 0)  # moving away from zero increases the magnitude bits
    stepped = mx.view(mx.where(away, bits + 1, bits - 1).astype(int_dtype), self.dtype)
    smallest = mx.view(mx.array(1, int_dtype), self.dtype)
    from_zero = _copysign(mx.broadcast_to(smallest, other.shape), other)
    out = mx.where(self == 0, from_zero, stepped)
    out = mx.where(self == other, other, out)
    return mx.where(mx.isnan(self) | mx.isnan(other), mx.array(math.nan, self.dtype), out)


@lowering("ldexp.Tensor", promote=PROMOTE.INT_TO_FLOAT)
def ldexp(self, other):
    return self * mx.power(mx.array(2.0, self.dtype), other)


@lowering("lerp.Scalar", "lerp.Tensor")  # torch requires one dtype: nothing to promote
def lerp(self, end, weight):
    _require(self, "lerp_kernel_scalar" if not isinstance(weight, mx.array) else
             "lerp_kernel_tensor", bool_=False, ints=False)
    self, end, weight = _opmath(self), _opmath(end), _opmath(weight)
    # torch's two-sided formula: exact at weight 0 and weight 1
    diff = end - self
    weight = _as_array(weight, self)
    return mx.where(mx.abs(weight) < 0.5, self + weight * diff, end - diff * (1 - weight))


@lowering("addcmul", promote=PROMOTE.DEFAULT)
def addcmul(self, tensor1, tensor2, value=1):
    _require(self, "addcmul_cpu_out", bool_=False)
    return self + value * tensor1 * tensor2


@lowering("addcdiv", promote=PROMOTE.DEFAULT)
def addcdiv(self, tensor1, tensor2, value=1):
    if not _is_float(tensor1) and not _is_float(tensor2):
        raise RuntimeError("Integer division with addcdiv is no longer supported, and in a "
                           "future release addcdiv will perform a true division of tensor1 and "
                           "tensor2. The historic addcdiv behavior can be implemented as "
                           "(input + value * torch.trunc(tensor1 / tensor2)).to(input.dtype) "
                           "for integer inputs and as (input + value * tensor1 / tensor2) for "
                           "float inputs. The future addcdiv behavior is just the latter "
                           "implementation: (input + value * tensor1 / tensor2), for all "
                           "dtypes.")
    return self + value * tensor1 / tensor2


@lowering("logaddexp", promote=PROMOTE.DEFAULT)
def logaddexp(self, other):
    _require(self, "logaddexp_cpu", bool_=False, ints=False)
    hi = mx.maximum(self, other)
    out = hi + mx.log1p(mx.exp(-mx.abs(self - other)))
    return mx.where(mx.isinf(self) & (self == other), self, out)


@lowering("logaddexp2", promote=PROMOTE.DEFAULT)
def logaddexp2(self, other):
    _require(self, "logaddexp2_cpu", bool_=False, ints=False)
    hi = mx.maximum(self, other)
    lo_term = mx.power(mx.array(2.0, hi.dtype), -mx.abs(self - other))
    out = hi + mx.log1p(lo_term) * (1 / math.log(2))
    return mx.where(mx.isinf(self) & (self == other), self, out)


def _xlog(fn):
    def xlog(self, other):
        self, other = _as_array(self, other), _as_array(other, self)
        out = mx.where(self == 0, mx.zeros_like(self), self * fn(other))
        return mx.where(mx.isnan(other), other, out)
    return xlog


lowering("xlogy.Tensor", "xlogy.Scalar_Other", "xlogy.Scalar_Self",
         promote=PROMOTE.INT_TO_FLOAT)(_xlog(mx.log))
lowering("special_xlog1py", "special_xlog1py.other_scalar", "special_xlog1py.self_scalar",
         promote=PROMOTE.INT_TO_FLOAT)(_xlog(mx.log1p))


@lowering("special_entr", promote=PROMOTE.INT_TO_FLOAT)
def special_entr(self):
    pos = -self * mx.log(mx.where(self > 0, self, 1))
    out = mx.where(self > 0, pos, mx.where(self == 0, 0, -math.inf)).astype(self.dtype)
    return mx.where(mx.isnan(self), self, out)


@lowering("heaviside", promote=PROMOTE.DEFAULT)
def heaviside(self, values):
    return mx.where(self == 0, values, (self > 0).astype(self.dtype))


# ----------------------------------------------------------------------------------------------
# Special functions, from their series, recurrences, reflection formulas and asymptotic
# expansions (the coefficients are Bernoulli numbers and binomial terms, written as such).


def _where_nan(x, out):
    return mx.where(mx.isnan(x), x, out)


def _sin_pi(x):
    """sin(pi x) without the rounding of pi x for large |x| (exactly 0 at integers)."""
    return mx.sin(math.pi * (x - mx.round(x))) * mx.where(mx.remainder(mx.round(x), 2) == 0, 1, -1)


def _lgamma_positive(x):
    """lgamma for x > 0: the recurrence lgamma(x) = lgamma(x + n) - log(x (x+1) ... (x+n-1))
    up to x + n >= 8, then Stirling's series with the Bernoulli terms B2k / (2k (2k-1) z^(2k-1))."""
    z, prod = x, mx.ones_like(x)
    for _ in range(8):
        small = z < 8
        prod = mx.where(small, prod * z, prod)
        z = mx.where(small, z + 1, z)
    iz = 1 / z
    iz2 = iz * iz
    series = iz * (1 / 12 - iz2 * (1 / 360 - iz2 * (1 / 1260 - iz2 * (1 / 1680))))
    return (z - 0.5) * mx.log(z) - z + 0.5 * math.log(2 * math.pi) + series - mx.log(prod)


def _lgamma(x):
    positive = _lgamma_positive(mx.where(x > 0, x, 1 - x))
    # reflection: lgamma(x) = log(pi / |sin(pi x)|) - lgamma(1 - x); inf at 0 and negative integers
    reflected = mx.log(math.pi / mx.abs(_sin_pi(x))) - positive
    out = mx.where(x > 0, positive, reflected)
    return _where_nan(x, mx.where(mx.isinf(x) | (x == 0), math.inf, out))


@lowering("lgamma", promote=PROMOTE.INT_TO_FLOAT)
def lgamma(self):
    """Computed a precision above the result's and rounded once, as the C library's lgammaf
    (torch's CPU kernel) is accurate to ~5e-7: in float32 Stirling's (z - 1/2) log z - z
    cancels terms ~16 and log(z (z+1) ...) is ~10, which left errors up to 4e-6 everywhere
    (mvlgamma's sum of five lgamma values then differed from the CPU by 1.3e-5). float64 lives
    on MLX's CPU stream."""
    if self.dtype == mx.float32:
        with mx.stream(mx.cpu):
            return _lgamma(self.astype(mx.float64)).astype(mx.float32)
    return _lgamma(self.astype(mx.float32)).astype(self.dtype)


def _digamma_positive(x):
    """digamma for x > 0: digamma(x) = digamma(x + n) - sum 1 / (x + k) up to x + n >= 10, then
    log z - 1/(2z) - sum B2k / (2k z^(2k))."""
    z, acc = x, mx.zeros_like(x)
    for _ in range(10):
        small = z < 10
        acc = mx.where(small, acc - 1 / z, acc)
        z = mx.where(small, z + 1, z)
    iz2 = 1 / (z * z)
    series = iz2 * (1 / 12 - iz2 * (1 / 120 - iz2 * (1 / 252 - iz2 * (1 / 240 - iz2 / 132))))
    return acc + mx.log(z) - 0.5 / z - series


def _digamma(x):
    positive = _digamma_positive(mx.where(x > 0, x, 1 - x))
    # reflection for x < 0: digamma(x) = digamma(1 - x) - pi / tan(pi x); NaN at the poles
    r = x - mx.round(x)  # exact, |r| <= 1/2: tan(pi r) = tan(pi x) without rounding pi x
    reflected = positive - math.pi / mx.tan(math.pi * r)
    out = mx.where(x > 0, positive, mx.where(r == 0, math.nan, reflected))
    zero = _copysign(mx.full(x.shape, math.inf, x.dtype), -x)  # -inf at +0, +inf at -0
    return _where_nan(x, mx.where(x == 0, zero, out))


@lowering("digamma", promote=PROMOTE.INT_TO_FLOAT)
def digamma(self):
    return _digamma(self)


def _checkpoint(step, *arrays, every=50):
    """Evaluate a long elementwise loop's state every ``every`` steps in eager mode: MLX's CPU
    backend allocates each node's output when it schedules the node, so an unevaluated graph
    of thousands of tensor-sized nodes holds them all at once (igamma of 1e6 elements peaked
    at 7.5 GB)."""
    if step % every == 0 and not tracing():
        mx.eval(*arrays)


@functools.lru_cache(maxsize=None)
def _temme_coefficients(terms=10, powers=25):
    """d[k][n]: c_k(eta) = sum_n d[k][n] eta^n, the coefficients of the uniform asymptotic
    expansion of the incomplete gamma functions for large a (DLMF 8.12.8-8.12.10), in exact
    rational arithmetic (0.3 s, once): sigma = x/a - 1 as a series in eta (eta^2 / 2 =
    sigma - log(1 + sigma), inverted by Lagrange's formula), c_0 = 1/sigma - 1/eta,
    c_k = c_(k-1)'(eta) / eta + (-1)^k g_k c_0 with Stirling's g_k (DLMF 5.11.3)."""
    from fractions import Fraction

    order = powers + 2 * terms + 2

    def product(a, b):
        out = [Fraction(0)] * order
        for i, u in enumerate(a[:order]):
            for j, v in enumerate(b[:order - i]):
                out[i + j] += u * v
        return out

    def reciprocal(a):
        out = [Fraction(0)] * order
        out[0] = 1 / a[0]
        for k in range(1, order):
            out[k] = -sum(a[j] * out[k - j] for j in range(1, k + 1)) / a[0]
        return out

    # eta = sigma v(sigma), v = sqrt(2 sum_(m>=2) (-1)^m sigma^(m-2) / m)
    inside = [Fraction(2 * (-1) ** m, m) for m in range(2, order + 2)]
    v = [Fraction(1)] + [Fraction(0)] * (order - 1)
    for k in range(1, order):
        v[k] = (inside[k] - sum(v[j] * v[k - j] for j in range(1, k))) / 2
    # sigma = eta u(eta): [eta^n] sigma = [s^(n-1)] v(s)^-n / n (Lagrange)
    w, power, u = reciprocal(v), [Fraction(1)] + [Fraction(0)] * (order - 1), []
    for n in range(1, order + 1):
        power = product(power, w)
        u.append(power[n - 1] / n)
    inverse_u = reciprocal(u)
    c0 = inverse_u[1:]  # (1/u - 1) / eta
    # Stirling: Gamma(z) ~ e^-z z^z sqrt(2 pi / z) sum_k g_k z^-k, the sum being
    # exp(sum_m B_2m / (2m (2m-1) z^(2m-1)))
    bernoulli = [Fraction(1)]
    for m in range(1, terms + 2):
        bernoulli.append(-sum(math.comb(m + 1, j) * bernoulli[j] for j in range(m)) / (m + 1))
    log_series = [Fraction(0)] * (terms + 1)
    for m in range(1, terms // 2 + 2):
        if 2 * m - 1 <= terms:
            log_series[2 * m - 1] = bernoulli[2 * m] / (2 * m * (2 * m - 1))
    g = [Fraction(1)]
    for n in range(1, terms + 1):
        g.append(sum(j * log_series[j] * g[n - j] for j in range(1, n + 1)) / n)
    rows = [c0]
    for k in range(1, terms):
        rows.append([(-1) ** k * g[k] * c0[n] + (n + 2) * rows[-1][n + 2]
                     for n in range(len(rows[-1]) - 2)])
    return tuple(tuple(float(c) for c in row[:powers]) for row in rows)


def _igamma_asymptotic(a, x, lower):
    """P (lower) or Q for large a near x by the uniform expansion torch uses there (DLMF 8.12.3,
    8.12.4), computed as its float32 kernel computes it:
    1/2 erfc(-+eta sqrt(a/2)) -+ e^(-a eta^2 / 2) / sqrt(2 pi a) sum_k c_k(eta) a^-k with
    eta = sign(x - a) sqrt(-2 (log1p(sigma) - sigma)), sigma = (x - a) / a in float32, the
    sum in float32, the last term in double. eta's float32 cancellation is most of the CPU's
    error for large a (2e-5 at a = 5e6, 6e-5 at a = 1e8, x - a ~ sqrt(a)); MLX's log1p rounds
    as the C library's log1pf, so the same float32 steps give the same eta. ``a``, ``x``:
    float32; returns float64."""
    sign = -1.0 if lower else 1.0
    sigma = (x - a) / a
    root = mx.sqrt(-2 * (mx.log1p(sigma) - sigma))
    eta = mx.where(x > a, root, mx.where(x < a, -root, 0))  # torch: lambda = x / a vs 1
    total = mx.zeros_like(a)
    scale = mx.ones_like(a)  # a^-k
    for k, row in enumerate(_temme_coefficients()):
        c, power = mx.full(a.shape, row[0], mx.float32), mx.ones_like(a)
        for coefficient in row[1:]:
            power = power * eta
            c = c + coefficient * power
        total = total + c * scale
        scale = scale / a
        _checkpoint(k, total, scale, every=2)
    front = erfc(sign * eta * mx.sqrt(a / 2)).astype(mx.float64) * 0.5
    a64, eta64 = a.astype(mx.float64), eta.astype(mx.float64)
    root_2_pi_a = mx.sqrt((2 * mx.array(math.pi, mx.float32)) * a).astype(mx.float64)
    return front + sign * mx.exp(-0.5 * a64 * eta64 * eta64) * total.astype(mx.float64) \
        / root_2_pi_a


def _igamma_pq(a, x):
    """(P(a, x), Q(a, x)), the regularised incomplete gamma functions, in float64 on MLX's CPU
    stream, in the regions of torch's kernel (calc_igamma / calc_igammac): its boundary values
    first (NaN for a < 0 or x < 0; a = 0, x = 0, a = inf and x = inf decide before a NaN in the
    other argument does), the uniform asymptotic expansion for large a near x (20 < a < 200
    and |x - a| < 0.3 a, or a > 200 and |x - a| < 4.5 sqrt(a)); elsewhere P by its power series
    where x < a or x <= 1.1, Q by the Legendre continued fraction, the other as the complement.
    300 series terms / fraction steps: exact to float64 rounding outside the asymptotic region
    for a up to 200, and beyond it (a > 200 and |x - a| >= 4.5 sqrt(a)) P or Q is below 3e-6."""
    with mx.stream(mx.cpu):
        a32, x32 = mx.broadcast_arrays(a.astype(mx.float32), x.astype(mx.float32))
        a, x = a32.astype(mx.float64), x32.astype(mx.float64)
        ok = (a > 0) & (x > 0) & mx.isfinite(a) & mx.isfinite(x)
        sa, sx = mx.where(ok, a, 1.0), mx.where(ok, x, 1.0)
        log_front = sa * mx.log(sx) - sx - _lgamma_positive(sa)  # log(x^a e^-x / Gamma(a))
        front = mx.exp(log_front)
        term = 1 / sa  # P = front * sum x^n / (a (a+1) ... (a+n))
        total = term
        for n in range(1, 300):
            term = term * sx / (sa + n)
            total = total + term
            _checkpoint(n, term, total)
        p_series = front * total
        tiny = 1e-300  # Q = front * 1 / (x + 1 - a - 1 (1 - a) / (x + 3 - a - ...)), Lentz
        b = sx + 1 - sa
        c = mx.full(b.shape, 1 / tiny, mx.float64)
        d = 1 / mx.where(mx.abs(b) < tiny, tiny, b)
        h = d
        for i in range(1, 300):
            an = -i * (i - sa)
            b = b + 2
            d = an * d + b
            d = 1 / mx.where(mx.abs(d) < tiny, tiny, d)
            c = b + an / c
            c = mx.where(mx.abs(c) < tiny, tiny, c)
            h = h * d * c
            _checkpoint(i, b, c, d, h)
        q_fraction = front * h
        use_fraction = (sx > 1.1) & (sx >= sa)
        p = mx.where(use_fraction, 1 - q_fraction, p_series)
        q = mx.where(use_fraction, q_fraction, 1 - p_series)
        spread = mx.abs(x32 - a32) / a32  # torch's tests, in float32
        asymptotic = ok & (((a32 > 20) & (a32 < 200) & (spread < 0.3))
                           | ((a32 > 200) & (spread < 4.5 / mx.sqrt(a32))))
        large = mx.where(asymptotic, a32, 100.0)
        near = mx.where(asymptotic, x32, 100.0)
        p = mx.where(asymptotic, _igamma_asymptotic(large, near, True), p)
        q = mx.where(asymptotic, _igamma_asymptotic(large, near, False), q)
        # torch's boundary values, in its order of tests (last here, so they win)
        nan = mx.array(math.nan, mx.float64)
        unordered = mx.isnan(a) | mx.isnan(x)  # reaches the computation
        p, q = mx.where(unordered, nan, p), mx.where(unordered, nan, q)
        p = mx.where(mx.isinf(x), 1.0, p)
        q = mx.where(mx.isinf(x), 0.0, q)
        p = mx.where(mx.isinf(a), mx.where(mx.isinf(x), nan, 0.0), p)
        q = mx.where(mx.isinf(a), mx.where(mx.isinf(x), nan, 1.0), q)
        p = mx.where(x == 0, 0.0, p)
        q = mx.where(x == 0, 1.0, q)
        p = mx.where(a == 0, mx.where(x > 0, 1.0, nan), p)
        q = mx.where(a == 0, mx.where(x > 0, 0.0, nan), q)
        negative = (a < 0) | (x < 0)
        return mx.where(negative, nan, p), mx.where(negative, nan, q)


@lowering("igamma", promote=PROMOTE.INT_TO_FLOAT)
def igamma(self, other):
    with mx.stream(mx.cpu):
        return _igamma_pq(self, other)[0].astype(self.dtype)


@lowering("igammac", promote=PROMOTE.INT_TO_FLOAT)
def igammac(self, other):
    with mx.stream(mx.cpu):
        return _igamma_pq(self, other)[1].astype(self.dtype)

def _trigamma(x):
    """psi'(x) = psi'(x + 6) + sum 1 / (x + k)^2, then 1/z + 1/(2z^2) + sum B2k / z^(2k+1);
    below 1/2 the reflection psi'(x) = pi^2 / sin^2(pi x) - psi'(1 - x), with sin(pi x) computed
    as torch does (so poles give large finite values where pi x rounds)."""
    reflect = x < 0.5
    z = mx.where(reflect, 1 - x, x)
    acc = mx.zeros_like(x)
    for _ in range(6):
        acc = acc + 1 / (z * z)
        z = z + 1
    izz = 1 / (z * z)
    acc = acc + (1 + 1 / (2 * z) + izz * (1 / 6 - izz * (1 / 30 - izz * (1 / 42)))) / z
    sin = mx.sin(mx.array(math.pi, x.dtype) * x)
    return mx.where(reflect, (math.pi * math.pi) / (sin * sin) - acc, acc)


# Euler-Maclaurin for the Hurwitz zeta function: B2j / (2j)! for j = 1..7
_EM_COEFFS = [1 / 12, -1 / 720, 1 / 30240, -1 / 1209600, 1 / 47900160,
              -691 / 1307674368000, 1 / 74724249600]


def _hurwitz(x, q):
    """sum_k (q + k)^-x for q > 0: ten terms summed directly, the tail by Euler-Maclaurin."""
    s = mx.zeros(mx.broadcast_shapes(x.shape, q.shape), x.dtype)
    a = q
    for _ in range(10):
        s = s + mx.power(a, -x)
        a = a + 1
    s = s + mx.power(a, 1 - x) / (x - 1) + 0.5 * mx.power(a, -x)
    rising = x  # x (x+1) ... (x+2j-2): inf for large finite x (> ~900), where a^-x is 0
    apow = mx.power(a, -x - 1)
    vanishing = (apow == 0) & mx.isfinite(x)  # (x = inf keeps torch's NaN)
    for j, c in enumerate(_EM_COEFFS):
        s = s + mx.where(vanishing, 0, c * rising * apow)
        rising = rising * (x + 2 * j + 1) * (x + 2 * j + 2)
        apow = apow / (a * a)
    return s


def _zeta_sum(x, q):
    """Hurwitz zeta(x, q) for finite x > 1 and q not a nonpositive integer, in x's dtype. For
    q < 0 (x an integer), with q = f - m, 0 < f < 1, g = 1 - f:
    zeta(x, q) = zeta(x, f) + sum_(i=1..m) (f - i)^-x
               = f^-x + (-g)^-x + zeta(x, f + 1) + (-1)^x (zeta(x, g + 1) - zeta(x, m + g)),
    the two terms nearest the pole added first. For odd x they nearly cancel near the
    half-integers (each ~2^x, their difference near 0): there f^-x - g^-x is formed as
    g^-x expm1(x log1p((g - f) / f)), g - f exact (Sterbenz) for 1/4 <= f <= 3/4, which keeps
    the dtype's relative accuracy."""
    floor_q = mx.floor(q)
    f = q - floor_q
    g = (floor_q + 1) - q  # 1 - f, exact where f is near 1 (q just below an integer)
    f_safe, g_safe = mx.where(f == 0, 0.5, f), mx.where(f == 0, 0.5, g)
    positive = _hurwitz(x, mx.where(q > 0, q, 1))
    sign = mx.where(mx.remainder(x, 2) == 0, 1, -1)
    m = mx.maximum(-floor_q, 1)
    pair = mx.power(f_safe, -x) + sign * mx.power(g_safe, -x)
    # (where a power overflows the direct form's inf - inf is NaN, as the CPU's sum gives)
    middle = (sign < 0) & (f_safe >= 0.25) & (f_safe <= 0.75) & mx.isfinite(pair)
    f_mid = mx.where(middle, f_safe, 0.5)
    g_mid = mx.where(middle, g_safe, 0.5)
    difference = mx.power(g_mid, -x) * mx.expm1(x * mx.log1p((g_mid - f_mid) / f_mid))
    pair = mx.where(middle, difference, pair)
    negative = pair + _hurwitz(x, f_safe + 1) \
        + sign * (_hurwitz(x, g_safe + 1) - _hurwitz(x, m + g_safe))
    return mx.where(q < 0, negative, positive)


def _zeta(x, q):
    """Hurwitz zeta(x, q) as torch's CPU kernel (aten/src/ATen/native/Math.h, zeta) computes
    it: its sum runs in acc_type (float64 for float32, float32 for half types) from a first
    term q^-x that std::pow(float, float) rounds to float32, and is rounded once at the end.
    So for float32 the sum here is float64 on MLX's CPU stream (bounded work, _zeta_sum) with
    that first term's float32 rounding put back: near q's poles in (-1, 0) the first term is
    ~2^x and its rounding is the CPU's whole error (polygamma(4, -0.49911): the CPU 10.243277,
    float64 10.243232). Poles and domain as torch: x == 1 -> inf, x < 1 -> NaN, q a nonpositive
    integer -> inf, q <= 0 with x not an integer -> NaN, q = +inf -> NaN."""
    dtype = x.dtype
    acc = mx.float64 if dtype == mx.float32 else mx.float32
    with mx.stream(mx.cpu):
        x_acc, q_acc = x.astype(acc), q.astype(acc)
        if dtype == mx.float32:
            first = mx.power(q, -x)  # float32, as the CPU's first term
            rest = _zeta_sum(x_acc, q_acc) - mx.power(q_acc, -x_acc)
            out = mx.where(mx.isinf(first), first, first.astype(acc) + rest)
        else:
            out = _zeta_sum(x_acc, q_acc)
        # Every term 0 (underflowed): the CPU's Euler-Maclaurin loop, which returns once a
        # correction is small against the sum, runs to its end and its rising factorial
        # x (x+1) ... (x+22) overflows for large x (float64: x > ~2.5e13): inf * 0 = NaN
        rising = x_acc
        for k in range(1, 23):
            rising = rising * (x_acc + k)
        out = mx.where((out == 0) & mx.isinf(rising), math.nan, out).astype(dtype)
    out = mx.where(mx.isnan(x) | mx.isnan(q) | mx.isposinf(q), math.nan, out)
    # torch's tests, applied from its last to its first: x == 1, x < 1, then for q <= 0 an
    # integer q (inf, also for a NaN or non-integer x) before a non-integer x (NaN)
    nonpositive = q <= 0
    out = mx.where(nonpositive & (x != mx.floor(x)), math.nan, out)
    out = mx.where(nonpositive & (q == mx.floor(q)), math.inf, out)
    return mx.where(x == 1, math.inf, mx.where(x < 1, math.nan, out))


lowering("special_zeta", "special_zeta.self_scalar", "special_zeta.other_scalar",
         promote=PROMOTE.INT_TO_FLOAT)(
    lambda self, other: _zeta(*mx.broadcast_arrays(_as_array(self, other), _as_array(other, self))))


_LIBM = None


def _libm():
    """The platform's C math library, whose float functions torch's scalar CPU kernels call."""
    global _LIBM
    if _LIBM is None:
        import ctypes
        import ctypes.util
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        for fn in ("lgammaf", "expf"):
            getattr(libm, fn).restype = ctypes.c_float
            getattr(libm, fn).argtypes = [ctypes.c_float]
        _LIBM = libm
    return _LIBM


def _factorial_float32(n: int) -> float:
    """n! as torch's float32 polygamma computes it, expf(lgammaf(float(n) + 1)): the C library's
    own rounding (its lgammaf is not correctly rounded, and exp magnifies an ulp of lgamma(21)
    to 2e-6 of 20!), inf from n = 35 on. Constant time in n (math.factorial is not: n = 1e5
    took 0.3 s, and its exact value overflowed MLX's scalars from n = 30)."""
    libm = _libm()
    return libm.expf(libm.lgammaf(float(n) + 1))  # rounded to float32 as ctypes passes it


@lowering("polygamma", promote=PROMOTE.INT_TO_FLOAT)
def polygamma(n, self):
    if n == 0:
        return _digamma(self)
    if n == 1:
        return _trigamma(self)
    # psi^(n)(x) = (-1)^(n+1) n! zeta(n + 1, x), each factor in float32 as torch's kernel
    order = mx.full(self.shape, n + 1, self.dtype)
    factor = mx.array((1 if n % 2 else -1) * _factorial_float32(n), self.dtype)
    return factor * _zeta(order, self)


def _bessel_i(x, nu, scaled):
    """I_nu(x) (nu = 0, 1), or e^-|x| I_nu(x) when ``scaled``: the power series
    (|x|/2)^nu sum_k (x^2/4)^k / (k! (k+nu)!) below |x| = 15, above it the asymptotic expansion
    e^|x| / sqrt(2 pi |x|) sum_k prod_(j<=k) -(4 nu^2 - (2j-1)^2) / (8 j |x|)."""
    a = mx.abs(x)
    y = a * a / 4
    term = mx.ones_like(a) if nu == 0 else a / 2
    series = term
    for k in range(1, 30):
        term = term * y / (k * (k + nu))
        series = series + term
    big = mx.maximum(a, 15)
    term = mx.ones_like(a)
    asymptotic = term
    for k in range(1, 12):
        term = term * -(4 * nu * nu - (2 * k - 1) ** 2) / (8 * k * big)
        asymptotic = asymptotic + term
    if scaled:
        series = series * _exp(-a)
        asymptotic = asymptotic / (math.sqrt(2 * math.pi) * mx.sqrt(big))
    else:  # inf where e^|x| overflows, as torch's exp(x) * (...) form gives
        asymptotic = _exp(big) * (asymptotic / (math.sqrt(2 * math.pi) * mx.sqrt(big)))
    out = mx.where(a < 15, series, asymptotic)
    out = out if nu == 0 else mx.where(x < 0, -out, out)
    return _where_nan(x, mx.where(mx.isinf(x), _bessel_limit(x, nu, scaled), out))


def _bessel_limit(x, nu, scaled):
    # torch: 0 for the scaled functions, NaN (e^inf times 0) for I0 and I1
    return mx.zeros_like(x) if scaled else mx.full(x.shape, math.nan, x.dtype)


lowering("i0", promote=PROMOTE.INT_TO_FLOAT)(lambda self: _bessel_i(self, 0, False))
lowering("special_i0e", promote=PROMOTE.INT_TO_FLOAT)(lambda self: _bessel_i(self, 0, True))
lowering("special_i1e", promote=PROMOTE.INT_TO_FLOAT)(lambda self: _bessel_i(self, 1, True))


# I1 as torch's CPU kernels compute it (aten/src/ATen/native/Math.h, Cephes): Chebyshev series
# of e^-x I1(x) / x on [0, 8] and of e^-x sqrt(x) I1(x) on (8, inf), summed by Clenshaw's
# recurrence b0 = y b1 - b2 + c in float32, y b1 - b2 fused (the compiler contracts it into a
# multiply-add). mlx's power series differed from them by 1.4e-6 relative near x = 7.7 (over
# float32's rtol; both within 5e-4 of float64). calc_i1 (special.i1) has float32 tables of 17
# and 7 coefficients, modified_bessel_i1_forward the 29 and 25 of float64, rounded to float32.
_I1_A = [
    2.77791411276104639959E-18, -2.11142121435816608115E-17, 1.55363195773620046921E-16,
    -1.10559694773538630805E-15, 7.60068429473540693410E-15, -5.04218550472791168711E-14,
    3.22379336594557470981E-13, -1.98397439776494371520E-12, 1.17361862988909016308E-11,
    -6.66348972350202774223E-11, 3.62559028155211703701E-10, -1.88724975172282928790E-9,
    9.38153738649577178388E-9, -4.44505912879632808065E-8, 2.00329475355213526229E-7,
    -8.56872026469545474066E-7, 3.47025130813767847674E-6, -1.32731636560394358279E-5,
    4.78156510755005422638E-5, -1.61760815825896745588E-4, 5.12285956168575772895E-4,
    -1.51357245063125314899E-3, 4.15642294431288815669E-3, -1.05640848946261981558E-2,
    2.47264490306265168283E-2, -5.29459812080949914269E-2, 1.02643658689847095384E-1,
    -1.76416518357834055153E-1, 2.52587186443633654823E-1]
_I1_B = [
    7.51729631084210481353E-18, 4.41434832307170791151E-18, -4.65030536848935832153E-17,
    -3.20952592199342395980E-17, 2.96262899764595013876E-16, 3.30820231092092828324E-16,
    -1.88035477551078244854E-15, -3.81440307243700780478E-15, 1.04202769841288027642E-14,
    4.27244001671195135429E-14, -2.10154184277266431302E-14, -4.08355111109219731823E-13,
    -7.19855177624590851209E-13, 2.03562854414708950722E-12, 1.41258074366137813316E-11,
    3.25260358301548823856E-11, -1.89749581235054123450E-11, -5.58974346219658380687E-10,
    -3.83538038596423702205E-9, -2.63146884688951950684E-8, -2.51223623787020892529E-7,
    -3.88256480887769039346E-6, -1.10588938762623716291E-4, -9.76109749136146840777E-3,
    7.78576235018280120474E-1]


def _chbevl_float32(y, coeffs):
    """Cephes' chbevl in float32 with y * b1 - b2 fused: the product is exact in float64 and so
    is the difference's one rounding to float32 (MLX's CPU stream holds float64)."""
    b0, b1, b2 = mx.full(y.shape, coeffs[0], mx.float32), mx.zeros_like(y), mx.zeros_like(y)
    with mx.stream(mx.cpu):
        y64 = y.astype(mx.float64)
        for c in coeffs[1:]:
            b2, b1 = b1, b0
            fused = (y64 * b1.astype(mx.float64) - b2.astype(mx.float64)).astype(mx.float32)
            b0 = fused + mx.array(c, mx.float32)
    return 0.5 * (b0 - b2)


def _i1_chebyshev(x, small_table, large_table, small_form):
    dtype = x.dtype
    x = x.astype(mx.float32)
    a = mx.abs(x)
    small, large = mx.minimum(a, 8.0), mx.maximum(a, 8.0)  # NaN takes the large branch
    series = _chbevl_float32(small / 2 - 2, small_table)
    low = (_exp(small) * small) * series if small_form == "exp_x_cheb" \
        else (series * small) * _exp(small)
    high = (_exp(large) * _chbevl_float32(32 / large - 2, large_table)) / mx.sqrt(large)
    out = mx.where(a <= 8, low, high)
    return mx.where(x < 0, -out, out).astype(dtype)


lowering("special_i1", promote=PROMOTE.INT_TO_FLOAT)(
    lambda self: _i1_chebyshev(self, _I1_A[12:], _I1_B[18:], "exp_x_cheb"))


# Orthogonal polynomials of integer degree n, as torch's CPU kernels (aten/src/ATen/native/Math.h,
# *_polynomial_*_forward) evaluate them: n is converted to int64 (truncated; NaN, infinities and
# values past int64 give INT64_MIN), n < 0 gives 0, then each kernel's closed forms (the ends of
# the interval, the trigonometric forms of the Chebyshev kinds, Hermite's NaN past degree 128)
# and elsewhere its float32 recurrence, stopped when the value becomes NaN. The closed forms are
# MLX ops; the recurrences run step for step as torch's (fused multiply-adds included) in one
# CPU node per op (csrc/polynomial_cpu.cpp): their memory is the tensor's size whatever n is, and
# they take the CPU kernel's time, which grows with n where the CPU's does (Laguerre, Legendre
# inside [-1, 1], Chebyshev until the value overflows).

_INT64_LIMIT = 2.0 ** 63


def _degree(n):
    """torch's int64 conversion of n, as a float32 integer: -1 where it gives INT64_MIN."""
    if not _is_float(n):
        n = n.astype(mx.float32)
    return mx.where(mx.abs(n) < _INT64_LIMIT, mx.trunc(n), -1)  # NaN compares false


def _parity(d):
    return mx.where(mx.remainder(d, 2) == 0, 1, -1)


def _recurrence(kind, x, first, d, needed):
    """torch's recurrence P_d (P_0 = 1, P_1 = first) where ``needed``, 1 elsewhere."""
    with mx.stream(mx.cpu):
        steps = mx.where(needed & (d >= 0), d, 0).astype(mx.float32)
        x, first = (mx.broadcast_to(a, d.shape).astype(mx.float32) for a in (x, first))
        return _C.polynomial_recurrence(kind, x, first, steps)


def _polynomial(name, fn):
    """A lowering for the Tensor-Tensor, Scalar-Tensor and Tensor-Scalar overloads. On MLX's
    CPU stream on every device: the trigonometric forms multiply the argument's rounding by n,
    so another libm's acos and cos (CUDA's on the H100) differ from the CPU's by 4e-3 at
    n = 1e4, and the recurrences run there anyway."""
    def lowered(x, n):
        with mx.stream(mx.cpu):
            x, n = _as_array(x, n), _as_array(n, x)
            x, d = mx.broadcast_arrays(x, _degree(n))
            return mx.where(d < 0, 0, fn(x, d)).astype(x.dtype)
    lowering(f"special_{name}", f"special_{name}.x_scalar", f"special_{name}.n_scalar",
             promote=PROMOTE.INT_TO_FLOAT)(lowered)


# degree above which torch uses the trigonometric form inside (-1, 1)
_TRIG_FROM = {False: {"t": 6, "u": 8, "v": 8, "w": 8}, True: {"t": 6, "u": 6, "v": 6, "w": 4}}


def _chebyshev(kind, shifted):
    """Chebyshev polynomials T, U, V, W of t = x (or t = 2x - 1, shifted): P_1 = T: t, U: 2t,
    V: 2t - 1, W: 2t + 1, then t + t times the last minus the one before. For |t| < 1 and
    large n torch uses the trigonometric forms, a = acos(t): T = cos(n a),
    U = sin((n + 1) a) / sin a, V = cos((n + 1/2) a) / cos(a / 2),
    W = sin((n + 1/2) a) / sin(a / 2), with its fallbacks where the divisor's sine or cosine
    rounds to 0 or 1; at the ends (x = +-1; shifted: x = 1 and x = 0) its exact values."""
    def fn(x, d):
        t = x + x - 1 if shifted else x
        first = {"t": t, "u": t + t, "v": t + t - 1, "w": t + t + 1}[kind]
        a = mx.arccos(t)
        if kind == "t":
            trig = mx.cos(d * a)
        elif kind == "u":
            sin_a = mx.sin(a)
            trig = mx.where(sin_a != 0, mx.sin((d + 1) * a) / sin_a,
                            (d + 1) * mx.cos((d + 1) * a) / t)
        elif kind == "v":
            trig = mx.where(mx.sin(a / 2) != 1, mx.cos((d + 0.5) * a) / mx.cos(a / 2),
                            _parity(d) * (d + d + 1))
        else:
            fallback = _parity(d) if shifted else mx.where(x > 0, d + d + 1, _parity(d))
            trig = mx.where(mx.cos(a / 2) != 1, mx.sin((d + 0.5) * a) / mx.sin(a / 2), fallback)
        use_trig = (d > _TRIG_FROM[shifted][kind]) & (mx.abs(t) < 1)
        if shifted:  # the ends x = 1 (t = 1) and x = 0 (t = -1); other x rounding to t = -1
            at_end = (x == 1) | (x == 0)  # recur, as torch's kernel does
        else:
            at_end = mx.abs(x) == 1
        one = {"t": mx.ones_like(t), "u": d + 1, "v": mx.ones_like(t), "w": d + d + 1}[kind]
        minus_one = {"t": _parity(d), "u": _parity(d) * (d + 1),
                     "v": _parity(d) * (d + d + 1), "w": _parity(d)}[kind]
        end = mx.where(t > 0, one, minus_one)
        recur = _recurrence("chebyshev", t, first, d, ~at_end & ~use_trig)
        return mx.where(at_end, end, mx.where(use_trig, trig, recur))
    return fn


for _kind in "tuvw":
    _polynomial(f"chebyshev_polynomial_{_kind}", _chebyshev(_kind, shifted=False))
    _polynomial(f"shifted_chebyshev_polynomial_{_kind}", _chebyshev(_kind, shifted=True))

_HERMITE_LIMIT = 128  # torch's float32 kernels return NaN past this degree


def _hermite(kind):
    def fn(x, d):
        recur = _recurrence(kind, x, x + x if kind == "hermite_h" else x, d, d <= _HERMITE_LIMIT)
        return mx.where(d > _HERMITE_LIMIT, math.nan, recur)
    return fn


_polynomial("hermite_polynomial_h", _hermite("hermite_h"))
_polynomial("hermite_polynomial_he", _hermite("hermite_he"))
_polynomial("laguerre_polynomial_l", lambda x, d: mx.where(  # L_n(0) = 1, also for -0.0
    x == 0, 1, _recurrence("laguerre", x, 1 - x, d, x != 0)))
_polynomial("legendre_polynomial_p", lambda x, d: mx.where(
    mx.abs(x) == 1, mx.where(x > 0, 1, _parity(d)),
    _recurrence("legendre", x, x, d, mx.abs(x) != 1)))


lowering("special_modified_bessel_i0", promote=PROMOTE.INT_TO_FLOAT)(
    lambda self: _bessel_i(self, 0, False))
lowering("special_modified_bessel_i1", promote=PROMOTE.INT_TO_FLOAT)(
    lambda self: _i1_chebyshev(self, _I1_A, _I1_B, "cheb_x_exp"))

# sin(x)/x = sum_k (-1)^k x^(2k) / (2k+1)!, by its series below |x| = 1/2 (as torch)
_SINC_SERIES = [(-1) ** k / math.factorial(2 * k + 1) for k in range(7)]


def _airy_asymptotic_terms(count):
    """u_k of the Airy asymptotic series: u_0 = 1, u_k = (6k-5)(6k-3)(6k-1) / ((2k-1) 216 k)
    u_(k-1)."""
    u = [1.0]
    for k in range(1, count):
        u.append(u[-1] * (6 * k - 5) * (6 * k - 3) * (6 * k - 1) / ((2 * k - 1) * 216 * k))
    return u


_AIRY_U = _airy_asymptotic_terms(16)


@lowering("special_airy_ai", promote=PROMOTE.INT_TO_FLOAT)
def special_airy_ai(self):
    """Ai(x) in float64 on MLX's CPU stream: the Maclaurin series Ai = c1 f - c2 g for
    -8 <= x <= 5 (100 terms), the asymptotic expansions in zeta = 2/3 |x|^(3/2) beyond (decaying
    for x > 5, oscillating for x < -8); NaN for NaN and, as torch's kernel gives, for +-inf."""
    with mx.stream(mx.cpu):
        x = self.astype(mx.float64)
        c1, c2 = 0.355028053887817239, 0.258819403792806798  # Ai(0), -Ai'(0)
        xs = mx.clip(x, -8.0, 5.0)
        x3 = xs * xs * xs
        f_term, g_term = mx.ones_like(xs), xs
        f, g = f_term, g_term
        for k in range(1, 100):
            f_term = f_term * x3 / ((3 * k - 1) * (3 * k))
            g_term = g_term * x3 / ((3 * k) * (3 * k + 1))
            f, g = f + f_term, g + g_term
        series = c1 * f - c2 * g
        ax = mx.maximum(mx.abs(x), 5.0)
        zeta = 2.0 / 3.0 * ax * mx.sqrt(ax)
        iz = 1 / zeta
        decay = mx.zeros_like(x)
        even, odd = mx.zeros_like(x), mx.zeros_like(x)
        for k in reversed(range(len(_AIRY_U))):  # Horner in 1 / zeta
            decay = decay * (-iz) + _AIRY_U[k]
        for k in reversed(range(len(_AIRY_U) // 2)):
            even = even * (-iz * iz) + _AIRY_U[2 * k]
            odd = odd * (-iz * iz) + _AIRY_U[2 * k + 1]
        odd = odd * iz
        root = mx.sqrt(math.pi) * mx.power(ax, 0.25)
        positive = mx.exp(-zeta) / (2 * root) * decay
        # the phase zeta + pi/4 as torch's float32 kernel rounds it, -2x sqrt(-x) / 3 + pi/4 in
        # float32: its ulp is 0.06 at x = -13438 (zeta = 1e6), so the CPU's values there
        # follow its rounding, not the exact phase
        x32 = mx.minimum(self.astype(mx.float32), -8.0)
        quarter_pi = mx.array(math.pi, mx.float32) * 0.25
        phase = ((-2 * x32 * mx.sqrt(-x32)) / 3 + quarter_pi).astype(mx.float64)
        negative = (mx.sin(phase) * even - mx.cos(phase) * odd) / root
        out = mx.where(x > 5, positive, mx.where(x < -8, negative, series))
        out = mx.where(mx.isinf(x), math.nan, out)
        return mx.where(mx.isnan(x), x, out).astype(self.dtype)

@lowering("special_spherical_bessel_j0", promote=PROMOTE.INT_TO_FLOAT)
def special_spherical_bessel_j0(self):
    x2 = self * self
    series = _SINC_SERIES[-1]
    for c in reversed(_SINC_SERIES[:-1]):
        series = series * x2 + c
    out = mx.where(mx.abs(self) < 0.5, series, mx.sin(self) / self)
    return mx.where(mx.isinf(self), 0, out)


# Modified Bessel functions of the second kind, K0 and K1 (and e^x K). Below x = 1/2 their
# series (in terms of I_nu, log(x/2) and harmonic numbers); above, the integral
# e^x K_nu(x) = int_0^inf e^(-u^2) (1 + u^2/x)^nu 2 / sqrt(2x + u^2) du (from
# K_nu(x) = int_0^inf e^(-x cosh t) cosh(nu t) dt with u = sqrt(2x) sinh(t/2)), whose smooth
# integrand the trapezoidal rule sums to float32 precision with 21 nodes of width 1/4.
_K_STEP = 0.25
_K_NODES = [(j * _K_STEP, (0.5 if j == 0 else 1.0) * _K_STEP * math.exp(-(j * _K_STEP) ** 2))
            for j in range(21)]


def _bessel_k_scaled_integral(x, nu):
    total = mx.zeros_like(x)
    for u, weight in _K_NODES:
        term = (2 * weight) * mx.rsqrt(2 * x + u * u)
        total = total + (term * (1 + (u * u) / x) if nu == 1 else term)
    return total


def _bessel_k_series(x, nu):
    """K_0(x) = -(log(x/2) + gamma) I_0(x) + sum_k (x^2/4)^k / (k!)^2 H_k;
    K_1(x) = 1/x + log(x/2) I_1(x) - (x/4) sum_k (x^2/4)^k / (k! (k+1)!) (psi(k+1) + psi(k+2)),
    psi(m) = -gamma + H_(m-1). Ten terms for x < 1/2."""
    y = x * x / 4
    log_half = mx.log(x / 2)
    term = mx.ones_like(x)
    total = mx.zeros_like(x)
    harmonic = 0.0
    for k in range(10):
        if k:
            term = term * y / (k * (k + nu))
        if nu == 0:
            total = total + term * harmonic
        else:
            total = total + term * (2 * harmonic + 1 / (k + 1) - 2 * 0.5772156649015329)
        harmonic += 1 / (k + 1)
    if nu == 0:
        return -(log_half + 0.5772156649015329) * _bessel_i(x, 0, False) + total
    return 1 / x + log_half * _bessel_i(x, 1, False) - (x / 4) * total


def _bessel_k(x, nu, scaled):
    small = mx.minimum(x, 0.5)
    large = mx.maximum(x, 0.5)
    series = _bessel_k_series(mx.where(x > 0, small, 0.5), nu)
    integral = _bessel_k_scaled_integral(large, nu)
    if scaled:
        series = series * _exp(small)
    else:
        integral = integral * _exp(-large)
    out = mx.where(x < 0.5, series, integral)
    out = mx.where(x == 0, math.inf, mx.where(x < 0, math.nan, out))
    return _where_nan(x, mx.where(mx.isposinf(x), 0, out))


lowering("special_modified_bessel_k0", promote=PROMOTE.INT_TO_FLOAT)(
    lambda self: _bessel_k(self, 0, False))
lowering("special_modified_bessel_k1", promote=PROMOTE.INT_TO_FLOAT)(
    lambda self: _bessel_k(self, 1, False))
lowering("special_scaled_modified_bessel_k0", promote=PROMOTE.INT_TO_FLOAT)(
    lambda self: _bessel_k(self, 0, True))
lowering("special_scaled_modified_bessel_k1", promote=PROMOTE.INT_TO_FLOAT)(
    lambda self: _bessel_k(self, 1, True))


# Bessel functions of the first kind J0, J1. Up to |x| = 25 the integral
# J_n(x) = (1/2pi) int_0^2pi cos(n t - x sin t) dt by the trapezoidal rule on 64 points (exact
# for a periodic integrand up to J_64(25) ~ 1e-19, i.e. to rounding); above, Hankel's
# expansion sqrt(2/(pi x)) (P cos(x - phase) - Q sin(x - phase)), with cos(x - phase) formed
# from cos x and sin x (exact arguments) rather than from the rounded x - phase.
_J_POINTS = 64
_J_NODES = [(2 * math.pi * j / _J_POINTS, 0.5 if j in (0, _J_POINTS // 2) else 1.0)
            for j in range(_J_POINTS // 2 + 1)]


def _bessel_j_integral(x, nu):
    total = mx.zeros_like(x)
    for t, weight in _J_NODES:
        phase = x * math.sin(t)
        term = mx.cos(phase) if nu == 0 else \
            math.cos(t) * mx.cos(phase) + math.sin(t) * mx.sin(phase)
        total = total + weight * term
    return total * (2 / _J_POINTS)


def _hankel_pq(x, nu, terms=10):
    """P and Q of Hankel's expansion: a_k = prod_(j<=k) (4 nu^2 - (2j-1)^2) / (8 j), P the
    alternating sum of a_2k / x^2k, Q of a_(2k+1) / x^(2k+1)."""
    p, q = mx.ones_like(x), mx.zeros_like(x)
    a = mx.ones_like(x)
    for k in range(1, 2 * terms):
        a = a * (4 * nu * nu - (2 * k - 1) ** 2) / (8 * k * x)
        sign = 1 if (k // 2) % 2 == 0 else -1
        if k % 2:
            q = q + sign * a
        else:
            p = p + sign * a
    return p, q


def _bessel_j(x, nu):
    a = mx.abs(x)
    big = mx.maximum(a, 25)
    p, q = _hankel_pq(big, nu)
    c, s = mx.cos(big), mx.sin(big)
    # x - pi/4 (nu = 0) and x - 3pi/4 (nu = 1)
    cos_phase = (c + s) / math.sqrt(2) if nu == 0 else (s - c) / math.sqrt(2)
    sin_phase = (s - c) / math.sqrt(2) if nu == 0 else -(s + c) / math.sqrt(2)
    hankel = mx.sqrt(2 / (math.pi * big)) * (p * cos_phase - q * sin_phase)
    out = mx.where(a <= 25, _bessel_j_integral(mx.minimum(a, 25), nu), hankel)
    if nu == 1:
        out = mx.where(x < 0, -out, out)  # odd
    return mx.where(mx.isinf(x), math.nan, out)


lowering("special_bessel_j0", promote=PROMOTE.INT_TO_FLOAT)(lambda self: _bessel_j(self, 0))
lowering("special_bessel_j1", promote=PROMOTE.INT_TO_FLOAT)(lambda self: _bessel_j(self, 1))


# Bessel functions of the second kind Y0, Y1 up to x = 25, from Neumann's series
#   Y0 = (2/pi)(log(x/2) + gamma) J0 - (4/pi) sum_k (-1)^k J_2k / k,
#   Y1 = -Y0' = -(2/(pi x)) J0 + (2/pi)(log(x/2) + gamma) J1
#        + (2/pi) sum_k (-1)^k (J_(2k-1) - J_(2k+1)) / k,
# where every J_m is the same trapezoidal sum (1/M) sum_j cos(m t_j - x sin t_j) over 256
# points: each series is one fixed combination of cos(x sin t_j) and sin(x sin t_j) (weights
# computed here in double). Above 25, Hankel's expansion.
_Y_POINTS = 256
_Y_TERMS = 60


def _y_weights():
    nodes = []
    for j in range(_Y_POINTS // 2 + 1):
        t = 2 * math.pi * j / _Y_POINTS
        w = (1.0 if j in (0, _Y_POINTS // 2) else 2.0) / _Y_POINTS
        y0c = y0s = y1c = y1s = 0.0
        for k in range(1, _Y_TERMS + 1):
            sign = (-1) ** k / k
            y0c += sign * math.cos(2 * k * t)
            y0s += sign * math.sin(2 * k * t)
            y1c += sign * (math.cos((2 * k - 1) * t) - math.cos((2 * k + 1) * t))
            y1s += sign * (math.sin((2 * k - 1) * t) - math.sin((2 * k + 1) * t))
        nodes.append((math.sin(t), w, w * math.cos(t), w * math.sin(t),
                      w * y0c, w * y0s, w * y1c, w * y1s))
    return nodes


_Y_NODES = _y_weights()


def _bessel_y_neumann(x, nu):
    j0 = j1 = series = mx.zeros_like(x)
    for s, w, w_cos, w_sin, y0c, y0s, y1c, y1s in _Y_NODES:
        c, sn = mx.cos(x * s), mx.sin(x * s)
        j0 = j0 + w * c
        if nu == 0:
            series = series + (y0c * c + y0s * sn)
        else:
            j1 = j1 + (w_cos * c + w_sin * sn)
            series = series + (y1c * c + y1s * sn)
    log_term = (2 / math.pi) * (mx.log(x / 2) + 0.5772156649015329)
    if nu == 0:
        return log_term * j0 - (4 / math.pi) * series
    return -(2 / math.pi) * j0 / x + log_term * j1 + (2 / math.pi) * series


def _bessel_y(x, nu):
    big = mx.maximum(x, 25)
    p, q = _hankel_pq(big, nu)
    c, s = mx.cos(big), mx.sin(big)
    cos_phase = (c + s) / math.sqrt(2) if nu == 0 else (s - c) / math.sqrt(2)
    sin_phase = (s - c) / math.sqrt(2) if nu == 0 else -(s + c) / math.sqrt(2)
    hankel = mx.sqrt(2 / (math.pi * big)) * (p * sin_phase + q * cos_phase)
    small = mx.clip(x, 1e-38, 25)
    out = mx.where(x <= 25, _bessel_y_neumann(small, nu), hankel)
    out = mx.where(x == 0, -math.inf, mx.where(x < 0, math.nan, out))
    return mx.where(mx.isinf(x), math.nan, out)


lowering("special_bessel_y0", promote=PROMOTE.INT_TO_FLOAT)(lambda self: _bessel_y(self, 0))
lowering("special_bessel_y1", promote=PROMOTE.INT_TO_FLOAT)(lambda self: _bessel_y(self, 1))


def _log_ndtr(x):
    # log Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2: below -1 as -t^2 + log(erfcx(t) / 2) with
    # t = -x / sqrt 2 (no underflow), above as log1p(-erfc(x / sqrt 2) / 2)
    t = x * (1 / math.sqrt(2))
    lower = mx.log(special_erfcx(-mx.minimum(t, 0)) / 2) - t * t
    upper = mx.log1p(-erfc(mx.maximum(t, -1)) / 2)
    return mx.where(x < -1, lower, upper)


@lowering("special_log_ndtr", promote=PROMOTE.INT_TO_FLOAT)
def special_log_ndtr(self):
    return _log_ndtr(self)


@lowering("special_ndtri", promote=PROMOTE.INT_TO_FLOAT)
def special_ndtri(self):
    """The inverse of Phi: x with Phi(x) = p, solved in the lower half (p <= 1/2, using
    ndtri(p) = -ndtri(1 - p) above) by Newton steps on log Phi(x) = log p, which keep full
    relative precision in the tail. Start: sqrt(2) erfinv(2p - 1) in the middle, the
    asymptotic inversion of Phi(x) ~ phi(x) / |x| in the tail."""
    p = mx.minimum(self, 1 - self)
    safe = mx.clip(p, 1e-45, 0.5)  # p = 0 is handled below
    t = -2 * mx.log(safe)
    tail = -mx.sqrt(t - mx.log(2 * math.pi * t))
    middle = math.sqrt(2) * mx.erfinv(2 * mx.maximum(safe, 1e-2) - 1)
    x = mx.where(safe < 1e-2, tail, middle)
    log_p = mx.log(safe)
    for _ in range(4):
        z = -x * (1 / math.sqrt(2))  # >= 0 in the lower half
        phi_ratio = special_erfcx(mx.maximum(z, 0)) * math.sqrt(math.pi / 2)  # Phi / phi
        x = mx.minimum(x - (_log_ndtr(x) - log_p) * phi_ratio, 0)
    x = mx.where(self > 0.5, -x, x)
    x = mx.where(self == 0, -math.inf, mx.where(self == 1, math.inf, x))
    return mx.where((self < 0) | (self > 1) | mx.isnan(self), math.nan, x)


@lowering("angle", promote=PROMOTE.INT_TO_FLOAT)
def angle(self):
    if self.dtype == mx.complex64:
        return mx.arctan2(mx.imag(self), mx.real(self))
    return _where_nan(self, mx.where(self < 0, math.pi, 0).astype(self.dtype))



def _make_complex(real, imag):
    """complex64 from its parts, bit for bit (a real + 1j * imag product would turn an
    infinite part into NaN): the parts interleaved in float32 and viewed as complex64."""
    shape = mx.broadcast_shapes(real.shape, imag.shape)
    pair = mx.stack([mx.broadcast_to(real, shape).astype(mx.float32),
                     mx.broadcast_to(imag, shape).astype(mx.float32)], axis=-1)
    return mx.reshape(mx.view(pair, mx.complex64), shape)


@lowering("complex")
def complex_(real, imag):
    return _make_complex(real, imag)


@lowering("polar")
def polar(abs, angle):
    return _make_complex(abs * mx.cos(angle), abs * mx.sin(angle))

@lowering("_conj_physical")
def _conj_physical(self):
    return mx.conj(self) if self.dtype == mx.complex64 else mx.array(self)


# conj_physical itself is CompositeImplicitAutograd (a copy for real tensors, _conj_physical
# for complex ones); its out= and in-place forms are kernels of their own, with _conj_physical's
# arguments (torch.fft.ihfft2 / ihfftn write through conj_physical(out=)).
torch_kernel("conj_physical.out")(_registry.out_kernel(
    torch.ops.aten.conj_physical.out, torch.ops.aten._conj_physical.default, ["out"]))
torch_kernel("conj_physical_")(_registry.inplace_kernel(
    torch.ops.aten.conj_physical_.default, torch.ops.aten._conj_physical.default))

def _gcd(a, b):
    """torch's Euclid: |a|, |b| in the tensor dtype (|INT_MIN| stays negative, as in C), then
    a, b = b % a, a with C's truncated remainder until a is 0, all elements at once: in eager
    mode until every remainder is 0, in a compiled graph for the dtype's worst case
    (consecutive Fibonacci numbers). The operands are broadcast first: with every a already
    0 no step runs, and the result is b (gcd(tensor([0]), tensor(9)) is tensor([9]))."""
    a, b = mx.broadcast_arrays(mx.abs(a), mx.abs(b))
    steps = {1: 12, 2: 24, 4: 47, 8: 93}[a.dtype.size]
    for _ in range(steps):
        if not tracing() and not mx.any(a != 0).item():
            break
        nonzero = a != 0
        a, b = mx.where(nonzero, _fmod(b, mx.where(nonzero, a, 1)), a), mx.where(nonzero, a, b)
    return b


@lowering("gcd", promote=PROMOTE.DEFAULT)
def gcd(self, other):
    _require(self, "gcd_cpu", bool_=False, floats=False)
    return _gcd(self, other)


@lowering("lcm", promote=PROMOTE.DEFAULT)
def lcm(self, other):
    _require(self, "lcm_cpu", bool_=False, floats=False)
    g = _gcd(self, other)
    if self.dtype.size < 4:  # |a / g * b| is computed in int, as C++ does, then narrowed
        self, other, g = self.astype(mx.int32), other.astype(mx.int32), g.astype(mx.int32)
    return mx.where(g == 0, 0, mx.abs(mx.floor_divide(self, mx.where(g == 0, 1, g)) * other))


# ----------------------------------------------------------------------------------------------
# Comparison and logical ops (inputs compared in their common dtype; results are bool)

_COMPARISONS = {"eq": mx.equal, "ne": mx.not_equal, "lt": mx.less, "le": mx.less_equal,
                "gt": mx.greater, "ge": mx.greater_equal}
for _name, _fn in _COMPARISONS.items():
    lowering(f"{_name}.Tensor", f"{_name}.Scalar", promote=PROMOTE.DEFAULT)(
        lambda self, other, _fn=_fn: _fn(self, other))


def _truth(x):
    return x if x.dtype == mx.bool_ else x != 0


# isin: each element compared with every test element, exactly (so the same answer as torch's
# sorting path for large test sets); the elements in chunks that bound the comparison matrix.
# One lowering, where torch's decomposition made transformers' generate pay 3-4 eager ops a call
_ISIN_CHUNK = 1 << 24


@lowering("isin.Tensor_Tensor", "isin.Tensor_Scalar", "isin.Scalar_Tensor",
          promote=PROMOTE.DEFAULT)
def isin(elements, test_elements, *, assume_unique=False, invert=False):
    elements, tests = (x if isinstance(x, mx.array) else mx.array(x)
                       for x in (elements, test_elements))
    flat, tests = elements.reshape(-1), tests.reshape(-1)
    step = max(1, _ISIN_CHUNK // max(tests.size, 1))
    found = [mx.any(flat[i:i + step, None] == tests[None, :], axis=1)
             for i in range(0, max(flat.size, 1), step)] if tests.size else \
        [mx.zeros(flat.shape, mx.bool_)]
    found = (found[0] if len(found) == 1 else mx.concatenate(found)).reshape(elements.shape)
    return mx.logical_not(found) if invert else found


@torch_kernel("equal")
def equal(self, other):
    """torch.equal returns a Python bool: same shape and every element equal (NaN is not)."""
    return self.shape == other.shape and bool(torch.eq(self, other).all())


@lowering("logical_not")
def logical_not(self):
    return mx.logical_not(_truth(self))


_LOGICAL = {"logical_and": mx.logical_and, "logical_or": mx.logical_or,
            "logical_xor": mx.not_equal}
for _name, _fn in _LOGICAL.items():
    lowering(_name)(lambda self, other, _fn=_fn: _fn(_truth(self), _truth(other)))


# ----------------------------------------------------------------------------------------------
# Bitwise ops (integers and bool)

_BITWISE = {"and": (mx.bitwise_and, mx.logical_and), "or": (mx.bitwise_or, mx.logical_or),
            "xor": (mx.bitwise_xor, mx.not_equal)}


def _bitwise(name, int_fn, bool_fn):
    def bitwise(self, other):
        self, other = _as_array(self, other), _as_array(other, self)
        _require(self, f"bitwise_{name}_cpu", floats=False)
        return bool_fn(self, other) if self.dtype == mx.bool_ else int_fn(self, other)
    return bitwise


for _name, (_int_fn, _bool_fn) in _BITWISE.items():
    lowering(f"bitwise_{_name}.Tensor", f"bitwise_{_name}.Scalar",
             f"bitwise_{_name}.Scalar_Tensor", promote=PROMOTE.DEFAULT, opmath=False)(
        _bitwise(_name, _int_fn, _bool_fn))


def _bit_width(dtype) -> int:
    return dtype.size * 8


def _left_shift(a, b):
    # torch: shifting by a negative amount or by the bit width or more gives 0
    a, b = _as_array(a, b), _as_array(b, a)
    _require(a, "lshift_cpu", bool_=False, floats=False)
    out_of_range = (b < 0) | (b >= _bit_width(a.dtype))
    shifted = mx.left_shift(a, mx.where(out_of_range, 0, b).astype(a.dtype))
    return mx.where(out_of_range, mx.zeros_like(shifted), shifted)


def _right_shift(a, b):
    # torch: out-of-range shifts fill with the sign bit (arithmetic shift by width - 1)
    a, b = _as_array(a, b), _as_array(b, a)
    _require(a, "rshift_cpu", bool_=False, floats=False)
    width = _bit_width(a.dtype)
    b = mx.where((b < 0) | (b >= width), width - 1 if _is_signed(a) else width, b)
    shifted = mx.right_shift(a, mx.minimum(b, width - 1).astype(a.dtype))
    return mx.where(b >= width, mx.zeros_like(shifted), shifted)


lowering("bitwise_left_shift.Tensor", "bitwise_left_shift.Tensor_Scalar",
         "bitwise_left_shift.Scalar_Tensor", "__lshift__.Tensor", "__lshift__.Scalar",
         promote=PROMOTE.DEFAULT, opmath=False)(_left_shift)
lowering("bitwise_right_shift.Tensor", "bitwise_right_shift.Tensor_Scalar",
         "bitwise_right_shift.Scalar_Tensor", "__rshift__.Tensor", "__rshift__.Scalar",
         promote=PROMOTE.DEFAULT, opmath=False)(_right_shift)


# ----------------------------------------------------------------------------------------------
# Copies. An eager clone or _to_copy that stays on "mlx" and gives a contiguous result is one MLX
# copy or cast, launched like any op; the others run torch's composite (empty + the native copy
# through host memory, which keeps a non-contiguous input's strides and converts complex and
# conjugate views as the CPU does). Through host memory a GPU copy waits for its input and is
# done by the CPU (x.float(), x.clone(), y.contiguous() of a transposed y).


def _copies_on_device(self, dtype=None, layout=None, device=None, pin_memory=None,
                      non_blocking=False, memory_format=None):
    # _to_copy reaches this kernel for a CPU tensor going to "mlx" too (the dispatcher counts
    # the device argument)
    if self.device.type != "mlx" or (device is not None and torch.device(device).type != "mlx"):
        return False
    if layout not in (None, torch.strided) or pin_memory or self.numel() == 0:
        return False
    if self.is_complex() or self.is_conj() or self.is_neg():
        return False
    if dtype is not None and (dtype.is_complex or dtype not in _registry.TORCH_TO_MX):
        return False  # the composite raises torch_mlx's dtype error
    fmt = memory_format or torch.preserve_format
    return fmt == torch.contiguous_format or (fmt == torch.preserve_format and
                                              self.is_contiguous())


def _fresh_copy(x: mx.array) -> mx.array:
    """x's elements in a new row-contiguous buffer. A select moves bits without arithmetic, so
    every value (-0.0, NaN payloads, subnormals) is kept; mx.contiguous alone would share an
    already contiguous input's buffer, and a clone must not."""
    return mx.contiguous(mx.where(mx.array(True), x, x))


# Inside a compiled graph (tracing) a copy is the value itself: no kernel, and the graph's
# wrapper copies an output that would share an input's buffer.


@lowering("clone", eager=_copies_on_device)
def clone(self, memory_format=None):
    return mx.array(self) if tracing() else _fresh_copy(self)


@lowering("_to_copy", eager=_copies_on_device)
def to_copy(self, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
            memory_format=None):
    if dtype is None or dtype == self.dtype:
        return mx.array(self) if tracing() else _fresh_copy(self)
    cast = self.astype(dtype)  # a cast writes a new buffer
    return cast if tracing() else mx.contiguous(cast)
