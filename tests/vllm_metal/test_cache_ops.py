"""KV-cache ops: writes and block copies happen in place and touch only their slots/blocks."""
import mlx.core as mx
import pytest
import torch

import torch_mlx
from vllm_metal.ops.cache import (copy_blocks, swap_blocks, write_kv_rows, write_kv_slots,
                                  zero_blocks)


def cache_and_snapshot(num_blocks=8, heads=2, block_size=4, head_size=3, token_major=True):
    if token_major:  # vLLM's LBNHC layout: physical [B, N, H, C] seen as logical [B, H, N, C]
        cache = torch.randn(num_blocks, block_size, heads, 2 * head_size).to("mlx").transpose(1, 2)
    else:
        cache = torch.randn(num_blocks, heads, block_size, 2 * head_size).to("mlx")
    return cache, cache.cpu()


@pytest.fixture(params=["scatter", "rows"], autouse=True)
def kv_write(request, monkeypatch):
    """Every write test runs through both paths (VLLM_METAL_KV_WRITE), and checks it was that
    path which wrote."""
    from vllm_metal.ops import cache as cache_ops

    monkeypatch.setenv("VLLM_METAL_KV_WRITE", request.param)
    before = dict(cache_ops.WRITES)
    yield request.param
    if cache_ops.WRITES != before:
        other = "rows" if request.param == "scatter" else "scatter"
        assert cache_ops.WRITES[other] == before[other], f"the {other} path wrote"


def test_write_kv_slots_writes_only_the_given_slots_in_place():
    for token_major in (True, False):
        cache, before = cache_and_snapshot(token_major=token_major)
        storage = cache.untyped_storage().data_ptr()
        key = torch.randn(3, 2, 3)
        value = torch.randn(3, 2, 3)
        slots = torch.tensor([5, 30, -1])  # block 1 offset 1, block 7 offset 2, padding
        write_kv_slots(cache, key.to("mlx"), value.to("mlx"), slots.to("mlx"))
        assert cache.untyped_storage().data_ptr() == storage
        after = cache.cpu()
        expected = before.clone()
        expected[1, :, 1, :3], expected[1, :, 1, 3:] = key[0], value[0]
        expected[7, :, 2, :3], expected[7, :, 2, 3:] = key[1], value[1]
        torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_write_kv_slots_accepts_strided_key_and_value():
    # vLLM hands attention views split from one fused qkv projection.
    cache, before = cache_and_snapshot()
    qkv = torch.randn(2, 4 * 2 * 3).to("mlx")
    key = qkv[:, 6:12].view(2, 2, 3)
    value = qkv[:, 12:18].view(2, 2, 3)
    write_kv_slots(cache, key, value, torch.tensor([0, 9]).to("mlx"))
    after = cache.cpu()
    torch.testing.assert_close(after[0, :, 0, :3], key.cpu()[0])
    torch.testing.assert_close(after[2, :, 1, 3:], value.cpu()[1])


def test_copy_zero_and_swap_blocks():
    cache, before = cache_and_snapshot()
    other, other_before = cache_and_snapshot()
    copy_blocks([cache, other], torch.tensor([[1, 4], [2, 6]]).to("mlx"))
    for c, b in ((cache, before), (other, other_before)):
        expected = b.clone()
        expected[4], expected[6] = b[1], b[2]
        torch.testing.assert_close(c.cpu(), expected, rtol=0, atol=0)

    zero_blocks(cache, [0, 3])
    assert bool((cache.cpu()[[0, 3]] == 0).all())

    host = torch.zeros(4, *cache.shape[1:])
    swap_blocks(cache, host, torch.tensor([[4, 1], [6, 3]]))  # offload to the CPU
    torch.testing.assert_close(host[[1, 3]], cache.cpu()[[4, 6]], rtol=0, atol=0)
    swap_blocks(host, cache, torch.tensor([[1, 7]]))  # and back
    torch.testing.assert_close(cache.cpu()[7], host[1], rtol=0, atol=0)


def test_write_keeps_the_cache_buffer():
    # The write lands in the cache's own bytes: the MLX buffer behind the cache is the same
    # object before and after (no new array, no copy of the cache).
    cache, _ = cache_and_snapshot(num_blocks=64)
    buffer = torch_mlx._C.buffer_address(cache)
    write_kv_slots(cache, torch.ones(1, 2, 3).to("mlx"), torch.ones(1, 2, 3).to("mlx"),
                   torch.tensor([17]).to("mlx"))
    assert torch_mlx._C.buffer_address(cache) == buffer


def test_lazy_write_is_read_through_its_result_and_shares_the_cache_buffer(kv_write):
    # In a compiled forward the write is a node of the step's MLX graph: nothing is written
    # until the graph is evaluated, a read of its result comes after the write, and the result
    # is the cache's own buffer.
    for token_major in (True, False):
        cache, before = cache_and_snapshot(token_major=token_major)
        key, value = mx.ones((2, 2, 3)), mx.full((2, 2, 3), 2.0)
        written = write_kv_rows(torch_mlx.to_mlx(cache), key, value, mx.array([6, 13]), cache)
        if kv_write == "rows":
            torch.testing.assert_close(cache.cpu(), before, rtol=0, atol=0)  # lazy: not yet
        _check_lazy_write(cache, before, key, value, written)


def _check_lazy_write(cache, before, key, value, written):
    # (scatter: the cache's buffer is lent to the write until it is evaluated, and a torch read
    # of the cache first finishes the write)
    block = mx.take(written.swapaxes(1, 2), mx.array([1]), axis=0)  # read through the result
    mx.eval(block)
    assert torch_mlx._C.buffer_address(written) == torch_mlx._C.buffer_address(cache)
    assert mx.array_equal(block[0, 2], mx.concatenate([key[0], value[0]], axis=-1)).item()
    expected = before.clone()
    expected[1, :, 2] = torch.cat([torch.ones(2, 3), torch.full((2, 3), 2.0)], dim=-1)
    expected[3, :, 1] = expected[1, :, 2]
    torch.testing.assert_close(cache.cpu(), expected, rtol=0, atol=0)


def test_write_to_a_slot_outside_the_cache_raises(kv_write):
    cache, before = cache_and_snapshot(num_blocks=2)  # 8 slots
    error = IndexError if kv_write == "scatter" else RuntimeError  # (rows: MLX's eval raises)
    with pytest.raises(error, match="slot 8 is outside the cache"):
        write_kv_slots(cache, torch.ones(1, 2, 3).to("mlx"), torch.ones(1, 2, 3).to("mlx"),
                       torch.tensor([8]).to("mlx"))
    torch.testing.assert_close(cache.cpu(), before, rtol=0, atol=0)
