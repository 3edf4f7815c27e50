"""FFT family (torch_mlx/ops/fft.py): the cases OpInfo's fft samples do not reach: the aten
primitives with every normalization mode, onesided=False, out=, empty signals, half inputs."""
import pytest
import torch

import torch_mlx  # noqa: F401


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(actual, expected):
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("normalization", [0, 1, 2])
@pytest.mark.parametrize("onesided", [True, False])
def test_fft_r2c(normalization, onesided):
    x = _rand(3, 6, 5)
    for dim in ([2], [0, 2], [1, 2], [0, 1, 2]):
        _close(torch.ops.aten._fft_r2c(x.to("mlx"), dim, normalization, onesided),
               torch.ops.aten._fft_r2c(x, dim, normalization, onesided))


@pytest.mark.parametrize("normalization", [0, 1, 2])
@pytest.mark.parametrize("last_dim_size", [8, 9])
def test_fft_c2r(normalization, last_dim_size):
    x = _rand(3, 4, 5, dtype=torch.complex64)
    for dim in ([2], [1, 2], [0, 1, 2]):
        _close(torch.ops.aten._fft_c2r(x.to("mlx"), dim, normalization, last_dim_size),
               torch.ops.aten._fft_c2r(x, dim, normalization, last_dim_size))


@pytest.mark.parametrize("normalization", [0, 1, 2])
@pytest.mark.parametrize("forward", [True, False])
def test_fft_c2c(normalization, forward):
    x = _rand(4, 3, 6, dtype=torch.complex64)
    for dim in ([], [0], [2, 0], [0, 1, 2]):
        _close(torch.ops.aten._fft_c2c(x.to("mlx"), dim, normalization, forward),
               torch.ops.aten._fft_c2c(x, dim, normalization, forward))


def test_out_variants_write_into_out():
    x = _rand(4, 6)
    z = _rand(4, 6, dtype=torch.complex64)
    cases = [
        (torch.fft.rfft, x, {"dim": 1}),
        (torch.fft.fft2, z, {}),
        (torch.fft.irfft, z, {"n": 10}),
        (torch.fft.ihfft2, x, {}),
        (torch.fft.hfft, z, {"norm": "ortho"}),
    ]
    for fn, inp, kwargs in cases:
        expected = fn(inp, **kwargs)
        out = torch.empty(0, dtype=expected.dtype, device="mlx")
        result = fn(inp.to("mlx"), out=out, **kwargs)
        assert result is out
        _close(out, expected)


def test_empty_batch():
    # the CPU's MKL rejects an empty batch ("Inconsistent configuration parameters"); mlx
    # returns the empty result torch's shape rules give
    z = torch.empty(0, 4, dtype=torch.complex64, device="mlx")
    assert torch.fft.fft(z, dim=1).shape == (0, 4)
    assert torch.fft.irfft(z, dim=1).shape == (0, 6)
    assert torch.fft.rfft(torch.empty(0, 4, device="mlx"), dim=1).shape == (0, 3)
    assert torch.fft.fft2(torch.empty(3, 0, 4, device="mlx"), dim=(0, 2)).shape == (3, 0, 4)
    with pytest.raises(RuntimeError):  # an empty signal: torch's own check, before the device
        torch.fft.ifft(z, dim=0)


def test_noncontiguous_input():
    x = _rand(6, 8).t()[::2]
    _close(torch.fft.rfft2(x.to("mlx")), torch.fft.rfft2(x))
    z = _rand(6, 8, dtype=torch.complex64)[:, ::3]
    _close(torch.fft.fftn(z.to("mlx")), torch.fft.fftn(z))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_raise_as_on_cpu(dtype):
    x = _rand(8, dtype=dtype)
    with pytest.raises(RuntimeError):
        torch.fft.rfft(x)
    with pytest.raises(RuntimeError):
        torch.fft.rfft(x.to("mlx"))


def test_gradient_matches_cpu():
    x = _rand(4, 6)
    xc = x.clone().requires_grad_()
    xd = x.to("mlx").requires_grad_()
    torch.fft.rfft(xc, norm="ortho").abs().sum().backward()
    torch.fft.rfft(xd, norm="ortho").abs().sum().backward()
    _close(xd.grad, xc.grad)
