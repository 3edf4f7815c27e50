"""What each kind of MLX primitive costs the host to launch on the GPU, and what a decode step's
attention and rotary embedding cost as vllm_metal writes them and as MLX's fused kernels do.

A small model's decode step on MLX's GPU is bound by the host, not the device: on the H100 the
device finishes 0.2 ms after vllm_metal's forward is launched, and the launch (``mx.async_eval``:
MLX walks the graph and encodes each kernel) takes 5-8 ms for ~440 kernels, about 12 us a kernel,
while a chain of elementwise adds costs about 5 us an op. This measures each primitive family
alone: a chain of ``--n`` ops on small operands (device time negligible), warmed up, then per op
the time to record the graph (Python), to launch it (``mx.async_eval``) and to wait for it.

Then one decode layer's attention and rotary embedding, the vllm_metal way and the fused way, at
the bench model's shapes (12 query heads, 4 KV heads, head size 128, block size 16).

    python tools/gpu_encode_cost.py [--n 200] [--reps 5] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import mlx.core as mx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _chain_cost(step, x0, n: int, reps: int) -> dict:
    """Per-op microseconds of a chain x = step(x) of n ops: record, launch, wait."""
    def once():
        t0 = time.perf_counter()
        x = x0
        for _ in range(n):
            x = step(x)
        t1 = time.perf_counter()
        mx.async_eval(x)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    once()  # JIT compiles, caches
    once()
    runs = [once() for _ in range(reps)]
    best = [min(r[i] for r in runs) for i in range(3)]
    return {"record_us": best[0] / n * 1e6, "launch_us": best[1] / n * 1e6,
            "wait_us": best[2] / n * 1e6}


def primitives(n: int, reps: int, dtype) -> dict:
    d = 1536
    vec = mx.random.normal((1, d)).astype(dtype)
    w = (mx.random.normal((d, d)) * 0.02).astype(dtype)
    small = mx.random.normal((8, 64)).astype(dtype)
    sw = (mx.random.normal((64, 64)) * 0.1).astype(dtype)
    table = mx.random.normal((4096, 128)).astype(dtype)
    idx = mx.array([5], dtype=mx.int32)
    mask = mx.random.uniform(shape=(1, d)) > 0.5
    scale_w = mx.ones((d,), dtype=dtype)
    fused = mx.compile(lambda x: (x * 0.5 + 1.0) * mx.sigmoid(x))
    mx.eval(vec, w, small, sw, table, idx, mask, scale_w)
    heads = vec.reshape(1, 12, 1, 128)
    offsets = mx.array([7], dtype=mx.int32)
    cases = {
        "add": (lambda x: x + vec, vec),
        "multiply_scalar": (lambda x: x * 0.999, vec),
        "astype_pair": (lambda x: x.astype(mx.float32).astype(dtype), vec),
        "compiled_elementwise": (fused, vec),
        "where": (lambda x: mx.where(mask, x, -x), vec),
        "softmax": (lambda x: mx.softmax(x, axis=-1, precise=True), vec),
        "rms_norm": (lambda x: mx.fast.rms_norm(x, scale_w, 1e-6), vec),
        "gemv_1x1536x1536": (lambda x: x @ w.T, vec),
        "matmul_8x64x64_cublas": (lambda x: x @ sw, small),
        "take_rows": (lambda x: x + mx.take(table, idx, axis=0)[:, :1], vec[:, :128]),
        "concatenate_2": (lambda x: mx.concatenate([x[:, :64], x[:, 64:]], axis=-1),
                          vec[:, :128]),
        "fast_rope": (lambda x: mx.fast.rope(x, 128, traditional=False, base=10000.0,
                                             scale=1.0, offset=offsets), heads),
    }
    return {name: _chain_cost(step, x0, n, reps) for name, (step, x0) in cases.items()}


def layer_parts(reps: int, dtype, batch: int) -> dict:
    """One decode layer's attention and rope, vllm_metal's GPU path vs MLX's fused kernels,
    per call (launch + record; 16 calls chained through their outputs)."""
    from vllm_metal.attention.paged import decode_attention, decode_mask
    from vllm_metal.ops.rotary import apply_rotary

    hq, hkv, hd, bs, ctx = 12, 4, 128, 16, 256
    blocks_per_seq = ctx // bs
    cache = mx.random.normal((batch * blocks_per_seq + 1, bs, hkv, 2 * hd)).astype(dtype)
    table = mx.arange(batch * blocks_per_seq, dtype=mx.int32).reshape(batch, blocks_per_seq)
    seq_lens = mx.full((batch,), ctx - 3, dtype=mx.int32)
    mask = decode_mask(seq_lens, ctx, None)
    q0 = mx.random.normal((batch, hq, hd)).astype(dtype)
    cos_sin = mx.random.normal((4096, hd)).astype(dtype)
    positions = mx.full((batch,), ctx - 4, dtype=mx.int32)
    mx.eval(cache, table, mask, q0, cos_sin, positions)
    scale = hd ** -0.5

    def written(q):
        return decode_attention(q, cache, table, mask, scale, hd)

    def gathered():  # every request's blocks as [batch, H, ctx, K | V]
        kv = mx.take(cache, table.reshape(-1), axis=0).reshape(batch, ctx, hkv, 2 * hd)
        return kv.swapaxes(1, 2)

    def fused(q):
        keys = gathered()
        out = mx.fast.scaled_dot_product_attention(
            q[:, :, None, :], keys[..., :hd], keys[..., hd:], scale=scale,
            mask=mask if batch > 1 else None)
        return out[:, :, 0, :]

    calls = [0]

    def fused_growing(q):
        # requests of one length (a lone one, or a batch in lockstep): no mask, and the keys one
        # longer at every call, as in decoding (a kernel planned per shape would pay each time)
        calls[0] += 1
        length = ctx - 3 - calls[0] % 200
        keys = gathered()[..., :length, :]
        out = mx.fast.scaled_dot_product_attention(
            q[:, :, None, :], keys[..., :hd], keys[..., hd:], scale=scale)
        return out[:, :, 0, :]

    def rope_written(q):
        cs = mx.take(cos_sin, positions, axis=0)[:, None, :]
        return apply_rotary(q, cs[..., : hd // 2], cs[..., hd // 2:], True)

    def rope_fused(q):
        return mx.fast.rope(q[:, :, None, :], hd, traditional=False, base=10000.0, scale=1.0,
                            offset=positions)[:, :, 0, :]

    cases = {"attention_written": written, "attention_fused": fused,
             "attention_fused_growing": fused_growing,
             "rope_written": rope_written, "rope_fused": rope_fused}
    return {name: _chain_cost(fn, q0, 16, reps) for name, fn in cases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="ops in each primitive's chain")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    result = {"device": str(mx.default_device()), "dtype": args.dtype, "n": args.n,
              "primitives": primitives(args.n, args.reps, dtype),
              "layer_b1": layer_parts(args.reps, dtype, 1),
              "layer_b32": layer_parts(args.reps, dtype, 32)}
    print(f"{result['device']}, {args.dtype}: per op, microseconds (best of {args.reps})")
    print(f"{'':28s} {'record':>8s} {'launch':>8s} {'wait':>8s}")
    for group in ("primitives", "layer_b1", "layer_b32"):
        print(f"-- {group}")
        for name, r in result[group].items():
            print(f"{name:28s} {r['record_us']:8.1f} {r['launch_us']:8.1f} {r['wait_us']:8.1f}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
