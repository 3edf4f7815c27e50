"""Where one eager op's time goes on MLX's GPU: MLX alone (evaluated and waited for, launched
without waiting, a whole chain evaluated once), the same op through torch_mlx ("mlx" tensors:
meta, adapter, evaluation, storage), and the host access that moves a device-memory result into
managed memory (MLX CUDA's Buffer::raw_ptr). Prints one JSON line; the device kit's `opcost`.

    python tools/gpu_op_cost.py [--n 4096] [--reps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import mlx.core as mx
import numpy as np
import torch

import torch_mlx  # noqa: F401  (registers "mlx")


def _per_call(fn, reps: int) -> float:
    """Median-free mean of ``reps`` calls after 20 warm-up calls, in microseconds."""
    for _ in range(20):
        fn()
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    mx.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="elements per operand")
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    n, reps = args.n, args.reps
    a = mx.random.normal((n,))
    b = mx.random.normal((n,))
    mx.eval(a, b)
    t_a, t_b = torch.randn(n).to("mlx"), torch.randn(n).to("mlx")
    res: dict = {"device": str(mx.default_device()), "n": n, "reps": reps,
                 "torch_mlx_async": str(int(torch_mlx._C.async_launch()))}

    res["mlx_eval_wait_us"] = _per_call(lambda: mx.eval(a + b), reps)
    res["mlx_async_eval_us"] = _per_call(lambda: mx.async_eval(a + b), reps)

    def chain():
        x = a
        for _ in range(32):
            x = x + b
        mx.eval(x)
    res["mlx_chain32_eval_per_op_us"] = _per_call(chain, max(reps // 10, 5)) / 32

    res["torch_mlx_add_us"] = _per_call(lambda: torch.add(t_a, t_b), reps)
    res["torch_mlx_mul_scalar_us"] = _per_call(lambda: t_a * 2.0, reps)
    res["torch_mlx_view_us"] = _per_call(lambda: t_a.view(64, -1), reps)
    m = torch.randn(64, 64).to("mlx")
    res["torch_mlx_mm_64_us"] = _per_call(lambda: m @ m, reps)
    # in-place: the functional result written into self on the device (write_in_place) where a
    # host write would wait; in a chain on one tensor each write first waits for the previous
    # one, which holds the buffer until its kernel completes
    t_c = torch.randn(n).to("mlx")
    res["torch_mlx_add_inplace_us"] = _per_call(lambda: t_c.add_(t_b), reps)
    # transformers' static cache pattern: a 0-d counter written back while a forward runs
    big = torch.randn(1024, 1024).to("mlx")
    k = torch.zeros((), dtype=torch.int64).to("mlx")
    res["torch_mlx_mm_1024_us"] = _per_call(lambda: big @ big, max(reps // 10, 5))
    res["torch_mlx_mm_1024_then_counter_write_us"] = _per_call(
        lambda: (big @ big, k.copy_(k + 1)), max(reps // 10, 5))
    res["device_writes"] = torch_mlx._C.device_write_count(True)

    # the host access: a fresh MLX result read by the host (raw_ptr: device -> managed on CUDA)
    def host_read():
        c = a + b
        mx.eval(c)
        np.asarray(c)[0]  # noqa: B018
    res["mlx_eval_then_host_read_us"] = _per_call(host_read, reps)
    res["torch_mlx_item_us"] = _per_call(lambda: t_a[0].item(), reps)
    res["torch_mlx_cpu_copy_us"] = _per_call(lambda: t_a.cpu(), reps)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
