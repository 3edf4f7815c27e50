"""Elementwise ops on "mlx" beyond OpInfo's samples: IEEE edge values, integer semantics that MLX
defines differently from torch, accuracy where MLX's own functions fall short, CPU dtype errors,
and in-place / out= writes into the existing storage."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import torch_mlx  # noqa: F401

INF, NAN = math.inf, math.nan
EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, 2.5, -2.5, 7.0, -7.0, 1e-30, -1e-30, 1e-45,
         3e-39, 1e30, -1e30, 3.4e38, INF, -INF, NAN, 0.1, 0.999, 1e-8, 88.5, -88.5, 49.0, 100.0]


def _same(fn, *args, exact=False):
    expected = fn(*args)
    got = fn(*[a.to("mlx") if isinstance(a, torch.Tensor) else a for a in args])
    got = tuple(g.cpu() for g in got) if isinstance(got, tuple) else got.cpu()
    if exact:
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, expected, equal_nan=True)


def _grid(values, dtype=torch.float32):
    x = torch.tensor(values, dtype=dtype)
    return x.repeat_interleave(len(values)), x.repeat(len(values))


@pytest.mark.parametrize("name", [
    "abs", "neg", "sign", "sgn", "signbit", "ceil", "floor", "trunc", "round", "frac", "exp",
    "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos", "tan",
    "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "sigmoid", "erf",
    "erfc", "erfinv", "reciprocal", "deg2rad", "rad2deg", "sinc", "logit", "isnan", "isinf",
    "isposinf", "isneginf", "isfinite", "nan_to_num", "frexp", "special.erfcx", "special.entr",
    "logical_not",
])
def test_unary_on_ieee_edge_values(name):
    fn = eval(f"torch.{name}")
    _same(fn, torch.tensor(EDGES))


@pytest.mark.parametrize("name", [
    "add", "sub", "mul", "div", "floor_divide", "fmod", "pow", "maximum", "minimum", "fmax",
    "fmin", "atan2", "hypot", "copysign", "nextafter", "ldexp", "logaddexp", "logaddexp2",
    "xlogy", "special.xlog1py", "heaviside", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
    "logical_or", "logical_xor",
])
def test_binary_on_ieee_edge_values(name):
    # fmod: pairs whose quotient overflows are left out; the CPU's vectorised fmod computes
    # a - trunc(a / b) * b and gives NaN there, where mlx gives the exact (C fmod) remainder,
    # which test_fmod_is_exact_for_large_quotients checks against the CPU's scalar kernel
    fn = eval(f"torch.{name}")
    values = [v for v in EDGES if v not in (1e-45, 3e-39, 1e-30, -1e-30, 3.4e38)] \
        if name == "fmod" else EDGES
    _same(fn, *_grid(values))


@pytest.mark.parametrize("mode", ["floor", "trunc"])
def test_div_rounding_modes_on_edge_values(mode):
    a, b = _grid([v for v in EDGES if v not in (1e-45, 3e-39)])
    _same(lambda x, y: torch.div(x, y, rounding_mode=mode), a, b)


def test_float_floor_division_is_pythons():
    # 1 // 0.1 is 9 in Python and torch (the quotient of 1 - fmod(1, 0.1)), not floor(1 / 0.1)
    _same(torch.floor_divide, torch.tensor([1.0, -1.0, 7.5, 0.3]),
          torch.tensor([0.1, 0.1, 0.5, 0.1]), exact=True)


def test_fmod_is_exact_for_large_quotients():
    # a 0-dim divisor takes the CPU's scalar std::fmod path
    for a, b in [(1e30, 0.7), (-3e20, 1.3), (123456.789, 1e-3), (3.4e38, 0.1)]:
        _same(torch.fmod, torch.tensor(a), torch.tensor(b), exact=True)


INTS = [0, 1, -1, 2, -2, 3, 5, 7, -7, 31, 32, 63, 64, 65, -65, 100, -100, 2**31 - 1, -2**31 + 1]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
@pytest.mark.parametrize("name", ["add", "sub", "mul", "maximum", "minimum", "bitwise_and",
                                  "bitwise_or", "bitwise_xor", "bitwise_left_shift",
                                  "bitwise_right_shift", "eq", "lt", "logical_xor"])
def test_integer_binary_ops(dtype, name):
    a, b = _grid(INTS, torch.int64)
    _same(eval(f"torch.{name}"), a.to(dtype), b.to(dtype), exact=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
@pytest.mark.parametrize("fn", [
    torch.floor_divide, torch.remainder, torch.fmod,
    lambda a, b: torch.div(a, b, rounding_mode="floor"),
    lambda a, b: torch.div(a, b, rounding_mode="trunc"), torch.div,
])
def test_integer_division_signs(dtype, fn):
    a, b = _grid([v for v in INTS if abs(v) < 2**7 or dtype in (torch.int64, torch.int32)],
                 torch.int64)
    b[b == 0] = 3
    _same(fn, a.to(dtype), b.to(dtype), exact=True)


@pytest.mark.parametrize("fn", [torch.floor_divide, torch.remainder, torch.fmod,
                                lambda a, b: torch.div(a, b, rounding_mode="trunc")])
def test_integer_division_by_zero_raises(fn):
    a, b = torch.tensor([4, 5]), torch.tensor([1, 0])
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        fn(a, b)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        fn(a.to("mlx"), b.to("mlx"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8])
def test_integer_pow_negative_exponents_and_wrapping(dtype):
    base = torch.tensor([1, -1, -1, 2, 0, 3, -3, 7], dtype=dtype)
    exponent = torch.tensor([-3, -3, -2, -1, 5, 40, 41, 3], dtype=dtype)
    _same(torch.pow, base, exponent, exact=True)
    with pytest.raises(RuntimeError, match="negative integer powers"):
        base.to("mlx") ** -2


def test_shifts_past_the_bit_width():
    a = torch.tensor([1, -8, 5, -1, 200], dtype=torch.int32)
    for shift in ([40, 40, -1, 31, 32], [32, 33, 0, 1, 64]):
        b = torch.tensor(shift, dtype=torch.int32)
        _same(torch.bitwise_left_shift, a, b, exact=True)
        _same(torch.bitwise_right_shift, a, b, exact=True)
    u = torch.tensor([1, 200, 255], dtype=torch.uint8)
    _same(torch.bitwise_left_shift, u, torch.tensor([9, 1, 8], dtype=torch.uint8), exact=True)
    _same(torch.bitwise_right_shift, u, torch.tensor([9, 1, 8], dtype=torch.uint8), exact=True)


def test_exp_and_erf_accurate_where_mlx_is_not():
    # MLX's exp is off by ~4e-6 (relative) beyond |x| = 10 and its erf returns 0 for tiny x
    big = torch.linspace(-87.0, 88.0, 2001)
    _same(torch.exp, big)
    _same(torch.sigmoid, big)
    tiny = torch.logspace(-30, 0, 301)
    _same(torch.erf, tiny)
    _same(torch.erf, -tiny)
    _same(torch.erfc, torch.linspace(-5.0, 9.0, 1401))
    _same(torch.special.erfcx, torch.linspace(-6.0, 30.0, 721))


def test_frexp_and_nextafter_on_subnormals():
    x = torch.tensor([1e-45, 3e-39, -1e-40, 1.1754944e-38, 6.0, -0.0])
    _same(torch.frexp, x, exact=True)
    _same(torch.nextafter, x, torch.tensor([0.0, 1.0, -1.0, 0.0, INF, 1.0]), exact=True)
    for dtype in (torch.float16, torch.bfloat16):
        h = torch.tensor([1e-7, 6.0, -3.5, 65504.0]).to(dtype)
        _same(torch.frexp, h, exact=True)
        _same(torch.nextafter, h, torch.zeros(4, dtype=dtype), exact=True)


def test_half_precision_rounds_like_the_cpu():
    # trunc division and logit round every step to half on the CPU; add with alpha computes in
    # float32 in the CPU's vectorised loop (256 elements: no scalar tail, which rounds
    # alpha * other to half first)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        a = (torch.randn(256, generator=g) * 4).to(dtype)
        b = (torch.randn(256, generator=g) / 8).to(dtype)
        _same(lambda x, y: torch.add(x, y, alpha=-3.125), a, b, exact=True)
        _same(lambda x, y: torch.div(x, y, rounding_mode="trunc"), a, b, exact=True)
        _same(torch.logit, torch.rand(256, generator=g).to(dtype), exact=True)


def test_add_and_sub_take_numbers_and_alpha_in_the_half_dtype():
    # the CPU's add kernel (also sub's) converts a number, a 0-d tensor and alpha to the result
    # dtype before its float32 arithmetic: mvlgamma's x.add_(5.7239) on half gave -0.1406 on the
    # CPU, -0.1394 here (OpInfo's reference inputs, 157 of 16384 elements)
    c = 5.7239
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.full((256,), 5.86328125).to(dtype)
        for fn in (lambda t: -t + c, lambda t: t - c, lambda t: c - t, lambda t: t - torch.tensor(c),
                   lambda t: torch.add(-t, torch.ones_like(t), alpha=c),
                   lambda t: torch.sub(t, 1.0, alpha=c), lambda t: torch.rsub(t, 1.0, alpha=c),
                   lambda t: t.clone().sub_(c), lambda t: torch.add(t, -c, out=torch.empty_like(t)),
                   lambda t: torch.mvlgamma(t - 8.7734375, 5)):
            _same(fn, x, exact=True)


@pytest.mark.parametrize("fn, dtype", [
    (torch.abs, torch.bool), (torch.ceil, torch.bool), (torch.frac, torch.int64),
    (torch.hypot, torch.int32), (torch.logaddexp, torch.int64), (torch.nextafter, torch.int64),
    (torch.bitwise_not, torch.float32), (torch.bitwise_and, torch.float32),
    (torch.bitwise_left_shift, torch.float16), (lambda a, b: torch.lerp(a, b, 0.5), torch.int64),
])
def test_dtypes_without_a_cpu_kernel_raise_like_the_cpu(fn, dtype):
    a = torch.ones(3, dtype=dtype)
    args = (a,) if fn in (torch.abs, torch.ceil, torch.frac, torch.bitwise_not) else (a, a)
    with pytest.raises(NotImplementedError) as cpu_error:
        fn(*args)
    with pytest.raises(NotImplementedError) as mlx_error:
        fn(*[x.to("mlx") for x in args])
    assert str(mlx_error.value) == str(cpu_error.value)


@pytest.mark.parametrize("write", [
    lambda t: t.exp_(), lambda t: t.add_(2.5), lambda t: t.clamp_(-0.5, 0.5),
    lambda t: t.pow_(2), lambda t: torch.atan2(t, t.flip(-1), out=t),
    lambda t: torch.sqrt(t.abs(), out=t), lambda t: t.copysign_(-1.0),
])
def test_inplace_and_out_keep_the_storage(write):
    cpu = torch.randn(5, 6)
    dev = cpu.to("mlx")
    view = dev[1:4, ::2]  # a strided view: writes must land in the base's storage
    ptr = dev.data_ptr()
    write(cpu[1:4, ::2])
    result = write(view)
    assert dev.data_ptr() == ptr and result.data_ptr() == view.data_ptr()
    torch.testing.assert_close(dev.cpu(), cpu)


def test_out_with_wrong_dtype_raises_like_cpu():
    with pytest.raises(RuntimeError, match="can't be cast"):
        torch.exp(torch.ones(3, device="mlx"), out=torch.empty(3, dtype=torch.int64, device="mlx"))


def test_python_scalars_keep_tensor_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32):
        t = torch.arange(6, dtype=dtype)
        _same(lambda x: x * 3 + 2, t, exact=True)
        _same(lambda x: x * 2.5, t, exact=True)
        _same(lambda x: (x > 2.5) | (x == 1), t, exact=True)


SPECIAL_EDGES = [0.0, -0.0, 1.0, 2.0, -1.0, -2.0, -2.5, 1e-30, -1e-30, 1e30, -1e30, 3.4e38, INF,
                 -INF, NAN, 1e-45, 0.5]


@pytest.mark.parametrize("fn", [
    torch.lgamma, torch.digamma, lambda t: torch.polygamma(1, t), lambda t: torch.polygamma(3, t),
    torch.i0, torch.special.i0e, torch.special.i1, torch.special.i1e, torch.special.log_ndtr,
    torch.angle,
])
def test_special_functions_over_wide_ranges(fn):
    for x in (torch.tensor(SPECIAL_EDGES), torch.linspace(-100, 100, 40001)):
        _same(fn, x)


# n! as torch's float32 kernel computes it, expf(lgammaf(n + 1)) (the C library's rounding; inf
# from n = 35), in constant time: math.factorial(n) grew with n (a child process, so that a
# regression times out instead of hanging) and its exact value overflowed MLX scalars at n = 30
_POLYGAMMA_PROBE = """
import resource, torch, torch_mlx
x = torch.cat([torch.linspace(0.05, 30, 300), torch.tensor([1e-3, 100.0, float("inf"),
                                                             float("nan")])])
