"""torch_mlx's CPU kernels for the decoder layer (csrc/fast_cpu.cpp) against vLLM's references.

The vLLM op tests (test_custom_ops.py, test_attention.py) reach these kernels with the inputs a
model gives them; here they also get views with other strides (slices of a fused projection,
transposes), half precision, extreme values and bad input.
"""
import mlx.core as mx
import numpy as np
import pytest
import torch
from vllm import ir
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

import torch_mlx
from torch_mlx import _C

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# vLLM's tolerances for custom-op kernels against forward_native (as in test_custom_ops.py)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
RTOL = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def vllm_config():
    with set_current_vllm_config(VllmConfig()):
        yield


def to_mx(t: torch.Tensor) -> mx.array:
    """The tensor's values as an MLX array with the same strides: its whole storage moves to
    "mlx" and the view is taken there, then crosses to MLX without a copy."""
    storage = t.detach().as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    view = storage.to("mlx").as_strided(t.shape, t.stride(), t.storage_offset())
    return torch_mlx.to_mlx(view)


def to_torch(a: mx.array) -> torch.Tensor:
    return torch_mlx.from_mlx(a).cpu()


def assert_close(got: mx.array, expected: torch.Tensor):
    torch.testing.assert_close(to_torch(got), expected, atol=ATOL[expected.dtype],
                               rtol=RTOL[expected.dtype])


