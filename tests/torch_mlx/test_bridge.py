"""Zero-copy bridge between torch tensors on "mlx" and mlx.core arrays."""
import gc
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

import torch_mlx
from torch_mlx import _C

VIEWS = {
    "contiguous": lambda t: t,
    "t": lambda t: t.t(),
    "strided_cols": lambda t: t[:, 1::2],
    "rows_from_1": lambda t: t[1:],
    "offset_block": lambda t: t[1:, 2:],
    "expanded": lambda t: t[:1].expand(5, 6),
}


def _base():
    return torch.arange(30, dtype=torch.float32, device="mlx").reshape(5, 6)


@pytest.mark.parametrize("view", VIEWS)
def test_to_mlx_shares_memory(view):
    t = VIEWS[view](_base())
    a = torch_mlx.to_mlx(t)
    assert _C.array_data_address(a) == t.data_ptr()
    assert _C.buffer_address(a) == _C.buffer_address(t)
    assert tuple(a.shape) == tuple(t.shape)
    np.testing.assert_array_equal(np.array(a), t.cpu().numpy())
    # MLX computes correctly over the strided view.
    np.testing.assert_allclose(np.array(mx.exp(a / 30) + a.sum()),
                               (torch.exp(t.cpu() / 30) + t.cpu().sum()).numpy(), rtol=1e-6)


def test_from_mlx_shares_memory():
    a = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    t = torch_mlx.from_mlx(a)
    assert t.device.type == "mlx"
    assert t.data_ptr() == _C.array_data_address(a)
    view = a[:, 1:3]
    tv = torch_mlx.from_mlx(view)
    assert tv.data_ptr() == _C.array_data_address(view)
    assert tv.stride() == (4, 1) and tv.storage_offset() == 1
    assert tv.cpu().tolist() == [[1, 2], [5, 6], [9, 10]]


def test_from_mlx_evaluates_lazy_arrays():
    a = mx.arange(6, dtype=mx.float32) * 2 + 1  # unevaluated graph
    assert torch_mlx.from_mlx(a).cpu().tolist() == [1, 3, 5, 7, 9, 11]


def test_round_trip_is_the_same_memory():
    t = _base()
    back = torch_mlx.from_mlx(torch_mlx.to_mlx(t))
    assert back.data_ptr() == t.data_ptr()
    back.fill_(7)
    assert t.cpu().eq(7).all()


@pytest.mark.parametrize("write", ["fill_", "copy_", "slice_copy_"])
def test_torch_writes_are_visible_to_arrays(write):
    t = _base()
    if write == "fill_":
        t.fill_(3.0)
        expected = np.full((5, 6), 3.0, np.float32)
    elif write == "copy_":
        src = torch.full((5, 6), -1.0)
        t.copy_(src)
        expected = src.numpy()
    else:
        t[2:4, 1:3].copy_(torch.zeros(2, 2))
        expected = np.arange(30, dtype=np.float32).reshape(5, 6)
        expected[2:4, 1:3] = 0
    np.testing.assert_array_equal(np.array(torch_mlx.to_mlx(t)), expected)


def test_arrays_are_never_donated():
    # MLX reuses a uniquely referenced input buffer for an op's output unless MLX does not own
    # it; arrays over torch storage must never be overwritten that way.
    t = torch.ones(1024, device="mlx")
    out = mx.exp(torch_mlx.to_mlx(t) * 0)  # the temporary input array dies here
    mx.eval(out)
    assert t.cpu().eq(1).all()


def test_drop_torch_side_first():
    t = torch.arange(1000, dtype=torch.float32, device="mlx")
    a = torch_mlx.to_mlx(t[10:20])
    del t
    gc.collect()
    assert np.array(a).tolist() == list(range(10, 20))


def test_drop_array_side_first():
    a = mx.arange(1000, dtype=mx.float32) + 0
    t = torch_mlx.from_mlx(a)
    del a
    gc.collect()
    assert t[10:13].cpu().tolist() == [10, 11, 12]


def test_round_trips_do_not_leak():
    t = torch.randn(256, 256).to("mlx")
    for _ in range(100):  # warm up MLX's caches
        torch_mlx.from_mlx(torch_mlx.to_mlx(t))
    gc.collect()
    start = mx.get_active_memory()
    for _ in range(10_000):
        a = torch_mlx.to_mlx(t)
        b = torch_mlx.from_mlx(a)
        del a, b
    gc.collect()
    assert mx.get_active_memory() == start


