"""Where a vllm_metal decode step goes: timers around the parts of one step, in-process.

Runs vLLM in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on the bench_decode checkpoint
(or --model), generates --tokens tokens for --batch identical prompts, and prints the mean time
per step of:

- step: the engine step (execute_model + sample_tokens of the model runner);
- compiled: the compiled forward (torch_mlx.compile.MlxGraph: with the default whole-forward
  compilation, one lazy MLX graph with the attention calls and KV writes inside), GEMVs included;
  ``of which build`` is the Python that records the lazy graph (MlxGraph.run_parts);
- attention: the attention backend's eager forward (KV write, MLX attention, output copy): with
  ``--piecewise`` (vLLM's split at the attention op) or --enforce-eager;
- sample: sample_tokens (logits to token ids);
- host: the rest of the step (vLLM's input preparation, eager glue between the parts);
- launch: ``mx.async_eval`` (on a GPU, encoding the graph's kernels), inside the parts;
- device wait (``--device-wait``): a synchronize after each forward and each sampling, apart;
- eval: time spent in ``mx.eval`` (waiting for MLX's results), inside the parts above: on a GPU,
  what the step waits for the device. Eager ops wait in torch_mlx's C++ instead (not counted).

``--ops`` also counts the torch ops of a step (torch.profiler).

``--async-scheduling`` runs vLLM's async scheduling (the engine schedules step N+1 while the
device runs step N): execute_model + sample_tokens then no longer add up to the step, so read
the wall time per step; ``input wait`` is the runner waiting for the previous step's device work
before it rewrites the staging buffers, ``output wait`` reading a step's sampled ids (both
inside the parts above or between them). Pair it with TORCH_MLX_ASYNC=1, without which every
step's device work has finished before its ops return and there is nothing to overlap.

Timers are wall-clock and inclusive; the parts do not nest in one another. The first step (the
prompt's prefill) is included: with a 16-token prompt and 64 tokens it is a small share.

    python tools/profile_decode.py [--batch 1] [--tokens 64] [--piecewise | --enforce-eager]
                                   [--model DIR] [--dtype bfloat16] [--ops] [--json OUT]
                                   [--async-scheduling]
"""
import argparse
import collections
import contextlib
import json
import os
import sys
import time

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

TOTALS: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)