for n in list(range(2, 40)) + [100, 10**5, 10**9]:
    torch.testing.assert_close(torch.polygamma(n, x.to("mlx")).cpu(), torch.polygamma(n, x),
                               equal_nan=True, msg=lambda m: f"n = {n}: {m}")
def peak_kib():
    # VmHWM is this program's own peak: Linux carries ru_maxrss over from the forked parent
    # (pytest, often over 1 GB) across exec
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak_kib())
"""


def test_polygamma_at_high_orders():
    _peak_rss_kib_of_child(_POLYGAMMA_PROBE, 60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_to_decimals_past_the_dtype_range(dtype):
    # 10^|d| is inf from |d| = 39 (float32): NaN, as on the CPU; 10.0 ** 309 raised in Python
    x = torch.tensor([1.2345, 2.5, -3.75, 0.0, 1e30, -7e-30]).to(dtype)
    for d in (0, 3, 38, 39, 400, 10**6, -1, -38, -39, -400, -10**6):
        _same(lambda t: torch.round(t, decimals=d), x)


def test_ndtri_keeps_relative_precision_in_the_tails():
    _same(torch.special.ndtri, torch.logspace(-44, -0.31, 5000))
    _same(torch.special.ndtri, 1 - torch.logspace(-7, -0.31, 5000))
    _same(torch.special.ndtri, torch.tensor([0.0, 1.0, -0.1, 1.1, 0.5, NAN, 1e-45]))


def test_hurwitz_zeta_domain_and_negative_q():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 8, (4000,), generator=g).float()
    q = torch.rand(4000, generator=g) * 20 - 10
    _same(torch.special.zeta, x, q)
    _same(torch.special.zeta, torch.rand(4000, generator=g) * 10 + 1, q)
    x, q = torch.tensor([1.0, 0.5, 2.0, 2.0, 3.0, 2.0, INF, 2.0, -3.0]), \
        torch.tensor([1.0, 1.0, 0.0, -1.0, -2.5, -3.5, 2.0, INF, -4.0])
    _same(torch.special.zeta, x, q)
    # OpInfo's reference inputs: a nonpositive integer q gives inf before a non-integer (or NaN)
    # x gives NaN, as torch tests them; -inf is such a q
    x = torch.tensor([1.5707964, 3.1415827, 1001.2, NAN, NAN, NAN, 2.5, 2.0, NAN, 1.0, 0.5])
    q = torch.tensor([0.0, -1.0, -501.0, -INF, -3.0, -2.5, -0.0, NAN, 2.0, NAN, -3.0])
    _same(torch.special.zeta, x, q)


def test_lgamma_to_float32_precision():
    # float32 Stirling left errors up to 4e-6 (the CPU's lgammaf: 5e-7); mvlgamma(x, 5) sums five
    # lgamma values, which differed from the CPU by 1.3e-5 at OpInfo's reference inputs
    x = torch.cat([torch.linspace(-10, 10, 400001),
                   torch.tensor([1e-30, -1e-30, 1e30, 3e38, -3e38, INF, -INF, NAN, 0.0, -1.0])])
    _same(torch.lgamma, x)
    x = torch.tensor([-2.9283595, -2.9080939, -2.7380538, -2.3310885, -2.8540473])
    _same(lambda t: torch.mvlgamma(t, 5), x)
    _same(torch.lgamma, x.to(torch.bfloat16))


@pytest.mark.parametrize("fn", [torch.special.i1, torch.special.modified_bessel_i1])
def test_i1_as_the_cpus_chebyshev_series(fn):
    # the CPU's Cephes series (Clenshaw, fused steps): the power series differed by 1.4e-6
    # relative near x = 7.7 (5 and 4 elements of this grid; OpInfo's reference inputs)
    x = torch.cat([torch.linspace(-90, 90, 400001), torch.linspace(7.0, 8.5, 200001),
                   torch.tensor([0.0, -0.0, 8.0, -8.0, 88.7, 89.5, INF, -INF, NAN])])
    _same(fn, x)


def test_polygamma_and_zeta_as_the_cpus_float64_sum():
    # polygamma(4, x) near the negative half-integers (the reference inputs'): the two terms
    # nearest the pole (~2^5 each) cancel; the CPU sums in float64 (-4.4998498 gave 2.3011733
    # there, 2.3011258 here in float32), from a first term q^-x rounded to float32, which is the
    # CPU's whole error for q in (-1, 0) (-0.49911: 10.243277, float64 10.243232)
    x = torch.tensor([-1.4992325, -5.5002775, -7.500052, -4.4991312, -2.5007877, -0.5006729,
                      -8.501023, -6.4997625, -4.4998498, -0.4991076, -0.4995357, -0.4997932,
                      -3.4991379, -8.5, -0.25, -0.75])
    for n in (2, 3, 4, 5):
        _same(lambda t: torch.polygamma(n, t), x)
    # every term underflowed: the CPU's Euler-Maclaurin factor overflows, inf * 0 = NaN
    # (zeta(1e20, q)); terms that overflow on both sides of a pole: inf - inf = NaN
    x = torch.tensor([1e20, 1e20, 1e20, 4988429.0, 1000.0, 2.0])
    q = torch.tensor([501.0, 1001.2, 1e20, -13437.7, 2.0, 1e20])
    _same(torch.special.zeta, x, q)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_gcd_lcm_including_wrapping(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-10**6, 10**6, (5000,), generator=g)
    b = torch.randint(-10**6, 10**6, (5000,), generator=g)
    b[:100], a[50:150] = 0, 0
    _same(torch.gcd, a.to(dtype), b.to(dtype), exact=True)
    _same(torch.lcm, a.to(dtype), b.to(dtype), exact=True)


def test_gcd_lcm_broadcast_when_no_euclid_step_runs():
    # every a already 0: the result is b, broadcast to the common shape (was b's own shape)
    for a, b in [(torch.tensor([0]), torch.tensor(9)), (torch.zeros(2, 3, dtype=torch.long),
                                                        torch.tensor([4, -6, 0]))]:
        _same(torch.gcd, a, b, exact=True)
        _same(torch.gcd, b, a, exact=True)
        _same(torch.lcm, a, b, exact=True)


def test_equal():
    a = torch.tensor([1.0, 2.0, NAN])
    for b in (a.clone(), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])):
        assert torch.equal(a.to("mlx"), b.to("mlx")) == torch.equal(a, b)
    assert torch.equal(a[:2].to("mlx"), torch.tensor([1, 2], device="mlx"))


POLYNOMIALS = [f"{shift}chebyshev_polynomial_{kind}" for shift in ("", "shifted_")
               for kind in "tuvw"] + ["hermite_polynomial_h", "hermite_polynomial_he",
                                      "laguerre_polynomial_l", "legendre_polynomial_p"]

# no NaN x: several of torch's CPU polynomial kernels return an uninitialised value for it
# (mlx returns NaN)
POLY_X = [-8.5, -3.0, -1.0, -0.999, -0.7, -0.5, -0.2, 0.0, 0.2, 0.5, 0.7, 0.999, 1.0, 1.5, 3.0,
          8.5, INF, -INF]
POLY_N = [-3.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.7, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 9.9, 12.0,
          20.0, 31.0, NAN]


@pytest.mark.parametrize("name", POLYNOMIALS)
def test_orthogonal_polynomials(name):
    # degrees are truncated (NaN and negative give 0), the ends +-1 are exact, recurrences use
    # fused multiply-adds as torch's compiled kernels do
    x = torch.tensor(POLY_X).repeat_interleave(len(POLY_N))
    n = torch.tensor(POLY_N).repeat(len(POLY_X))
    fn = getattr(torch.special, name)
    _same(fn, torch.cat([x, (x + 1) / 2]), torch.cat([n, n]))
    _same(lambda a: fn(a, 5), torch.tensor(POLY_X))
    _same(lambda b: fn(0.3, b), torch.tensor(POLY_N))
    if "chebyshev" in name:  # the trigonometric forms at a degree far past float32's integers
        _same(lambda a: fn(a, 1e12), torch.tensor(POLY_X))


# Every polynomial at large degrees, in a child process (a regression runs out of time or
# memory rather than failing): x over [-1, 1] (0 and 1 are the shifted kinds' ends), just
# outside it (1 + 2^-23 recurs 1.8e5 steps before T_n overflows), and the x whose shifted
# argument 2x - 1 rounds to -1 (torch recurs there); n as a Python number and as a tensor.
# 1e20 is past int64: torch's conversion gives INT64_MIN, a negative degree.
_LARGE_DEGREE_PROBE = """
import resource, torch, torch_mlx
x = torch.cat([torch.linspace(-1, 1, 101), torch.tensor(
    [1.0000001, -1.0000001, 1.0001, -1.0001, 1.01, -1.01, 1.2, -1.2, 0.99999994, -0.99999994,
     1e-9, -1e-9, 5e-8, 0.5000001])])
