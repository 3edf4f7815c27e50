"""Eager per-op overhead of torch_mlx against a bare MLX op + eval, and one transformer block
compiled (torch.compile(backend="mlx")) against eager, on the same machine in one run.

Prints a table and JSON (--json OUT writes it too). The per-op goal: torch_mlx eager time
<= 2x the bare MLX op + eval at the same size.
"""
import argparse
import json
import statistics
import time

import mlx.core as mx
import torch

import torch_mlx


def per_call_us(fn, min_time=0.3, warmup=20):
    for _ in range(warmup):
        fn()
    n, elapsed = 0, 0.0
    start = time.perf_counter()
    while elapsed < min_time:
        for _ in range(50):
            fn()
        n += 50
        elapsed = time.perf_counter() - start
    return elapsed / n * 1e6


OPS = {
    "add": (lambda x, y: x + y, lambda a, b: mx.add(a, b)),
    "mul": (lambda x, y: x * y, lambda a, b: mx.multiply(a, b)),
    "exp": (lambda x, y: torch.exp(x), lambda a, b: mx.exp(a)),
    "sum": (lambda x, y: x.sum(), lambda a, b: mx.sum(a)),
}


def paired_us(fn_a, fn_b, rounds=15, calls=40, warmup=20):
    """Median per-call times of two functions timed in alternating batches, so drift of the
    machine (the eval's thread wake-up latency swings between about 40 and 160 us here) hits
    both alike instead of whichever ran second."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(rounds):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times_a), statistics.median(times_b)


def bench_ops(sizes):
    rows = []
    for n in sizes:
        x, y = torch.randn(n).to("mlx"), torch.randn(n).to("mlx")
        a, b = torch_mlx.to_mlx(x), torch_mlx.to_mlx(y)
        for name, (torch_fn, mlx_fn) in OPS.items():
            try:
                torch_fn(x, y)
            except NotImplementedError as e:
                rows.append({"op": name, "numel": n, "error": str(e).split(".")[0]})
                continue
            calls = 40 if n < 100_000 else 4
            t, m = paired_us(lambda: torch_fn(x, y), lambda: mx.eval(mlx_fn(a, b)), calls=calls)
            rows.append({"op": name, "numel": n, "torch_mlx_us": t, "mlx_us": m, "ratio": t / m})
    return rows


def bench_block():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                         num_key_value_heads=4, num_hidden_layers=1)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval().to("mlx")
    rope = LlamaRotaryEmbedding(config).to("mlx")
    h = torch.randn(1, 16, 256).to("mlx")
    pos = torch.arange(16).unsqueeze(0).to("mlx")
    with torch.no_grad():
        emb = rope(h, pos)
        eager = lambda: layer(h, position_embeddings=emb)  # noqa: E731
        compiled_layer = torch.compile(layer, backend="mlx")
        compiled = lambda: compiled_layer(h, position_embeddings=emb)  # noqa: E731
        out_e, out_c = eager(), compiled()
        out_e = out_e[0] if isinstance(out_e, tuple) else out_e
        out_c = out_c[0] if isinstance(out_c, tuple) else out_c
        err = (out_e.cpu() - out_c.cpu()).abs().max().item()
        te, tc = per_call_us(eager, 1.0, 3), per_call_us(compiled, 1.0, 3)
    return {"eager_us": te, "compiled_us": tc, "speedup": te / tc, "max_abs_diff": err}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    parser.add_argument("--sizes", default="64,4096,1048576")
    args = parser.parse_args()
    result = {"ops": bench_ops([int(s) for s in args.sizes.split(",")])}
    try:
        result["llama_block"] = bench_block()
    except NotImplementedError as e:
        result["llama_block"] = {"error": str(e).split(".")[0]}
    print(f"{'op':6} {'numel':>8} {'torch_mlx us':>13} {'mlx us':>9} {'ratio':>6}")
    for r in result["ops"]:
        if "error" in r:
            print(f"{r['op']:6} {r['numel']:>8} {r['error']}")
        else:
            print(f"{r['op']:6} {r['numel']:>8} {r['torch_mlx_us']:13.1f} {r['mlx_us']:9.1f} "
                  f"{r['ratio']:6.2f}")
    print("llama block:", result["llama_block"])
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