def timed(cls, method: str, name: str) -> None:
    inner = getattr(cls, method)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            TOTALS[name] += time.perf_counter() - start
            COUNTS[name] += 1

    setattr(cls, method, wrapper)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "bench-llama-0.5b"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--piecewise", action="store_true",
                        help="split the compiled forward at the attention op (eager attention)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (vLLM's --dtype)")
    parser.add_argument("--ops", action="store_true",
                        help="also count the torch ops dispatched per step (torch.profiler): "
                             "outside the compiled graph each op on \"mlx\" is one eager MLX "
                             "evaluation, a GPU round trip on a GPU")
    parser.add_argument("--device-wait", action="store_true",
                        help="synchronize after each forward and sampling, timed apart")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="vLLM's async scheduling (with TORCH_MLX_ASYNC=1 to overlap)")
    parser.add_argument("--json")
    parser.add_argument("--pyspy", metavar="OUT",
                        help="sample the measured generation's native stacks with py-spy "
                             "(attached after the warm-up) into OUT (raw format)")
    parser.add_argument("--pyspy-bin", default="py-spy")
    args = parser.parse_args()
    from bench_decode import make_bench_model

    model = make_bench_model(args.model)

    from torch_mlx.compile import MlxGraph
    from vllm import LLM, SamplingParams
    from vllm_metal.attention.impl import MLXAttentionImpl
    from vllm_metal.model_runner import AsyncMLXModelRunnerOutput, MetalModelRunner
    import mlx.core as mx

    timed(MetalModelRunner, "execute_model", "execute_model")
    timed(MetalModelRunner, "sample_tokens", "sample")
    timed(MetalModelRunner, "_wait_for_previous_step", "input_wait")
    timed(AsyncMLXModelRunnerOutput, "get_output", "output_wait")
    from torch_mlx.compile import _Segment, _Uncompiled
    timed(_Segment, "__call__", "segments")  # inside build: the mx.compile'd runs of steps
    timed(_Uncompiled, "__call__", "uncompiled")  # inside build: attention and other lowerings
    if args.device_wait:
        # diagnostic: wait for the device after each forward and each sampling, to tell the
        # device's time from the host's (the step is then slower by the lost overlap)
        for cls, method in ((MlxGraph, "forward"), (MetalModelRunner, "sample_tokens")):
            def waiting(*a, __inner=getattr(cls, method), **k):
                out = __inner(*a, **k)
                start = time.perf_counter()
                mx.synchronize()
                TOTALS["device_wait"] += time.perf_counter() - start
                COUNTS["device_wait"] += 1
                return out
            setattr(cls, method, waiting)
    timed(MlxGraph, "forward", "compiled")
    timed(MlxGraph, "run_parts", "build")
    timed(MLXAttentionImpl, "forward", "attention")
    timed(mx, "eval", "eval")  # every wait for MLX's results made through mx.eval
    timed(mx, "async_eval", "launch")  # hands the graph to MLX: on a GPU, encodes its kernels
    # full device waits (the KV write's retry when its buffer could not be lent, csrc bridge)
    timed(mx, "synchronize", "synchronize")
    from torch_mlx import _C as _c
    _scatter = _c.scatter_in_place

    def scatter_in_place(*a, **k):  # in-place KV writes: lent, or refused (None)
        result = _scatter(*a, **k)
        COUNTS["kv_write_lent" if result is not None else "kv_write_refused"] += 1
        return result
    _c.scatter_in_place = scatter_in_place

    compilation = {"splitting_ops": ["vllm::unified_attention_with_output"]} \
        if args.piecewise else None
    llm = LLM(model=model, dtype=args.dtype, max_model_len=1024, max_num_seqs=32,
              max_num_batched_tokens=1024, seed=0, enforce_eager=args.enforce_eager,
              compilation_config=compilation, async_scheduling=args.async_scheduling)
    prompt = {"prompt_token_ids": list(range(10, 26))}
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([prompt] * args.batch, params, use_tqdm=False)  # warm-up (compiles)
    TOTALS.clear()
    COUNTS.clear()
    profiler = None
    if args.ops:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.__enter__()
    from torch_mlx import _C

    _C.host_wait_stats(True)
    _C.device_write_count(True)
    sampling = contextlib.nullcontext()
    if args.pyspy:
        import pyspy_self
        sampling = pyspy_self.sampled(args.pyspy, args.pyspy_bin)
    with sampling:
        start = time.perf_counter()
        llm.generate([prompt] * args.batch, params, use_tqdm=False)
        wall = time.perf_counter() - start
    evals, eval_s, waits, wait_s = _C.host_wait_stats(True)
    device_writes = _C.device_write_count(True)
    if profiler is not None:
        profiler.__exit__(None, None, None)

    steps = COUNTS["sample"]
    ms = {name: TOTALS[name] / steps * 1e3 for name in TOTALS}
    step = ms["execute_model"] + ms["sample"]
    parts = {"compiled": ms.get("compiled", 0.0), "attention": ms.get("attention", 0.0),
             "sample": ms["sample"]}
    parts["host"] = step - sum(parts.values())
    mode = "enforce_eager" if args.enforce_eager else "piecewise" if args.piecewise else "whole"
    result = {"batch": args.batch, "mode": mode, "dtype": args.dtype,
              "async_scheduling": args.async_scheduling,
              "torch_mlx_async": str(int(_C.async_launch())),  # the effective mode
              "input_wait_ms": ms.get("input_wait", 0.0),
              "output_wait_ms": ms.get("output_wait", 0.0),
              "device": str(mx.default_device()), "steps": steps,
              "wall_ms_per_step": wall / steps * 1e3, "step_ms": step, "parts_ms": parts,
              "build_ms": ms.get("build", 0.0), "segments_ms": ms.get("segments", 0.0),
              "uncompiled_ms": ms.get("uncompiled", 0.0), "launch_ms": ms.get("launch", 0.0),
              "device_wait_ms": ms.get("device_wait", 0.0),
              # results evaluated and waited for one by one (TORCH_MLX_ASYNC=0: eager ops and a
              # compiled forward's outputs, the device's time included), and host waits for
              # launched work (host reads): the host waiting for MLX, all threads
              "eager_evals_per_step": evals / steps, "eager_eval_ms": eval_s / steps * 1e3,
              "host_waits_per_step": waits / steps, "host_wait_ms": wait_s / steps * 1e3,
              # copy_ / fill_ written on the device where a host write would have waited
              "device_writes_per_step": device_writes / steps,
              "calls_per_step": {n: COUNTS[n] / steps for n in COUNTS}}
    print(f"batch {args.batch} ({mode}{', async scheduling' if args.async_scheduling else ''}, "
          f"TORCH_MLX_ASYNC={result['torch_mlx_async']}): {steps} steps, {result['wall_ms_per_step']:.1f} ms per "
          f"step (wall), engine step {step:.1f} ms")
    for name, value in parts.items():
        calls = result["calls_per_step"].get(name)
        print(f"  {name:10} {value:7.2f} ms  {value / step:5.1%}"
              + (f"  ({calls:.0f} calls)" if calls else ""))
        if name == "compiled" and result["build_ms"]:
            print(f"    of which build {result['build_ms']:7.2f} ms (recording the lazy graph: "
                  f"{ms.get('segments', 0.0):.2f} in compiled segments, "
                  f"{ms.get('uncompiled', 0.0):.2f} in uncompiled steps)")
    print(f"  mx.async_eval (launches; on a GPU encodes the kernels) {ms.get('launch', 0.0):7.2f} ms "
          f"({result['calls_per_step'].get('launch', 0):.1f} calls)")
    if args.async_scheduling:
        print(f"  input wait (previous step's device work) {ms.get('input_wait', 0.0):7.2f} ms, "
              f"output wait (sampled ids to the host) {ms.get('output_wait', 0.0):7.2f} ms")
    if args.device_wait:
        print(f"  device wait after forward and sampling {ms.get('device_wait', 0.0):7.2f} ms")
    calls = result["calls_per_step"]
    print(f"  mx.synchronize {ms.get('synchronize', 0.0):7.2f} ms ({calls.get('synchronize', 0):.1f} "
          f"calls); in-place KV writes a step: {calls.get('kv_write_lent', 0):.1f} lent, "
          f"{calls.get('kv_write_refused', 0):.1f} refused")
    print(f"  mx.eval (waits for MLX, inside the parts above) {ms.get('eval', 0.0):7.2f} ms "
          f"({result['calls_per_step'].get('eval', 0):.1f} calls)")
    print(f"  results evaluated and waited for one by one (eager ops, the forward's outputs; "
          f"the device's time included) {result['eager_eval_ms']:7.2f} ms "
          f"({result['eager_evals_per_step']:.1f} a step); host waits for launched work "
          f"{result['host_wait_ms']:7.2f} ms ({result['host_waits_per_step']:.1f} a step); "
          f"copies / fills written on the device {result['device_writes_per_step']:.1f} a step")
    if profiler is not None:
        # top-level ops only: an op's own callees (aten::copy_ inside aten::to) are its cost
        counts: dict[str, int] = collections.Counter()
        self_us: dict[str, float] = collections.Counter()
        for event in profiler.key_averages():
            if event.key.startswith(("aten::", "vllm", "torch_mlx", "mlx")):
                counts[event.key] += event.count
                self_us[event.key] += event.self_cpu_time_total
        top = sorted(counts, key=counts.get, reverse=True)[:40]
        result["ops_per_step"] = {k: round(counts[k] / steps, 1) for k in top}
        print(f"ops per step (all threads; {sum(counts.values()) / steps:.0f} in all):")
        for k in top:
            print(f"  {counts[k] / steps:7.1f}  {self_us[k] / steps / 1e3:7.3f} ms self  {k}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