for name in NAMES:
    fn = getattr(torch.special, name)
    for n in (10, 1e4, 1e6, 1e20):
        expected = fn(x, n)
        for degree in (n, torch.full_like(x, n)):
            got = fn(x.to("mlx"), degree.to("mlx") if isinstance(degree, torch.Tensor)
                     else degree).cpu()
            torch.testing.assert_close(got, expected, equal_nan=True,
                                       msg=lambda m: f"{name}, n = {n}: {m}")
def peak_kib():
    # VmHWM is this program's own peak: Linux carries ru_maxrss over from the forked parent
    # (pytest, often over 1 GB) across exec
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak_kib())
"""


def _peak_rss_kib_of_child(code: str, timeout: float) -> int:
    """Run ``code`` in a fresh interpreter (it prints its peak RSS last) within ``timeout`` s."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_orthogonal_polynomials_at_large_degrees():
    peak_kib = _peak_rss_kib_of_child(f"NAMES = {POLYNOMIALS!r}\n" + _LARGE_DEGREE_PROBE, 60)
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


@pytest.mark.parametrize("fn", [torch.special.modified_bessel_i0,
                                torch.special.modified_bessel_i1,
                                torch.special.spherical_bessel_j0])
def test_modified_bessel_and_spherical_j0(fn):
    _same(fn, torch.linspace(-100, 100, 20001))
    _same(fn, torch.tensor([0.0, -0.0, 1e-3, 0.49, 0.5, 100.0, -100.0, INF, -INF, NAN]))


