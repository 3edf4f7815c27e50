"""Long soak of the eager device and the bridge: a million eager ops and bridge round trips
(default) with the process's RSS sampled, to show that nothing leaks per op.

Each round runs a fixed mix on small "mlx" tensors: elementwise ops, in-place ops, a reduction,
a matmul, views and indexing, a copy to the CPU and back, a random draw, and bridge round trips
(``torch_mlx.to_mlx`` / ``torch_mlx.from_mlx``, both directions, with an MLX op between them).
Every op's result is dropped at the end of its round, so memory in use is the same from round to
round: RSS that keeps growing after the warm-up is a leak (a storage context, a nanobind
reference, an MLX array or buffer kept alive per op). RSS is sampled every ``--sample-every``
rounds from /proc/self/statm; the growth reported is the median RSS of the last tenth of the
samples against the median of the first tenth after the warm-up (``--warmup``, a fraction of
the rounds), so a single sample's noise does not decide it. MLX's own active and cached bytes
and torch_mlx's allocator figures are reported beside RSS.

    python tools/soak_ops.py [--ops 1000000] [--max-growth 0.02] [--json OUT]

Exit status 1 when the growth is ``--max-growth`` (2%) or more. tests/torch_mlx/test_soak.py
runs a short version.
"""
import argparse
import json
import os
import statistics
import sys
import time

import mlx.core as mx
import torch

import torch_mlx

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def one_round(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> int:
    """One round of the mix; returns how many eager ops and bridge round trips it made."""
    n = 0
    y = x + 1.0
    y = y * x
    y = torch.exp(y.clamp(max=4.0))
    n += 4
    y.add_(0.5)
    y.mul_(0.25)
    n += 2
    s = y.sum(dim=-1)
    m = y.mean()
    n += 2
    z = y @ w
    z = torch.nn.functional.silu(z)
    n += 2
    v = z.view(-1)[:16].reshape(4, 4).t().contiguous()
    g = y.index_select(0, idx)
    c = torch.cat([g, g], dim=0)
    n += 7
    host = c.cpu()
    back = host.to("mlx")
    n += 2
    r = torch.randn(8, 8, device="mlx")
    n += 1
    _ = (s, m, v, back, r)
    # bridge: torch -> mlx -> torch (same bytes), and mlx -> torch -> mlx
    for t in (y, z, c):
        a = torch_mlx.to_mlx(t)
        t2 = torch_mlx.from_mlx(a)
        n += 1
    a = mx.exp(torch_mlx.to_mlx(x))
    t3 = torch_mlx.from_mlx(a)
    a2 = torch_mlx.to_mlx(t3 + 1.0)
    mx.eval(a2)
    n += 3
    del t2, t3, a, a2
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=1_000_000,
                   help="eager ops + bridge round trips in all (default 1,000,000)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of rounds before the "
                   "baseline (default 0.1)")
    p.add_argument("--sample-every", type=int, default=0,
                   help="rounds between RSS samples (default: about 200 samples)")
    p.add_argument("--max-growth", type=float, default=0.02)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)

    x = torch.randn(32, 64, device="mlx")
    w = torch.randn(64, 48, device="mlx")
    idx = torch.tensor([0, 3, 5, 7, 31], device="mlx")
    per_round = one_round(x, w, idx)
    rounds = max(1, args.ops // per_round)
    every = args.sample_every or max(1, rounds // 200)
    warm = int(rounds * args.warmup)
    samples = []  # (round, seconds, rss, mlx active, mlx cache)
    start = time.perf_counter()
    for i in range(rounds):
        one_round(x, w, idx)
        if i % every == 0 or i == rounds - 1:
            samples.append((i, time.perf_counter() - start, rss_bytes(),
                            mx.get_active_memory(), mx.get_cache_memory()))
    elapsed = time.perf_counter() - start

    after = [s for s in samples if s[0] >= warm]
    k = max(1, len(after) // 10)
    base = statistics.median(s[2] for s in after[:k])
    end = statistics.median(s[2] for s in after[-k:])
    growth = (end - base) / base
    result = {
        "ops": rounds * per_round, "rounds": rounds, "ops_per_round": per_round,
        "seconds": round(elapsed, 1), "us_per_op": round(elapsed / (rounds * per_round) * 1e6, 2),
        "rss_first_mb": round(samples[0][2] / 2**20, 1),
        "rss_after_warmup_mb": round(base / 2**20, 1), "rss_end_mb": round(end / 2**20, 1),
        "rss_max_mb": round(max(s[2] for s in after) / 2**20, 1),
        "growth_after_warmup": round(growth, 5),
        "mlx_active_after_warmup": after[0][3], "mlx_active_end": after[-1][3],
        "mlx_cache_end": after[-1][4],
        "torch_mlx_allocated_end": torch.mlx.memory_allocated(),
        "samples": len(samples), "max_growth": args.max_growth,
        "ok": growth < args.max_growth,
    }
    text = json.dumps(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
