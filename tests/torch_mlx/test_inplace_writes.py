"""In-place writes into part of an "mlx" tensor: they write into the existing storage (same data
pointer, version bumped, elements outside the write untouched) and cost O(bytes written), not a
copy of the whole destination (checked by peak memory and by time against a 256x larger
destination)."""
import time

import pytest
import torch

import torch_mlx  # noqa: F401

MiB = 1 << 20


def _pair(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        cpu = torch.randn(*shape, generator=g, dtype=dtype)
    else:
        cpu = torch.randint(-5, 5, shape, generator=g, dtype=dtype)
    return cpu, cpu.to("mlx")


def _mlx(x):
    return x.to("mlx") if isinstance(x, torch.Tensor) else x


def _check_inplace(cpu, dev, write):
    """``write(t)`` mutates ``t`` in place: on "mlx" it must keep the storage, bump the
    version, return ``t`` itself and give the CPU's values."""
    ptr, version = dev.data_ptr(), dev._version
    expected = write(cpu)
    got = write(dev)
    assert dev.data_ptr() == ptr, "the write replaced the destination's storage"
    assert dev._version > version
    if isinstance(got, torch.Tensor):
        assert got is dev or got.data_ptr() == ptr
    torch.testing.assert_close(dev.cpu(), cpu)
    return expected


IDX = torch.tensor([3, 0, -1])
ROWS = torch.tensor([[0, 2], [5, 1]])
MASK3 = torch.tensor([True, False, True, False, False, True])

INDEX_PUT_CASES = {
    "rows": lambda t: t.index_put_((_mlx(IDX) if t.is_mlx else IDX,), _v(t, 3, 4)),
    "rows_accumulate_duplicates": lambda t: t.index_put_(
        (_dev(t, torch.tensor([1, 1, 4, 1])),), _v(t, 4, 4), accumulate=True),
    "two_indices": lambda t: t.index_put_((_dev(t, ROWS), _dev(t, ROWS % 4)), _v(t, 2, 2)),
    "cols_with_slice": lambda t: torch.ops.aten.index_put_(
        t, [None, _dev(t, torch.tensor([2, 0]))], _v(t, 6, 2)),
    "bool_mask": lambda t: t.index_put_((_dev(t, MASK3),), _v(t, 1, 4)),
    "scalar_value": lambda t: t.index_put_((_dev(t, IDX),), _dev(t, torch.tensor(7.0))),
    "cpu_indices": lambda t: t.index_put_((IDX,), _v(t, 3, 4)),
    "setitem": lambda t: t.__setitem__((slice(1, 5), _dev(t, torch.tensor([3, 1]))), 2.5),
    "setitem_mask": lambda t: t.__setitem__(_dev(t, torch.ones(6, 4, dtype=torch.bool).tril()),
                                            -1.0),
}


def _dev(t, x):
    return x.to("mlx") if t.is_mlx else x


def _v(t, *shape):
    g = torch.Generator().manual_seed(sum(shape))
    return _dev(t, torch.randn(*shape, generator=g))


@pytest.mark.parametrize("case", INDEX_PUT_CASES)
def test_index_put_(case):
    cpu, dev = _pair(6, 4)
    _check_inplace(cpu, dev, INDEX_PUT_CASES[case])


def test_index_put_into_strided_view():
    """A transposed slice of a larger tensor: only its elements change, through its strides."""
    cpu, dev = _pair(8, 6)
    vc, vd = cpu[1:7].t(), dev[1:7].t()
    _check_inplace(vc, vd, lambda t: t.index_put_((_dev(t, torch.tensor([4, 1])),),
                                                  _v(t, 2, 6)))
    torch.testing.assert_close(dev.cpu(), cpu)


def test_index_put_errors_match_cpu():
    cpu, dev = _pair(3, 4)
    for t in (cpu, dev):
        with pytest.raises(IndexError, match="out of bounds"):
            t.index_put_((_dev(t, torch.tensor([3])),), _v(t, 4))
        with pytest.raises(RuntimeError, match="shape mismatch"):
            t.index_put_((_dev(t, torch.tensor([1])),), _v(t, 3))
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.zeros(3, 1, device="mlx").expand(3, 4).index_put_(
            (torch.tensor([0], device="mlx"),), torch.ones(4, device="mlx"))


MASKED_FILL_CASES = {
    "full_mask": lambda t: t.masked_fill_(t > 0, 0.5),
    "broadcast_row_mask": lambda t: t.masked_fill_(_dev(t, MASK3.view(6, 1)), -2.0),
    "broadcast_col_mask": lambda t: t.masked_fill_(_dev(t, torch.tensor([True, False, False,
                                                                         True])), 3.0),
    "tensor_value": lambda t: t.masked_fill_(_dev(t, MASK3.view(6, 1)),
                                             _dev(t, torch.tensor(9.0))),
    "none_true": lambda t: t.masked_fill_(_dev(t, torch.zeros(6, 4, dtype=torch.bool)), 1.0),
}


@pytest.mark.parametrize("case", MASKED_FILL_CASES)
def test_masked_fill_(case):
    cpu, dev = _pair(6, 4)
    _check_inplace(cpu, dev, MASKED_FILL_CASES[case])


def test_copy_into_slice():
    cpu, dev = _pair(6, 4)
    src_c, src_d = _pair(2, 4, seed=1)
    ptr = dev.data_ptr()
    cpu[2:4].copy_(src_c)
    dev[2:4].copy_(src_d)
    cpu[:, 1].copy_(torch.arange(6.0))
    dev[:, 1].copy_(torch.arange(6.0, device="mlx"))
    dev[5, 3] = 42.0
    cpu[5, 3] = 42.0
    assert dev.data_ptr() == ptr
    torch.testing.assert_close(dev.cpu(), cpu)



def test_copies_of_conjugate_and_negative_views():
    # copy_ reaches the native _copy_from with the view bits set; the Conjugate/Negative
    # fallbacks used to recurse through clone() until the stack overflowed (a segfault)
    x = torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    dev = x.to("mlx")
    assert torch.equal(dev.conj().clone().cpu(), x.conj())
    assert torch.equal(dev.conj().resolve_conj().cpu(), x.conj().resolve_conj())
    assert torch.equal(dev.conj().cpu(), x.conj())
    assert torch.equal(torch._neg_view(dev).clone().cpu(), -x)
    assert torch.equal(torch._neg_view(dev.real).contiguous().cpu(), -x.real)
    into_conj = torch.zeros(5, dtype=torch.complex64, device="mlx")
    into_conj.conj().copy_(dev)  # writes through a conjugate view: conj(x) lands in storage
    assert torch.equal(into_conj.cpu(), x.conj())
    cpu_dst = torch.empty(5, dtype=torch.complex64)
    cpu_dst.copy_(dev.conj())
    assert torch.equal(cpu_dst, x.conj())


SCATTER_CASES = {
    "scatter_src": lambda t: t.scatter_(1, _dev(t, torch.tensor([[0, 2], [3, 1], [1, 1],
                                                                [2, 0], [0, 0], [3, 3]])),
                                        _v(t, 6, 2)),
    "scatter_value": lambda t: t.scatter_(0, _dev(t, torch.tensor([[5, 1, 0, 2]])), -7.0),
    "scatter_reduce_multiply": lambda t: t.scatter_(
        0, _dev(t, torch.tensor([[5, 1, 0, 2], [5, 1, 1, 2]])), _v(t, 2, 4), reduce="multiply"),
    "scatter_add_": lambda t: t.scatter_add_(0, _dev(t, torch.tensor([[5, 1, 0, 2],
                                                                      [5, 1, 1, 2]])),
                                             _v(t, 2, 4)),
    "scatter_reduce_amax": lambda t: t.scatter_reduce_(
        1, _dev(t, torch.tensor([[0, 0], [3, 1], [1, 1], [2, 0], [0, 0], [3, 3]])),
        _v(t, 6, 2), "amax", include_self=False),
    "scatter_reduce_mean": lambda t: t.scatter_reduce_(
        1, _dev(t, torch.tensor([[0, 0], [3, 1], [1, 1], [2, 0], [0, 0], [3, 3]])),
        _v(t, 6, 2), "mean"),
    "index_copy_": lambda t: t.index_copy_(0, _dev(t, torch.tensor([4, 0])), _v(t, 2, 4)),
    "index_add_": lambda t: t.index_add_(1, _dev(t, torch.tensor([3, 3, 0])), _v(t, 6, 3),
                                         alpha=2.0),
    "index_fill_": lambda t: t.index_fill_(1, _dev(t, torch.tensor([-1, 1])), 0.25),
    "index_reduce_": lambda t: t.index_reduce_(0, _dev(t, torch.tensor([1, 1, 5])),
                                               _v(t, 3, 4), "prod"),
    "masked_scatter_": lambda t: t.masked_scatter_(_dev(t, MASK3.view(6, 1)), _v(t, 12)),
    "put_": lambda t: t.put_(_dev(t, torch.tensor([0, 23, -2])), _v(t, 3)),
    "put_accumulate": lambda t: t.put_(_dev(t, torch.tensor([5, 5, 7])), _v(t, 3),
                                       accumulate=True),
}


@pytest.mark.parametrize("case", SCATTER_CASES)
def test_scatter_family_(case):
    cpu, dev = _pair(6, 4)
    _check_inplace(cpu, dev, SCATTER_CASES[case])


def test_integer_destination():
    cpu, dev = _pair(6, 4, dtype=torch.int64)
    _check_inplace(cpu, dev, lambda t: t.index_put_(
        (_dev(t, torch.tensor([1, 1, 2])),), _dev(t, torch.tensor([5, 6, 7])).view(3, 1)
        .expand(3, 4).contiguous(), accumulate=True))
    _check_inplace(cpu, dev, lambda t: t.scatter_(1, _dev(t, torch.tensor([[1], [0], [3], [2],
                                                                          [1], [0]])), 9))


# ----------------------------------------------------------------------------------------------
# Cost: O(bytes written)


KV_WRITES = {
    # the shape of a KV-cache update: a few rows at slot indices
    "index_put_": lambda cache, rows, vals: cache.index_put_((rows,), vals),
    "setitem": lambda cache, rows, vals: cache.__setitem__(rows, vals),
    "index_copy_": lambda cache, rows, vals: cache.index_copy_(0, rows, vals),
    "scatter_": lambda cache, rows, vals: cache.scatter_(
        0, rows.view(-1, 1).expand(-1, vals.shape[1]), vals),
    "masked_fill_": lambda cache, rows, vals: cache.masked_fill_(
        torch.zeros(cache.shape[0], 1, dtype=torch.bool, device="mlx").index_fill_(0, rows, True),
        1.5),
    "copy_slice": lambda cache, rows, vals: cache[8:8 + vals.shape[0]].copy_(vals),
}

ROW = 4096  # floats per row: 16 KiB


def _cache(nbytes):
    return torch.zeros(nbytes // (4 * ROW), ROW, device="mlx")


@pytest.mark.parametrize("case", KV_WRITES)
def test_partial_write_allocates_no_copy_of_destination(case):
    cache = _cache(256 * MiB)
    rows = torch.tensor([3, 100, 7, 2000], device="mlx")
    vals = torch.randn(4, ROW).to("mlx")
    KV_WRITES[case](cache, rows, vals)  # warm-up
    torch.mlx.synchronize()
    before = torch.mlx.memory_allocated()
    torch.mlx.reset_peak_memory_stats()
    KV_WRITES[case](cache, rows, vals)
    torch.mlx.synchronize()
    peak = torch.mlx.max_memory_allocated() - before
    assert peak < 8 * MiB, f"{case} allocated {peak / MiB:.1f} MiB for a 64 KiB write"


def _best_time(fn, repeats=15):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("case", KV_WRITES)
def test_partial_write_time_independent_of_destination_size(case):
    """The issue's bar: the same small write into a 256 MiB and a 1 MiB destination takes at
    most 3x as long."""
    rows = torch.tensor([3, 10, 7, 20], device="mlx")
    vals = torch.randn(4, ROW).to("mlx")
    small, big = _cache(1 * MiB), _cache(256 * MiB)
    write = KV_WRITES[case]
    write(small, rows, vals)
    write(big, rows, vals)
    ratio = _best_time(lambda: write(big, rows, vals)) / \
        _best_time(lambda: write(small, rows, vals))
    assert ratio <= 3, f"{case}: 256 MiB / 1 MiB destination time ratio {ratio:.1f}"