@pytest.mark.parametrize("fn", [torch.special.modified_bessel_k0,
                                torch.special.modified_bessel_k1,
                                torch.special.scaled_modified_bessel_k0,
                                torch.special.scaled_modified_bessel_k1])
def test_modified_bessel_second_kind(fn):
    # series below 1/2, trapezoidal integral above; both sides of the switch and the tails
    _same(fn, torch.cat([torch.logspace(-30, 2.1, 3000), torch.linspace(0.01, 100, 3000)]))
    _same(fn, torch.tensor([0.0, -0.0, -1.0, 0.4999, 0.5, 0.5001, 1e30, INF, -INF, NAN]))


@pytest.mark.parametrize("fn", [torch.special.bessel_j0, torch.special.bessel_j1,
                                torch.special.bessel_y0, torch.special.bessel_y1])
def test_bessel_first_and_second_kind(fn):
    # trapezoidal integrals (Neumann series for Y) up to 25, Hankel's expansion above
    _same(fn, torch.cat([torch.linspace(-30, 30, 6001), torch.logspace(-30, 0.5, 500),
                         torch.linspace(20, 200, 3000)]))
    _same(fn, torch.tensor([0.0, -0.0, -1.0, 1e-30, 2.0, 24.9, 25.0, 25.1, 100.0, INF, -INF,
                            NAN]))


