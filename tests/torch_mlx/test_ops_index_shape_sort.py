"""Indexing, shape and sorting behaviour that the OpInfo sweep does not reach: CPU index tensors,
views that must alias, backward ops, NaN and tie rules, errors, and the decomposition pass."""
import math

import pytest
import torch
import torch.nn.functional as F

import torch_mlx  # noqa: F401
from torch_mlx.ops import decompositions, registry


def _same(fn, *tensors, grad=False):
    """fn on CPU tensors and on "mlx" copies gives the same results (and gradients)."""
    cpu = [t.detach().clone().requires_grad_(grad) if t.is_floating_point() else t
           for t in tensors]
    dev = [t.detach().to("mlx").requires_grad_(grad) if t.is_floating_point() else t.to("mlx")
           for t in tensors]
    a, b = fn(*cpu), fn(*dev)
    torch.testing.assert_close(b.cpu() if isinstance(b, torch.Tensor) else
                               type(b)(x.cpu() for x in b), a, equal_nan=True)
    if grad:
        g = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
        a.backward(g)
        b.backward(g.to("mlx"))
        for x, y in zip(cpu, dev):
            if x.requires_grad:
                torch.testing.assert_close(y.grad.cpu(), x.grad)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_index_with_cpu_index_tensors():
    x = torch.arange(24.0).reshape(4, 6)
    d = x.to("mlx")
    i = torch.tensor([3, 0, -1])
    torch.testing.assert_close(d[i].cpu(), x[i])
    torch.testing.assert_close(d[:, i].cpu(), x[:, i])
    torch.testing.assert_close(d[torch.tensor([True, False, True, True])].cpu(),
                               x[torch.tensor([True, False, True, True])])


@pytest.mark.parametrize("key", [
    lambda: (torch.tensor([[0, 2], [1, 3]]), slice(None), torch.tensor([1, 0])),  # split
    lambda: (slice(None), torch.tensor([[0, 2], [1, 3]]), torch.tensor([1, 0])),  # adjacent
    lambda: (Ellipsis, torch.tensor([4, 0, 4])),
    lambda: (None, torch.tensor([1]), slice(1, 3)),
    lambda: (torch.zeros(4, 5, dtype=torch.bool),),
])
def test_advanced_index_layouts(key):
    x = _randn(4, 5, 6)
    k = key()
    mk = tuple(t.to("mlx") if isinstance(t, torch.Tensor) else t for t in k)
    torch.testing.assert_close(x.to("mlx")[mk].cpu(), x[k])


def test_index_errors_match_cpu():
    x = torch.zeros(3, 4)
    for t in (x, x.to("mlx")):
        dev = t.device
        with pytest.raises(IndexError, match="out of bounds for dimension 0 with size 3"):
            t[torch.tensor([3], device=dev)]
        with pytest.raises(IndexError, match="too many indices"):
            t[torch.tensor([0], device=dev), torch.tensor([0], device=dev),
              torch.tensor([0], device=dev)]
        with pytest.raises(IndexError, match="tensors used as indices must be long"):
            t[torch.tensor([1.0], device=dev)]
        with pytest.raises(IndexError, match="index out of range in self"):
            t.index_select(0, torch.tensor([-1], device=dev))
        with pytest.raises(RuntimeError, match="index -1 is out of bounds"):
            t.gather(0, torch.tensor([[-1]], device=dev))


def test_unfold_is_a_view():
    x = torch.arange(10.0, device="mlx")
    u = x.unfold(0, 3, 2)
    assert u.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert u.shape == (4, 3) and u.stride() == (2, 1)
    x[2] = 100.0
    assert u[1, 0].item() == 100.0


def test_view_as_real_and_complex_alias():
    z = torch.randn(3, 2, dtype=torch.complex64).to("mlx")
    r = torch.view_as_real(z)
    assert r.shape == (3, 2, 2) and r.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    torch.testing.assert_close(r.cpu(), torch.view_as_real(z.cpu()))
    back = torch.view_as_complex(r)
    torch.testing.assert_close(back.cpu(), z.cpu())


