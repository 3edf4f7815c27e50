"""The MLX overrides of vLLM custom ops against each op's own forward_native (on the CPU).

The model classes ask for vLLM's op (RMSNorm, RotaryEmbedding, ...); CustomOp.register_oot makes
vLLM build the MLX subclass instead, and with the platform active its forward is forward_oot.
"""
import copy

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.rotary_embedding import (
    Llama3RotaryEmbedding,
    RotaryEmbedding,
    YaRNScalingRotaryEmbedding,
)

import vllm_metal.ops  # noqa: F401  (the platform imports it; explicit for this unit test)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def vllm_config():
    with set_current_vllm_config(VllmConfig()):
        yield


def on_mlx(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to("mlx")


# vLLM's own tolerances for custom-op kernels against forward_native
# (tests/kernels/allclose_default.py upstream): two correct kernels in half precision may round
# an intermediate differently.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
RTOL = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def assert_close(got, expected):
    torch.testing.assert_close(got.cpu(), expected, atol=ATOL[expected.dtype],
                               rtol=RTOL[expected.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [RMSNorm, GemmaRMSNorm])
def test_rms_norms(cls, dtype):
    torch.manual_seed(0)
    norm = cls(256, eps=1e-5)
    assert type(norm).__name__ == "MLX" + cls.__name__
    assert norm.forward == norm.forward  # bound
    assert norm._forward_method == norm.forward_oot
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256) * 0.3 + (0 if cls is GemmaRMSNorm else 1))
    norm = norm.to(dtype)
    x = torch.randn(7, 256, dtype=dtype)
    residual = torch.randn(7, 256, dtype=dtype)
    mlx_norm = on_mlx(norm)
    assert_close(mlx_norm.forward_oot(x.to("mlx")), norm.forward_native(x))
    got_out, got_residual = mlx_norm.forward_oot(x.to("mlx"), residual.to("mlx"))
    want_out, want_residual = norm.forward_native(x.clone(), residual.clone())
    assert_close(got_out, want_out)
    assert_close(got_residual, want_residual)


def _ropes():
    yield RotaryEmbedding(64, 64, 2048, 10000.0, True, torch.float32)  # neox, full
    yield RotaryEmbedding(64, 64, 2048, 10000.0, False, torch.float32)  # GPT-J interleaved
    yield RotaryEmbedding(64, 32, 2048, 10000.0, True, torch.float32)  # partial rotary
    yield Llama3RotaryEmbedding(64, 64, 2048, 500000.0, True, torch.float32, 8.0, 1.0, 4.0, 1024)
    yield YaRNScalingRotaryEmbedding(64, 64, 1024, 10000.0, True, 4.0, torch.float32)


def assert_rope_close(rope, positions, query, key, got_q, got_k):
    """float32: vLLM's kernel tolerance against forward_native. Half types: at least as close to
    the exact rotation (forward_native in float64 on the same inputs) as forward_native itself
    is. forward_native rounds x * cos and y * sin to the half type before adding them; MLX's
    fused rope (the GPU path) rounds once, so the two differ by an ulp here and there and an
    elementwise tolerance between them measures only who rounds where."""
    native_q, native_k = copy.deepcopy(rope).forward_native(positions, query.clone(), key.clone())
    if query.dtype == torch.float32:
        assert_close(got_q, native_q)
        assert_close(got_k, native_k)
        return
    exact_q, exact_k = copy.deepcopy(rope).forward_native(positions, query.double(), key.double())
    for got, native, exact in ((got_q, native_q, exact_q), (got_k, native_k, exact_k)):
        assert got.dtype == native.dtype and got.shape == native.shape
        ours = (got.cpu().double() - exact).abs().max().item()
        theirs = (native.double() - exact).abs().max().item()
        assert ours <= theirs, f"rope error {ours:.3g} > forward_native's {theirs:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(5))
def test_rotary_embeddings(index, dtype):
    torch.manual_seed(0)
    rope = list(_ropes())[index]
    assert type(rope).__name__.startswith("MLX")
    assert rope._forward_method == rope.forward_oot
    positions = torch.tensor([0, 1, 2, 17, 500, 1023, 3, 4])
    query = torch.randn(8, 4 * 64, dtype=dtype)
    key = torch.randn(8, 2, 64, dtype=dtype)  # keys may come with their head axis
    got_q, got_k = on_mlx(rope).forward_oot(positions.to("mlx"), query.to("mlx"),
                                            key.to("mlx"))
    assert got_q.shape == query.shape and got_k.shape == key.shape
    assert_rope_close(rope, positions, query, key, got_q, got_k)
    got_q_alone, no_key = on_mlx(rope).forward_oot(positions.to("mlx"), query.to("mlx"))
    assert no_key is None
    torch.testing.assert_close(got_q_alone.cpu(), got_q.cpu(), rtol=0, atol=0)


# which ropes are plain rotations (mx.fast.rope on the GPU): YaRN scales cos and sin by its mscale
PLAIN_ROTATION = [True, True, True, True, False]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(5))
def test_rotary_embeddings_gpu_path(index, dtype, monkeypatch):
    """The GPU's way (mx.fast.rope with the module's frequencies, where its cache is a plain
    rotation) against forward_native, run here by taking the GPU branch on MLX's CPU."""
    from vllm_metal.ops import rotary

    monkeypatch.setattr(rotary, "cpu_backend", lambda: False)
    torch.manual_seed(0)
    rope = list(_ropes())[index]
    assert (rope.mlx_rope_wavelengths is not None) == PLAIN_ROTATION[index]
    calls = {"fast": 0}
    fast_rope = rotary.mx.fast.rope

    def counting(*args, **kwargs):
        calls["fast"] += 1
        return fast_rope(*args, **kwargs)

    monkeypatch.setattr(rotary.mx.fast, "rope", counting)
    positions = torch.tensor([0, 1, 2, 17, 500, 1023, 3, 4])
    query = torch.randn(8, 4 * 64, dtype=dtype)
    key = torch.randn(8, 2, 64, dtype=dtype)
    got_q, got_k = on_mlx(rope).forward_oot(positions.to("mlx"), query.to("mlx"),
                                            key.to("mlx"))
    assert calls["fast"] == (2 if PLAIN_ROTATION[index] else 0)
    assert got_q.shape == query.shape and got_k.shape == key.shape
    assert_rope_close(rope, positions, query, key, got_q, got_k)


@pytest.mark.parametrize("rows", [4096, 10000])
def test_rope_check_under_a_bfloat16_default_dtype(rows):
    # vLLM builds a model's layers with torch's default dtype set to the model's: the check's
    # sampled positions must not take it (a bfloat16 linspace rounds 4095 up to 4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        rope = RotaryEmbedding(64, 64, rows, 10000.0, True, torch.float32)
    finally:
        torch.set_default_dtype(default)
    assert rope.mlx_rope_wavelengths is not None and len(rope.mlx_rope_wavelengths) == 32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [SiluAndMul, lambda: GeluAndMul("none"),
                                  lambda: GeluAndMul("tanh")])
def test_gated_activations(make, dtype):
    torch.manual_seed(0)
    op = make()
    assert type(op).__name__.startswith("MLX")
    assert op._forward_method == op.forward_oot
    x = torch.randn(5, 3, 2 * 96, dtype=dtype) * 3
    assert_close(op.forward_oot(x.to("mlx")), op.forward_native(x))