def test_bessel_j0_is_accurate_where_the_cpu_is_not():
    # the CPU's float kernel rounds x - pi/4 for large x; mlx forms the phase from cos x, sin x
    x = torch.tensor([1e4, 1e6, 3e7])
    torch.testing.assert_close(torch.special.bessel_j0(x.to("mlx")).cpu().double(),
                               torch.special.bessel_j0(x.double()), rtol=1e-4, atol=1e-7)


def test_complex_and_polar_keep_infinite_parts_and_broadcast():
    re = torch.tensor([[1.0, INF, -0.0, NAN]])
    im = torch.tensor([[2.0], [-INF]])
    expected = torch.complex(re, im)
    got = torch.complex(re.to("mlx"), im.to("mlx")).cpu()
    assert got.dtype == torch.complex64
    assert torch.equal(torch.view_as_real(got).nan_to_num(),
                       torch.view_as_real(expected).nan_to_num())
    out = torch.empty(0, dtype=torch.complex64, device="mlx")
    torch.polar(torch.tensor([2.0, 0.5]).to("mlx"), torch.tensor([0.3, -2.0]).to("mlx"), out=out)
    torch.testing.assert_close(out.cpu(), torch.polar(torch.tensor([2.0, 0.5]),
                                                      torch.tensor([0.3, -2.0])))
    with pytest.raises(TypeError, match="complex32|ComplexHalf"):  # half parts: complex32
        torch.complex(re.half().to("mlx"), re.half().to("mlx"))