def test_storage_outlives_arrays_only_as_long_as_needed():
    gc.collect()
    start = mx.get_active_memory()
    t = torch.empty(1 << 20, device="mlx")  # 4 MiB
    a = torch_mlx.to_mlx(t)
    assert mx.get_active_memory() >= start + (4 << 20)
    del t
    gc.collect()
    assert mx.get_active_memory() >= start + (4 << 20)  # the array still holds it
    del a
    gc.collect()
    assert mx.get_active_memory() == start


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_round_trip(dtype):
    cpu = torch.arange(12).reshape(3, 4).to(dtype)
    t = cpu.to("mlx")
    a = torch_mlx.to_mlx(t)
    assert _C.array_data_address(a) == t.data_ptr()
    back = torch_mlx.from_mlx(a)
    assert back.dtype == dtype
    assert torch.equal(back.cpu(), cpu)


def test_to_mlx_rejects_cpu_tensors():
    with pytest.raises(RuntimeError, match="to_mlx expects a tensor on device 'mlx'"):
        torch_mlx.to_mlx(torch.ones(2))


def test_from_mlx_rejects_float64():
    with pytest.raises(TypeError, match="float64"):
        torch_mlx.from_mlx(mx.array([1.0], dtype=mx.float64))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbol tables: Linux")
def test_extension_exports_only_its_init_function():
    # csrc/exports.map: anything else exported could be bound by libmlx.so in place of its own
    # libstdc++ (on the H100 image every mx.compile crashed inside such a borrowed function).
    import shutil
    import subprocess

    assert shutil.which("nm"), "binutils' nm is needed to read the extension's symbols"
    names = subprocess.run(["nm", "-D", "--defined-only", torch_mlx._C.__file__],
                           capture_output=True, text=True, check=True).stdout.split()
    assert [n for n in names if not n.startswith("0") and len(n) > 1] == ["PyInit__C"]


def test_a_lent_buffer_is_written_in_place_and_taken_back():
    """lend_buffer / finish_lend, the loan behind compiled graphs' in-place cache writes: the
    scatter MLX computes on the lent array lands in the tensor's own buffer."""
    t = torch.zeros(4, 3, device="mlx")
    address = t.data_ptr()
    lent = _C.lend_buffer(t)
    assert lent is not None and lent.shape == (4, 3)
    rows = mx.array([2, 0])
    result = _C.scatter(lent, [rows], mx.array([[[1.0, 2, 3]], [[4.0, 5, 6]]]), [0])
    del lent  # the scatter must be the lent array's only holder when it runs
    mx.async_eval(result)
    _C.finish_lend(t, result)
    assert t.data_ptr() == address
    assert t.cpu().tolist() == [[4, 5, 6], [0, 0, 0], [1, 2, 3], [0, 0, 0]]
    t.add_(1)  # the storage holds its buffer again
    assert t.cpu()[1].tolist() == [1, 1, 1]


def test_a_loan_is_refused_or_given_back_whole():
    base = torch.zeros(4, 3, device="mlx")
    assert _C.lend_buffer(base[1:]) is None  # a view past the buffer's first byte
    # a tensor over an mx.array's buffer: the array may be read elsewhere, nothing to lend
    assert _C.lend_buffer(torch_mlx.from_mlx(mx.zeros((4, 3)) + 1)) is None
    # a result that is not in the lent buffer is refused; the loan can still be given back
    lent = _C.lend_buffer(base)
    elsewhere = mx.zeros((4, 3)) + 1
    with pytest.raises(RuntimeError, match="launch the write"):
        _C.finish_lend(base, elsewhere)
    mx.eval(elsewhere)
    with pytest.raises(RuntimeError, match="out of place"):
        _C.finish_lend(base, elsewhere)
    _C.finish_lend(base, lent)
    del lent
    base.fill_(2)
    assert base.cpu().sum().item() == 24
    # scatter_in_place (a loan and a scatter) with a bad argument keeps the buffer
    with pytest.raises(ValueError):
        _C.scatter_in_place(base, [mx.array([0])], mx.ones((1, 1, 5)), [0])
    base.add_(1)
    assert base.cpu().sum().item() == 36
