"""Where a decode step of transformers' compiled ``generate`` on "mlx" goes.

    python tools/profile_hf_generate.py [--model DIR] [--tokens 32] [--json OUT]

tools/bench_gpu.py's ``mlx_compiled`` engine (a static KV cache, ``CompileConfig(backend="mlx")``:
each decode step should be one captured graph of fixed shapes) ran at 0.07x mlx-lm on the H100.
This runs the same generation after a warm-up and reports per decode step: the compiled graphs'
calls and time (``MlxGraph.forward``: more than one call a step means graph breaks), how often
MLX retraced a graph (``MlxGraph.run`` / ``_Segment._trace`` run only while ``mx.compile``
traces) and dynamo compiled a new graph (``mlx_backend``), and the torch ops dispatched outside
the graphs (each an eager MLX evaluation; on a GPU, a round trip unless TORCH_MLX_ASYNC=1), with
their self time.
"""
import argparse
import collections
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from profile_decode import COUNTS, TOTALS, timed  # noqa: E402  (its per-call timers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "bench-llama-2x384-bf16"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json")
    parser.add_argument("--pyspy", metavar="OUT",
                        help="then sample a longer generate's host stacks (py-spy --native, raw)")
    parser.add_argument("--pyspy-bin", default="py-spy")
    parser.add_argument("--pyspy-tokens", type=int, default=512)
    args = parser.parse_args()

    import torch_mlx  # noqa: F401
    import torch_mlx.compile as tc
    from torch_mlx import _C
    from transformers import AutoModelForCausalLM
    from transformers.generation import CompileConfig

    timed(tc.MlxGraph, "forward", "graph_forward")
    timed(tc.MlxGraph, "run", "graph_trace")  # only while mx.compile traces (or off-thread)
    timed(tc._Segment, "_trace", "segment_trace")
    timed(tc, "mlx_backend", "dynamo_compile")
    import mlx.core as mx
    timed(mx, "async_eval", "launch")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to("mlx").eval()
    config = CompileConfig(backend="mlx", fullgraph=False, dynamic=False, mode=None)
    config._compile_all_devices = True  # transformers compiles on its own list of devices only
    kwargs = dict(do_sample=False, cache_implementation="static", compile_config=config)
    ids = torch.tensor([list(range(10, 41))], device="mlx")

    def generate(tokens):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, **kwargs)
        return out[0, ids.shape[1]:].tolist()

    generate(args.tokens)  # warm-up: compiles
    generate(1)
    results = {}
    for tokens in (1, args.tokens):  # the difference is the decode steps
        TOTALS.clear()
        COUNTS.clear()
        _C.host_wait_stats(True)
        _C.device_write_count(True)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        start = time.perf_counter()
        with profiler:
            generate(tokens)
        wall = time.perf_counter() - start
        ops = collections.Counter()
        self_us = collections.Counter()
        for event in profiler.key_averages():
            if event.key.startswith("aten::"):
                ops[event.key] += event.count
                self_us[event.key] += event.self_cpu_time_total
        waits = _C.host_wait_stats(True)
        COUNTS["host_waits"], TOTALS["host_waits"] = waits[2], waits[3]
        COUNTS["device_writes"] = _C.device_write_count(True)
        results[tokens] = (wall, dict(TOTALS), dict(COUNTS), ops, self_us)
    steps = args.tokens - 1
    (w1, t1, c1, o1, s1), (wn, tn, cn, on, sn) = results[1], results[args.tokens]

    def per_step(a, b, key):
        return (b.get(key, 0) - a.get(key, 0)) / steps

    report = {"device": str(mx.default_device()), "model": args.model,
              "ms_per_step": (wn - w1) / steps * 1e3,
              "per_step": {k: {"calls": per_step(c1, cn, k),
                               "ms": per_step(t1, tn, k) * 1e3}
                           for k in sorted(set(cn) | set(c1))},
              "aten_ops_per_step": {k: round(per_step(o1, on, k), 1)
                                    for k, _ in (on - o1).most_common(30)},
              "aten_self_ms_per_step": {k: round(per_step(s1, sn, k) / 1e3, 3)
                                        for k, _ in (on - o1).most_common(30)}}
    print(f"{report['device']}: {report['ms_per_step']:.2f} ms a decode step (profiler on)")
    for k, v in report["per_step"].items():
        print(f"  {k:16s} {v['calls']:6.2f} calls {v['ms']:8.3f} ms")
    print("  aten ops a step (outside the graphs unless inside a graph's trace):")
    for k, n in report["aten_ops_per_step"].items():
        print(f"    {n:6.1f}  {report['aten_self_ms_per_step'][k]:7.3f} ms self  {k}")
    print(json.dumps(report))
    if args.pyspy:  # the host's stacks over a steady-state generate (compiled above)
        import pyspy_self
        generate(args.pyspy_tokens)  # its cache length is a new graph: compiled before sampling
        with pyspy_self.sampled(args.pyspy, args.pyspy_bin):
            start = time.perf_counter()
            generate(args.pyspy_tokens)
            report["pyspy_ms_per_token"] = (time.perf_counter() - start) / args.pyspy_tokens * 1e3
        print(f"sampled: {report['pyspy_ms_per_token']:.2f} ms a token under py-spy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