def test_fma32_rounds_once():
    # the emulated fused multiply-add (grid_sample's coordinates) against the C library's fmaf,
    # including products that land just past a tie of the sum, where rounding a * b + c twice
    # gives the other neighbour
    import ctypes
    import ctypes.util

    import mlx.core as mx
    from torch_mlx.ops.elementwise import fma32
    fmaf = ctypes.CDLL(ctypes.util.find_library("m")).fmaf
    fmaf.restype, fmaf.argtypes = ctypes.c_float, [ctypes.c_float] * 3
    g = torch.Generator().manual_seed(0)
    scale = lambda: torch.float_power(10, torch.rand(4000, generator=g) * 16 - 8).float()
    a, b = torch.randn(4000, generator=g) * scale(), torch.randn(4000, generator=g) * scale()
    c = torch.cat([-(a[:2000].double() * b[:2000]).float(), (torch.randn(2000, generator=g)
                                                             * scale()[:2000])])
    k = torch.arange(-40, 40).float()
    u = 2.0 ** -torch.arange(9, 12).float()
    k, u = k.repeat_interleave(3), u.repeat(80)
    a = torch.cat([a, (1 + u) * 2 ** k, torch.tensor([INF, 1e30, 3e38, NAN, 0.0])])
    b = torch.cat([b, (1 - u + u * u) * 2 ** (-k - 24),
                   torch.tensor([1.0, 1e30, 2.0, 1.0, -0.0])])
    c = torch.cat([c, torch.ones(240), torch.tensor([1.0, -INF, -INF, 1.0, 0.0])])
    expected = torch.tensor([fmaf(*v) for v in zip(a.tolist(), b.tolist(), c.tolist())])
    got = torch.from_numpy(np.array(fma32(*(mx.array(t.numpy()) for t in (a, b, c)))))
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_igamma_igammac_accuracy_and_boundaries():
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(1000, generator=g) * 20, torch.rand(200, generator=g) * 500,
                   torch.tensor([0.0, 0.0, 1.0, INF, 2.0, -1.0, 3.0, NAN, 1e-3, 50.0])])
    x = torch.cat([torch.rand(1000, generator=g) * 30,
                   a[1000:1200] * (0.9 + 0.2 * torch.rand(200, generator=g)),
                   torch.tensor([1.0, 0.0, 0.0, 2.0, INF, 1.0, -1.0, 1.0, 1e-4, 49.0])])
    for fn in (torch.igamma, torch.igammac):
        reference = fn(a.double(), x.double())
        got = fn(a.to("mlx"), x.to("mlx")).cpu().double()
        # at least as close to the float64 values as the CPU's float32 kernel
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-6, equal_nan=True)


