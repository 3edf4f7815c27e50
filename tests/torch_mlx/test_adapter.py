"""The eager kernel adapter (torch_mlx/ops/registry.py with its C++ walkers in csrc/adapter.cpp):
meta-cache keys, argument conversion and result wrapping, checked through ordinary calls."""
import pytest
import torch

import mlx.core as mx
import torch_mlx
from torch_mlx.ops.registry import lowering

LIB = torch.library.Library("torch_mlx_adapter_test", "DEF")
LIB.define("same(Tensor x) -> Tensor")
LIB.define("wrong_shape(Tensor x) -> Tensor")
torch.library.register_fake("torch_mlx_adapter_test::same", lambda x: torch.empty_like(x), lib=LIB)
torch.library.register_fake("torch_mlx_adapter_test::wrong_shape", lambda x: torch.empty_like(x),
                            lib=LIB)


@lowering("torch_mlx_adapter_test::same")
def _same(x):
    return x  # hands back the input's own buffer


@lowering("torch_mlx_adapter_test::wrong_shape")
def _wrong_shape(x):
    return mx.concatenate([x, x])


def test_scalar_types_are_part_of_the_cache_key():
    # 1, 1.0 and True are equal and hash alike in Python; their promotions differ.
    x = torch.arange(4, dtype=torch.int32).to("mlx")
    for _ in range(2):  # the second round is served from the meta cache
        assert (x + 1).dtype == torch.int32
        assert (x + 1.0).dtype == torch.float32
        assert (x + True).dtype == torch.int32
        assert (x > 1.5).dtype == torch.bool
        torch.testing.assert_close((x + 1.5).cpu(), torch.arange(4) + 1.5)


def test_layout_is_part_of_the_cache_key():
    a = torch.randn(3, 4)
    for t in (a, a.t().contiguous().t(), a[:, ::2].contiguous(), a.t()):
        torch.testing.assert_close((t.to("mlx") * 2).cpu(), t * 2)
        torch.testing.assert_close(t.to("mlx").sum(0).cpu(), t.sum(0))


def test_sequences_kwargs_and_cpu_scalars():
    a, b = torch.randn(2, 3), torch.randn(4, 3)
    ma, mb = a.to("mlx"), b.to("mlx")
    torch.testing.assert_close(torch.cat([ma, mb], dim=0).cpu(), torch.cat([a, b], dim=0))
    torch.testing.assert_close(torch.cat((ma, mb)).cpu(), torch.cat((a, b)))
    torch.testing.assert_close(torch.stack((ma, ma), dim=1).cpu(), torch.stack((a, a), dim=1))
    torch.testing.assert_close(torch.add(ma, ma, alpha=2).cpu(), torch.add(a, a, alpha=2))
    torch.testing.assert_close(ma.reshape(torch.Size([3, 2])).cpu(), a.reshape(3, 2))
    torch.testing.assert_close((ma * torch.tensor(3.0)).cpu(), a * 3)  # CPU 0-d tensors mix in
    with pytest.raises(RuntimeError, match="same device"):
        ma + torch.randn(2, 3)


def test_promotion_casts_tensor_inputs():
    h = torch.randn(5, dtype=torch.float16)
    i = torch.arange(5, dtype=torch.int64)
    torch.testing.assert_close((h.to("mlx") + i.to("mlx")).cpu(), h + i)
    torch.testing.assert_close((i.to("mlx") * 0.5).cpu(), i * 0.5)


def test_a_result_on_an_input_buffer_is_copied():
    x = torch.arange(6.0).to("mlx")
    y = torch.ops.torch_mlx_adapter_test.same(x)
    assert torch_mlx._C.buffer_address(y) != torch_mlx._C.buffer_address(x)
    y.add_(1)
    torch.testing.assert_close(x.cpu(), torch.arange(6.0))
    torch.testing.assert_close(y.cpu(), torch.arange(6.0) + 1)


def _expanded_on_mlx(t, size):
    """t.expand(size) on "mlx" with the CPU's stride-0 layout (as OpInfo moves samples)."""
    return t.to("mlx").expand(size)


def test_a_result_with_broadcast_strides_is_made_dense():
    # MLX gives an elementwise op on a broadcast input that input's stride-0 layout; torch's
    # functional result is dense, and an in-place op on it must work (OpInfo's reference input
    # of mvlgamma with p = 1: arange(1).add(x.unsqueeze(-1)).lgamma_() raised the overlap error)
    base = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    x = _expanded_on_mlx(base, (3, 3))
    assert x.stride() == (0, 1)
    y = x * 2
    assert y.stride() == (3, 1)
    y.add_(1)
    torch.testing.assert_close(y.cpu(), base.expand(3, 3) * 2 + 1)
    compiled = torch.compile(lambda t: t * 2 + 1, backend="mlx")(x)
    assert compiled.stride() == (3, 1)
    compiled.add_(1)
    positive = _expanded_on_mlx(base.abs() + 2, (3, 1, 3))
    for p in (1, 3):
        torch.testing.assert_close(torch.mvlgamma(positive, p).cpu(),
                                   torch.mvlgamma((base.abs() + 2).expand(3, 1, 3), p))


def test_size_one_strides_are_torchs():
    # MLX keeps an input's stride on a size-1 dimension (it addresses nothing); torch's result
    # strides there are visible to dynamo's guards and stride checks, so they must be torch's.
    # A slice of a growing sequence, as transformers' generate feeds each decode step:
    calls = [lambda t: t + 1, torch.exp, lambda t: t.clone(memory_format=torch.contiguous_format),
             torch.clone, lambda t: t.float(), lambda t: t.to(torch.int32),
             lambda t: t.sum(-1, keepdim=True), lambda t: t * t]
    for shape, cut in (((1, 80), (slice(None), slice(-1, None))),
                       ((2, 40, 1), (slice(None), slice(-1, None)))):
        cpu = torch.arange(80.0).reshape(shape)[cut]
        on_mlx = torch.arange(80.0, device="mlx").reshape(shape)[cut]
        assert on_mlx.stride() == cpu.stride()
        for call in calls:
            expected, actual = call(cpu), call(on_mlx)
            assert actual.stride() == expected.stride(), (shape, expected.stride())
            torch.testing.assert_close(actual.cpu(), expected)


def test_a_result_of_the_wrong_shape_is_a_lowering_bug():
    x = torch.arange(6.0).to("mlx")
    expected = r"wrong_shape returned shape \(12,\), torch expects \(6,\)"
    with pytest.raises(AssertionError, match=expected):
        torch.ops.torch_mlx_adapter_test.wrong_shape(x)