@pytest.mark.parametrize("mode,pad,shape", [
    ("reflect", (2, 1), (2, 3, 5)), ("reflect", (2, 1, 1, 2), (2, 3, 5, 4)),
    ("reflect", (1, 1, 2, 1, 1, 1), (1, 2, 3, 5, 4)), ("replicate", (3, 1), (2, 3, 5)),
    ("replicate", (2, 1, 1, 3), (2, 3, 5, 4)), ("replicate", (2, 1, 1, 2, 1, 1), (1, 2, 3, 5, 4)),
    ("replicate", (-1, 2), (2, 3, 5)), ("constant", (1, -2, 2, 0), (2, 3, 5, 4)),
])
def test_pad_forward_backward(mode, pad, shape):
    _same(lambda x: F.pad(x, pad, mode=mode) * 1.0, _randn(*shape), grad=True)


def test_unfold_backward():
    _same(lambda x: x.unfold(1, 3, 2) * 1.0, _randn(2, 7, 3), grad=True)
    _same(lambda x: x.unfold(0, 2, 3) * 1.0, _randn(8), grad=True)


@pytest.mark.parametrize("grad_shape, input_sizes, dim, size, step", [
    ((1, 33, 8), [2, 72], 1, 8, 2),  # one row for every batch row (torch._refs.istft's envelope)
    ((1, 1, 8), [2, 72], 1, 8, 2),  # fewer windows than fit: only those are added back
    ((2, 1, 8), [2, 72], 1, 8, 2),
    ((3, 1, 4, 3), [3, 2, 9], 2, 3, 2),
    ((4, 3), [5], 0, 3, 2),  # more windows than fit: the overhang adds nothing
    ((1, 0), [0], 0, 0, 1),  # empty input
    ((3, 0, 1), [3, 0], 0, 1, 1),
    ((0,), [], 0, 0, 1),  # 0-d input, a size-0 window: the CPU's gradient is 0-d
])
def test_unfold_backward_broadcasts_its_grad(grad_shape, input_sizes, dim, size, step):
    # issue 22: a grad that broadcasts to the input (torch._refs.istft's window envelope) got
    # the grad's shape instead of the input's
    _same(lambda g: torch.ops.aten.unfold_backward(g, input_sizes, dim, size, step),
          _randn(*grad_shape))


def test_istft_of_a_batch():
    x, window = _randn(3, 64), torch.hann_window(16)
    spec = torch.stft(x, 16, hop_length=4, window=window, return_complex=True)
    _same(lambda s, w: torch.istft(s, 16, hop_length=4, window=w), spec, window)
    _same(lambda s, w: torch._refs.istft(s, 16, hop_length=4, window=w), spec, window)


def test_sort_nan_and_ties_descending_is_stable():
    x = torch.tensor([1.0, math.nan, 3.0, 1.0, math.nan, -0.0, 0.0, 3.0])
    for descending in (False, True):
        _same(lambda t: torch.sort(t, stable=True, descending=descending), x)
    distinct = torch.tensor([1.0, math.nan, 3.0, 2.0, -0.5, 0.0])  # topk's tie order is CPU's own
    _same(lambda t: torch.topk(t, 3), distinct)
    _same(lambda t: torch.topk(t, 3, largest=False), distinct)


def test_median_mode_cummax_nan_rules():
    x = torch.tensor([[1.0, math.nan, 3.0, math.nan, 0.0], [2.0, 2.0, 1.0, 5.0, 1.0]])
    _same(lambda t: t.median(1), x)
    _same(lambda t: t.nanmedian(1), x)
    _same(lambda t: t.nanmedian(), torch.full((4,), math.nan))
    _same(lambda t: t.cummax(1), x)
    _same(lambda t: t.cummin(1), x)
    _same(lambda t: t.mode(1), torch.tensor([[3.0, 1, 3, 1], [5, 5, 2, 5]]))