def test_igamma_igammac_large_a_and_the_order_of_boundaries():
    # from OpInfo's reference inputs: a = x = 4988429 and 1e20 (torch's uniform asymptotic
    # expansion, where 300 series terms gave 0.543 and 1.0 for 0.5), and a NaN beside an
    # infinite or zero argument (torch decides a = 0, x = 0, a = inf, x = inf first)
    a = torch.tensor([4988429.0, 1e20, 25.0, 25.0, 150.0, 199.9, 200.1, 1e3, 1e4, 1e6, 1e8])
    spread = torch.tensor([-0.29, -0.1, -0.02, 0.0, 0.02, 0.1, 0.29])
    near = a[:, None] * (1 + spread * torch.where(a > 200, 4.5 / a.sqrt(), 1.0)[:, None])
    pairs = torch.tensor([[INF, NAN], [NAN, INF], [NAN, NAN], [0.0, NAN], [NAN, 0.0],
                          [INF, INF], [0.0, 0.0], [INF, 1.0], [1.0, INF], [-1.0, NAN],
                          [NAN, -1.0], [0.0, 2.0], [2.0, 0.0]])
    a_all = torch.cat([a[:, None].expand_as(near).reshape(-1), a, pairs[:, 0]])
    x_all = torch.cat([near.reshape(-1), a, pairs[:, 1]])
    for fn in (torch.igamma, torch.igammac):
        _same(fn, a_all, x_all)


