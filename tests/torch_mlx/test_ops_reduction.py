"""Reductions on "mlx" beyond OpInfo's samples: accumulation dtypes (half sums in float32,
integer sums in int64), NaN and first-index rules, empty inputs and their errors, variance
corrections, and out= writes into existing storage."""
import math

import pytest
import torch

import torch_mlx  # noqa: F401

NAN, INF = math.nan, math.inf


def _same(fn, *args, exact=False):
    try:
        expected = fn(*args)
    except Exception as cpu_error:  # noqa: BLE001
        with pytest.raises(type(cpu_error)):
            fn(*[a.to("mlx") for a in args])
        return
    got = fn(*[a.to("mlx") for a in args])
    got = tuple(g.cpu() for g in got) if isinstance(got, tuple) else got.cpu()
    tol = {"rtol": 0, "atol": 0} if exact else {}
    torch.testing.assert_close(got, expected, equal_nan=True, **tol)


def test_half_precision_accumulates_in_float32():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.full((10000,), 10.0, dtype=dtype)  # the running sum passes half's range
        _same(torch.sum, x)
        _same(torch.mean, x)
        _same(torch.linalg.vector_norm, x)
        _same(lambda t: torch.var(t, 0), x + torch.arange(10000).to(dtype))


def test_integer_sums_and_products_in_int64():
    x = torch.full((300,), 100, dtype=torch.int8)
    _same(torch.sum, x, exact=True)
    _same(lambda t: torch.sum(t, dtype=torch.int8), x, exact=True)  # wraps, as on the CPU
    _same(torch.prod, torch.full((40,), 3, dtype=torch.int32), exact=True)  # wraps in int64
    _same(torch.sum, torch.tensor([True, True, False]), exact=True)
    _same(torch.prod, torch.tensor([True, True]), exact=True)
    _same(torch.all, torch.tensor([1, 2], dtype=torch.uint8), exact=True)  # uint8 stays uint8


@pytest.mark.parametrize("fn", [
    torch.amax, torch.amin, torch.max, torch.min, torch.argmax, torch.argmin, torch.aminmax,
    lambda t: torch.max(t, 1), lambda t: torch.min(t, 0), lambda t: torch.argmax(t, 1),
    lambda t: torch.argmin(t, 1, keepdim=True), lambda t: torch.argmax(t, keepdim=True),
    lambda t: torch.logsumexp(t, 1), lambda t: torch.nansum(t, 1), torch.count_nonzero,
    lambda t: torch.all(t, 1), lambda t: torch.any(t, 0),
])
def test_nan_inf_and_first_index_rules(fn):
    x = torch.tensor([[1.0, NAN, 3.0, NAN], [2.0, 5.0, 5.0, -INF], [INF, INF, 1.0, 0.0]])
    _same(fn, x, exact=True)
    _same(fn, torch.tensor([[3, 1, 3, 1], [0, 0, 7, 7]]), exact=True)  # ties: the first index


@pytest.mark.parametrize("fn", [
    torch.sum, torch.mean, torch.prod, torch.max, torch.min, torch.aminmax,
    torch.argmax,  # the meta kernel raises RuntimeError, the CPU IndexError: the CPU's type
    torch.amax, lambda t: torch.amax(t, 0),
    lambda t: torch.logsumexp(t, 0), lambda t: torch.max(t, 0), lambda t: torch.max(t, 1),
    lambda t: torch.argmin(t, 1),
    lambda t: torch.amax(t, 1), lambda t: torch.sum(t, 0), lambda t: torch.var(t, 0),
    torch.linalg.vector_norm, lambda t: torch.linalg.vector_norm(t, INF, dim=1),
])
def test_empty_inputs_give_the_cpus_result_or_error(fn):
    _same(fn, torch.zeros(0, 3))


