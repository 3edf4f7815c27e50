"""Creation ops on "mlx" beyond OpInfo's samples: every dtype, the ends of linspace, integer
truncation, double-precision logspace, arange lengths and int64 ranges, triangle indices."""
import pytest
import torch

import torch_mlx  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          None]


def _same(make, exact=True):
    try:
        expected = make("cpu")
    except Exception as cpu_error:  # noqa: BLE001
        with pytest.raises(type(cpu_error)):
            make("mlx")
        return
    got = make("mlx")
    assert got.device.type == "mlx"
    tol = {"rtol": 0, "atol": 0} if exact else {}
    torch.testing.assert_close(got.cpu(), expected, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linspace(dtype):
    # float results may differ from the CPU's in the last bit: its vectorised loop adds
    # k * step per SIMD block (machine dependent); mlx evaluates torch's scalar formula
    # (integral dtypes: where the double step makes a value land a hair below an integer, the
    # truncation depends on that per-block rounding too, so the integer samples use exact steps)
    if dtype is None or dtype.is_floating_point:
        _same(lambda d: torch.linspace(-3.3, 17.9, 101, dtype=dtype, device=d), exact=False)
    _same(lambda d: torch.linspace(-3.3, 17.9, 81, dtype=dtype, device=d), exact=False)
    _same(lambda d: torch.linspace(0, 200, 77, dtype=dtype, device=d), exact=False)
    _same(lambda d: torch.linspace(5, 9, 1, dtype=dtype, device=d))
    _same(lambda d: torch.linspace(5, 9, 0, dtype=dtype, device=d))
    _same(lambda d: torch.linspace(9, -2, 2, dtype=dtype, device=d))


@pytest.mark.parametrize("dtype", DTYPES)
def test_logspace_in_double_precision(dtype):
    high = 2 if dtype == torch.uint8 else 4
    _same(lambda d: torch.logspace(0, high, 33, dtype=dtype, device=d))
    _same(lambda d: torch.logspace(0.5, 7.3, 20, base=2, dtype=dtype, device=d))
    _same(lambda d: torch.logspace(-3, 1, 1, dtype=dtype, device=d))
    _same(lambda d: torch.logspace(3, 1, 1, dtype=dtype, device=d))  # uint8: overflow error
    _same(lambda d: torch.linspace(-3, 1, 1, dtype=dtype, device=d))
    if dtype is None or dtype.is_floating_point:
        _same(lambda d: torch.logspace(-30, 30, 41, dtype=dtype, device=d))


def test_integer_linspace_truncates_and_range_checks():
    _same(lambda d: torch.linspace(0, 10**9, 7, dtype=torch.int64, device=d))
    _same(lambda d: torch.linspace(-3.7, 3.7, 9, dtype=torch.int32, device=d))
    _same(lambda d: torch.linspace(-3, 3, 9, dtype=torch.uint8, device=d))  # -3 wraps to 253
    _same(lambda d: torch.linspace(-3.5, 3, 9, dtype=torch.uint8, device=d))  # overflow error
    _same(lambda d: torch.linspace(0, 300, 9, dtype=torch.uint8, device=d))  # overflow error


@pytest.mark.parametrize("dtype", DTYPES)
def test_arange(dtype):
    floating = dtype is None or dtype.is_floating_point
    _same(lambda d: torch.arange(-3, 50, 0.7 if floating else 3, dtype=dtype, device=d),
          exact=not floating)
    _same(lambda d: torch.arange(7, dtype=dtype, device=d))


def test_arange_lengths_and_int64_range():
    _same(lambda d: torch.arange(0, 2**40, 2**35, device=d))
    _same(lambda d: torch.arange(10, -10, -3, device=d))
    _same(lambda d: torch.arange(0.1, 100.3, 0.1, device=d), exact=False)
    _same(lambda d: torch.arange(0, 10, -1, device=d))  # error as on the CPU


@pytest.mark.parametrize("dtype", DTYPES)
def test_eye_and_full(dtype):
    _same(lambda d: torch.eye(4, 6, dtype=dtype, device=d))
    _same(lambda d: torch.eye(3, dtype=dtype, device=d))
    _same(lambda d: torch.full((3, 2), 7, dtype=dtype, device=d))
    _same(lambda d: torch.zeros(2, 3, dtype=dtype, device=d))
    _same(lambda d: torch.ones(2, 3, dtype=dtype, device=d))


def test_full_dtype_inference():
    for value in (True, 3, 2.5, 2**40):
        _same(lambda d: torch.full((2,), value, device=d))


@pytest.mark.parametrize("row, col, offset", [(5, 7, -1), (6, 3, 1), (0, 3, 0), (4, 4, 0),
                                               (3, 5, 10), (3, 5, -10)])
def test_triangle_indices(row, col, offset):
    _same(lambda d: torch.tril_indices(row, col, offset, device=d))
    _same(lambda d: torch.triu_indices(row, col, offset, device=d))
    _same(lambda d: torch.triu_indices(row, col, offset, dtype=torch.int32, device=d))