def strided_variants(rows: int, dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(rows, dim, generator=gen).to(dtype)
    # a slice of a wider row (a fused projection's output), and a transposed buffer
    sliced = torch.randn(rows, 3 * dim, generator=gen).to(dtype)[:, dim: 2 * dim]
    transposed = torch.randn(dim, rows, generator=gen).to(dtype).t()
    return {"contiguous": plain, "sliced": sliced, "transposed": transposed}


@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_kind", ["none", "same", "gemma"])
def test_rms_norm_matches_vllm(layout, dtype, weight_kind):
    x = strided_variants(5, 96, dtype)[layout]
    residual = strided_variants(5, 96, dtype)["transposed"] * 0.5
    gen = torch.Generator().manual_seed(1)
    raw = (torch.randn(96, generator=gen) * 0.3 + 1).to(dtype)
    weight, offset = {"none": (None, 0.0), "same": (raw, 0.0), "gemma": (raw, 1.0)}[weight_kind]
    # vLLM's references: Gemma passes weight.float() + 1
    ref_weight = None if weight is None else (weight.float() + 1 if offset else weight)
    w = None if weight is None else to_mx(weight)

    (out,) = _C.rms_norm(to_mx(x), w, 1e-5, offset)
    assert_close(out, ir.ops.rms_norm.impls["native"].impl_fn(x, ref_weight, 1e-5))

    out, new_residual = _C.rms_norm(to_mx(x), w, 1e-5, offset, to_mx(residual))
    want_out, want_residual = ir.ops.fused_add_rms_norm.impls["native"].impl_fn(
        x, residual, ref_weight, 1e-5)
    assert_close(out, want_out)
    assert_close(new_residual, want_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox,rotary_dim", [(True, 64), (False, 64), (True, 32)])
@pytest.mark.parametrize("layout", ["fused_qkv_slice", "heads_transposed"])
def test_rope_matches_vllm(dtype, neox, rotary_dim, layout):
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(64, rotary_dim, 2048, 10000.0, neox, torch.float32)
    positions = torch.tensor([0, 1, 5, 17, 500, 2047])
    if layout == "fused_qkv_slice":  # query [T, 4 * 64] inside qkv [T, 8 * 64]
        x = torch.randn(6, 8 * 64, generator=gen).to(dtype)[:, 64: 5 * 64]
    else:  # [T, H, D] whose heads axis is not the outer one in memory
        x = torch.randn(4, 6, 64, generator=gen).to(dtype).transpose(0, 1)
    want, _ = rope.forward_native(positions, x.clone().reshape(6, -1), None)
    cache = rope._match_cos_sin_cache_dtype(x)
    got = _C.rope(to_mx(x), to_mx(positions), to_mx(cache), 64, rotary_dim, neox)
    assert tuple(got.shape) == tuple(x.shape)
    assert_close(got.reshape(6, -1), want)


def test_rope_position_outside_the_cache_raises_at_eval():
    x = mx.zeros((2, 64))
    cache = mx.zeros((16, 64))
    with pytest.raises(RuntimeError, match="position 16 is outside the cos/sin cache"):
        mx.eval(_C.rope(x, mx.array([0, 16]), cache, 64, 64, True))
    mx.eval(_C.rope(x, mx.array([0, 15]), cache, 64, 64, True))  # and MLX keeps working


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_silu_and_mul_matches_torch(dtype, layout):
    x = strided_variants(7, 2 * 80, dtype)[layout] * 4
    x[0, :8] = torch.tensor([-200.0, -104.0, -88.0, -30.0, 0.0, 30.0, 88.0, 200.0]).to(dtype)
    want = torch.nn.functional.silu(x[..., :80]) * x[..., 80:]
    assert_close(_C.silu_and_mul(to_mx(x)), want)


def reference_decode(q, keys, values, scale, window):
    """q [Hq, D] attending keys/values [S, H, D] (the whole sequence, last position = q's)."""
    num_keys = keys.shape[0]
    start = 0 if window is None else max(0, num_keys - window)
    group = q.shape[0] // keys.shape[1]
    k = keys[start:].repeat_interleave(group, dim=1).float()
    v = values[start:].repeat_interleave(group, dim=1).float()
    scores = torch.einsum("hd,khd->hk", q.float(), k) * scale
    return torch.einsum("hk,khd->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_decode_attention_matches_reference(dtype, layout, window):
    gen = torch.Generator().manual_seed(0)
    block_size, kv_heads, q_heads, head_size, num_blocks = 4, 2, 6, 32, 24
    lengths = [1, 9, 23]
    if layout == "LBNHC":  # physical [blocks, tokens, heads, K|V]; logical [blocks, H, N, K|V]
        cache = torch.zeros(num_blocks, block_size, kv_heads, 2 * head_size).transpose(1, 2)
    else:
        cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_size)
    table = torch.zeros(len(lengths), 6, dtype=torch.int32)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    keys, values = [], []
    for r, n in enumerate(lengths):
        k = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
        for p in range(n):
            if p % block_size == 0:
                table[r, p // block_size] = free.pop()
            block = table[r, p // block_size]
            cache[block, :, p % block_size, :head_size] = k[p].float()
            cache[block, :, p % block_size, head_size:] = v[p].float()
        keys.append(k), values.append(v)
    cache = cache.to(dtype)
    query = torch.randn(len(lengths), q_heads, head_size, generator=gen).to(dtype)
    scale = head_size ** -0.5
    got = to_torch(_C.paged_decode_attention(
        to_mx(query), to_mx(cache), to_mx(table), mx.array(lengths), scale, window, head_size))
    assert got.shape == (len(lengths), q_heads, head_size) and got.dtype == dtype
    for r in range(len(lengths)):
        want = reference_decode(query[r], keys[r], values[r], scale, window)
        # float32 reference of half inputs: the kernel rounds scores and probabilities to the
        # query's dtype, as the op graph it replaces does
        tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(got[r].float(), want, atol=tol, rtol=tol)


def test_paged_decode_attention_refuses_a_block_outside_the_cache():
    cache = mx.zeros((4, 1, 2, 16))
    query = mx.zeros((1, 1, 8))
    with pytest.raises(RuntimeError, match="block 9 is outside the cache"):
        mx.eval(_C.paged_decode_attention(query, cache, mx.array([[9]], mx.int32),
                                          mx.array([2]), 1.0, None, 8))
    with pytest.raises(RuntimeError, match="needs 2 blocks; its block table has 1"):
        mx.eval(_C.paged_decode_attention(query, cache, mx.array([[1]], mx.int32),
                                          mx.array([3]), 1.0, None, 8))
    out = _C.paged_decode_attention(query, cache, mx.array([[1]], mx.int32), mx.array([2]),
                                    1.0, None, 8)
    assert np.array(out).shape == (1, 1, 8)


@pytest.mark.parametrize("call,error,message", [
    (lambda: _C.rms_norm(mx.zeros((2, 4), mx.int32), None, 1e-5), TypeError, "float32"),
    (lambda: _C.rms_norm(mx.zeros((2, 4)), mx.zeros(3), 1e-5), ValueError, "weight"),
    (lambda: _C.rope(mx.zeros((2, 60)), mx.array([0, 1]), mx.zeros((8, 64)), 64, 64, True),
     ValueError, "head_size"),
    (lambda: _C.rope(mx.zeros((2, 64)), mx.array([0.0, 1.0]), mx.zeros((8, 64)), 64, 64, True),
     TypeError, "int32 or int64"),
    (lambda: _C.silu_and_mul(mx.zeros((2, 5))), ValueError, "even"),
    (lambda: _C.paged_decode_attention(mx.zeros((1, 3, 8)), mx.zeros((4, 2, 2, 16)),
                                       mx.zeros((1, 1), mx.int32), mx.array([1]), 1.0, None, 8),
     ValueError, "head"),
])
def test_bad_input_is_refused_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