def test_airy_ai_oscillates_with_the_cpus_float32_phase():
    # OpInfo's reference input x = -13437.7: the phase 2/3 |x|^1.5 + pi/4 = 1e6 has a float32
    # ulp of 0.06, and torch's kernel computes it in float32 (the CPU gave -0.0330, the exact
    # phase -0.0304); far out to -1e20 the CPU's values follow the same rounding
    x = torch.cat([-torch.logspace(0.5, 20, 20000),
                   torch.tensor([-13437.7001953125, -501.0, -1e20, -8.0, -8.0001, -2.1])])
    _same(torch.special.airy_ai, x)


def test_airy_ai_is_as_accurate_as_the_cpu_over_its_range():
    x = torch.cat([torch.linspace(-60, 30, 9001),
                   torch.tensor([0.0, INF, -INF, NAN, 5.0, 5.0001, -8.0, -8.0001])])
    reference = torch.special.airy_ai(x.double())
    got = torch.special.airy_ai(x.to("mlx")).cpu().double()
    cpu = torch.special.airy_ai(x).double()
    assert torch.equal(torch.isnan(got), torch.isnan(cpu))  # NaN at NaN and at +-inf
    finite = torch.isfinite(reference)
    assert (got - reference)[finite].abs().max() <= (cpu - reference)[finite].abs().max()
    torch.testing.assert_close(got[finite], reference[finite], rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("chunk", [None, 7])
def test_isin_against_the_cpu(monkeypatch, chunk):
    # one lowering for the three overloads (and out=); elements compared in chunks bounded by
    # _ISIN_CHUNK (7 here: many chunks, the last one short), mixed dtypes promoted as torch does
    from torch_mlx.ops import elementwise
    if chunk:
        monkeypatch.setattr(elementwise, "_ISIN_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-20, 20, (6, 11), generator=g)
    tests = torch.tensor([[3, -7], [19, 3]])
    cases = [(a, tests), (a.float(), tests), (a.to(torch.int8), tests), (a.to(torch.uint8), tests.float()),
             (a[0, 0], tests), (a, tests[0, 0]), (a, torch.tensor([], dtype=torch.long)),
             (torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))]
    for x, t in cases:
        for invert in (False, True):
            expected = torch.isin(x, t, invert=invert)
            got = torch.isin(x.to("mlx"), t.to("mlx"), invert=invert)
            assert got.dtype == torch.bool and torch.equal(got.cpu(), expected), (x, t, invert)
    assert torch.equal(torch.isin(a.to("mlx"), 3).cpu(), torch.isin(a, 3))
    assert torch.equal(torch.isin(3, tests.to("mlx")).cpu(), torch.isin(3, tests))
    out = torch.ones(6, 11, dtype=torch.bool, device="mlx")
    torch.isin(a.to("mlx"), tests.to("mlx"), out=out)
    assert torch.equal(out.cpu(), torch.isin(a, tests))