@pytest.mark.parametrize("correction", [0, 1, 2, 5, 0.5])
def test_variance_corrections(correction):
    x = torch.randn(4, 5)
    for fn in (torch.var, torch.std, torch.var_mean, torch.std_mean):
        _same(lambda t: fn(t, 1, correction=correction), x)
        _same(lambda t: fn(t, (0, 1), correction=correction, keepdim=True), x)


@pytest.mark.parametrize("ord", [0, 1, 2, 3, -1, 0.5, INF, -INF])
def test_vector_norm_orders(ord):
    x = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, -4.0]])
    _same(lambda t: torch.linalg.vector_norm(t, ord), x)
    _same(lambda t: torch.linalg.vector_norm(t, ord, dim=1, keepdim=True), x)


def test_out_writes_into_existing_storage():
    x = torch.randn(6, 5)
    out = torch.empty(6, device="mlx")
    ptr = out.data_ptr()
    torch.sum(x.to("mlx"), 1, out=out)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out.cpu(), x.sum(1))
    values, indices = torch.empty(5, device="mlx"), torch.empty(5, dtype=torch.long, device="mlx")
    vptr, iptr = values.data_ptr(), indices.data_ptr()
    torch.max(x.to("mlx"), 0, out=(values, indices))
    assert (values.data_ptr(), indices.data_ptr()) == (vptr, iptr)
    torch.testing.assert_close((values.cpu(), indices.cpu()), tuple(x.max(0)))
    with pytest.raises(RuntimeError):
        torch.sum(x.to("mlx"), 1, out=torch.empty(6, dtype=torch.long, device="mlx"))


def test_hash_tensor_xors_64_bit_patterns():
    # denormals, NaN, infinities and -0.0 widen to float64 exactly; integers sign-extend
    cases = [torch.tensor([1e-40, -3e-39, float("nan"), float("inf"), -0.0]),
             torch.tensor([5, -7, 2**40]), torch.tensor([-3, 4], dtype=torch.int8),
             torch.tensor([True, True, False]), torch.randn(4, 5, 6).half()]
    for x in cases:
        for kwargs in ({}, {"dim": 0}, {"dim": (0, -1), "keepdim": True}):
            if "keepdim" in kwargs and x.dim() < 2:
                continue
            assert torch.equal(torch.hash_tensor(x.to("mlx"), **kwargs).cpu(),
                               torch.hash_tensor(x, **kwargs))
    empty = torch.empty(3, 0)
    assert torch.equal(torch.hash_tensor(empty.to("mlx"), dim=0).cpu(),
                       torch.hash_tensor(empty, dim=0))
    with pytest.raises(IndexError):  # as on the CPU: an empty reduced dimension
        torch.hash_tensor(empty.to("mlx"), dim=1)


@pytest.mark.parametrize("reduce", ["sum", "mean", "prod", "max", "min"])
@pytest.mark.parametrize("initial", [None, 2.5])
def test_segment_reduce_empty_segments_nan_and_axis(reduce, initial):
    data = torch.tensor([[1.0, NAN, 3.0, 4.0, -2.0], [0.5, 2.0, -1.0, 6.0, 7.0]])
    lengths = torch.tensor([[2, 0, 3], [1, 4, 0]])
    offsets = torch.cat([torch.zeros(2, 1, dtype=torch.int64), lengths.cumsum(1)], 1)
    for kwargs in ({"lengths": lengths}, {"offsets": offsets}):
        expected = torch.segment_reduce(data, reduce, axis=1, initial=initial, **kwargs)
        got = torch.segment_reduce(data.to("mlx"), reduce, axis=1, initial=initial,
                                   **{k: v.to("mlx") for k, v in kwargs.items()})
        torch.testing.assert_close(got.cpu(), expected, equal_nan=True)
    x = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([1, 0, 5])
    torch.testing.assert_close(
        torch.segment_reduce(x.to("mlx"), reduce, lengths=lens.to("mlx"), initial=initial).cpu(),
        torch.segment_reduce(x, reduce, lengths=lens, initial=initial), equal_nan=True)