def test_searchsorted_nan_and_sorter():
    seq = torch.tensor([[1.0, 2.0, 2.0, 5.0, math.nan], [0.0, 1.0, 1.0, 1.0, 4.0]])
    vals = torch.tensor([[2.0, math.nan, 6.0], [1.0, -1.0, 4.0]])
    for right in (False, True):
        _same(lambda s, v: torch.searchsorted(s, v, right=right), seq, vals)
    unsorted = torch.tensor([5.0, 1.0, 3.0])
    _same(lambda s, v, o: torch.searchsorted(s, v, sorter=o), unsorted,
          torch.tensor([2.0, 6.0]), torch.argsort(unsorted))


def test_scatter_reduce_nan_propagates():
    src = torch.tensor([math.nan, 1.0, 2.0, -1.0])
    idx = torch.tensor([0, 0, 2, 2])
    for reduce in ("amax", "amin"):
        for include_self in (True, False):
            _same(lambda s, i, v: s.scatter_reduce(0, i, v, reduce, include_self=include_self),
                  torch.tensor([0.0, 5.0, math.nan]), idx, src)


def test_data_dependent_ops():
    x = torch.tensor([[0, 3, 0], [2, 0, 2]])
    _same(torch.nonzero, x)
    _same(lambda t: torch.unique(t, return_inverse=True, return_counts=True), x)
    _same(lambda t: torch.unique(t, dim=1, return_inverse=True, return_counts=True), x)
    _same(lambda r: torch.repeat_interleave(r), torch.tensor([2, 0, 3, 1]))
    _same(lambda t: torch.bincount(t, minlength=6), torch.tensor([1, 1, 4, 0]))
    _same(lambda t, w: torch.bincount(t, w), torch.tensor([1, 1, 4]), torch.tensor([.5, 1, 2]))


def test_embedding_max_norm_renormalises_rows_in_place():
    w = _randn(6, 4) * 3
    idx = torch.tensor([[1, 4, 1]])
    wc, wd = w.clone(), w.to("mlx")
    ptr = wd.data_ptr()
    a = F.embedding(idx, wc, max_norm=1.5)
    b = F.embedding(idx.to("mlx"), wd, max_norm=1.5)
    assert wd.data_ptr() == ptr
    torch.testing.assert_close(b.cpu(), a)
    torch.testing.assert_close(wd.cpu(), wc)


# ----------------------------------------------------------------------------------------------
# The decomposition pass


def test_decompositions_follow_the_selection_rule():
    for name in decompositions.SELECTED:
        assert name in decompositions.EXACT
        assert name in registry.TORCH_KERNELS and name not in registry.TABLE
        op = registry.overload(name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "PrivateUse1")
        for key in ("CompositeImplicitAutograd", "CompositeExplicitAutograd",
                    "CompositeExplicitAutogradNonFunctional"):
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key)
    for name in decompositions.EXACT:
        assert registry.overload(name) in torch._decomp.decomposition_table


@pytest.mark.parametrize("fn,shapes", [
    (lambda x: torch.trace(x), [(4, 5)]),
    (lambda x: torch.count_nonzero(x > 0, dim=1) * x.sum(), [(3, 5)]),
    (lambda x: F.fold(x, (4, 5), (2, 2)), [(2, 12, 12)]),
    (lambda x: F.unfold(x, (2, 3), padding=1, stride=2), [(2, 3, 5, 6)]),
    (lambda x, y: F.huber_loss(x, y, delta=0.5), [(3, 4), (3, 4)]),
    (lambda x, y: F.smooth_l1_loss(x, y, beta=0.5), [(3, 4), (3, 4)]),
])
def test_decomposed_ops_forward_backward(fn, shapes):
    _same(fn, *[_randn(*s, seed=i) for i, s in enumerate(shapes)], grad=True)
