"""What one decode step asks of MLX: the primitives of vllm_metal's step graph vs mlx-lm's.

    python tools/graph_census.py [--model DIR] [--batch 1] [--gpu-paths]
                                 [--engine both|vllm|mlx_lm|hf] [--json OUT]

On a GPU a decode step of a small model is bound by how many kernels it launches and how long the
host takes to record them, not by arithmetic (tools/profile_decode.py on the H100: a step costs the
same at 1 and 32 sequences). This counts the nodes of the lazy MLX graph each engine hands to
``mx.eval``/``mx.async_eval`` for one decode step, by primitive (``mx.export_to_dot``), for
vllm_metal's compiled forward (torch_mlx.compile.MlxGraph, captured at its 4th call: a decode
step) and for mlx-lm's model called on one token with its KV cache, on the same checkpoint;
``--engine hf``: transformers' compiled ``generate`` on "mlx" (its decode graph) beside mlx-lm.
Views (reshape, slice, broadcast, ...) cost no kernel; the rest each launch about one (a
``Compiled`` node is one fused elementwise kernel).

``--gpu-paths`` makes vllm_metal take its GPU code paths on MLX's CPU backend (the lowerings'
``cpu_backend()`` answers False), so the census of the GPU graph can be taken on any machine.
"""
import argparse
import collections
import io
import json
import os
import re
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VIEWS = {"Reshape", "Squeeze", "ExpandDims", "Broadcast", "AsStrided", "Slice", "Transpose",
         "StopGradient", "Depends", "Split", "Unflatten", "Flatten", "BroadcastAxes"}


def census(outputs) -> collections.Counter:
    import mlx.core as mx

    f = io.StringIO()
    mx.export_to_dot(f, *outputs)
    return collections.Counter(re.findall(r'\[label ="([^"]+)"', f.getvalue()))


class ForwardCensus:
    """While entered, ``taken`` holds, once ``on`` is set, one census a call of
    torch_mlx.compile.MlxGraph's forward: the graph of its last ``mx.async_eval`` (the
    forward's outputs; an earlier launch in the same call starts part of that graph)."""

    def __enter__(self):
        import mlx.core as mx
        from torch_mlx.compile import MlxGraph

        self.taken, self.on = [], False
        self._original = original = MlxGraph.forward
        outer = self

        def forward(graph, *inputs):
            real, last = mx.async_eval, []

            def capture(arrays):
                if outer.on:
                    last[:] = [census(arrays)]
                return real(arrays)
            mx.async_eval = capture
            try:
                return original(graph, *inputs)
            finally:
                mx.async_eval = real
                outer.taken.extend(last)

        MlxGraph.forward = forward
        return self

    def __exit__(self, *exc):
        from torch_mlx.compile import MlxGraph

        MlxGraph.forward = self._original


def vllm_step(model: str, batch: int, gpu_paths: bool) -> collections.Counter:
    if gpu_paths:
        import vllm_metal.ops  # noqa: F401  (imports every module that imported cpu_backend)
        for name, module in list(sys.modules.items()):
            if name.startswith("vllm_metal") and hasattr(module, "cpu_backend"):
                module.cpu_backend = lambda: False
    import vllm

    with ForwardCensus() as graphs:
        llm = vllm.LLM(model=model, max_model_len=256, max_num_seqs=max(batch, 1), seed=0)
        graphs.on = True  # start-up's compile and warm-up runs do not count
        params = vllm.SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0)
        llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}] * batch, params)
    # the prompt's forward, then decode steps: the fourth is a decode step well under way
    return graphs.taken[3] if len(graphs.taken) > 3 else collections.Counter()


def mlx_lm_step(model: str, batch: int) -> collections.Counter:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    net, _ = load(model)
    cache = make_prompt_cache(net)
    prompt = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]] * batch)
    mx.eval(net(prompt, cache=cache))
    token = mx.array([[9]] * batch)
    logits = net(token, cache=cache)[:, -1, :]
    return census([mx.argmax(logits, axis=-1)])


def hf_step(model: str, batch: int) -> collections.Counter:
    """The decode graph of transformers' compiled generate on "mlx" (a static cache,
    ``CompileConfig(backend="mlx")``, as tools/bench_gpu.py's ``mlx_compiled``): the MLX graph
    its last compiled call launches."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation import CompileConfig

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to("mlx").eval()
    config = CompileConfig(backend="mlx", fullgraph=False, dynamic=False, mode=None)
    config._compile_all_devices = True  # transformers compiles on its own devices only
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * batch, device="mlx")
    with ForwardCensus() as graphs, torch.no_grad():
        graphs.on = True
        net.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                     cache_implementation="static", compile_config=config, pad_token_id=0)
    return graphs.taken[-1] if graphs.taken else collections.Counter()


ENGINES = ("mlx_lm", "vllm_metal", "hf_compiled")


def summary(counts: collections.Counter) -> dict:
    kernels = {k: v for k, v in counts.items() if k not in VIEWS}
    return {"nodes": sum(counts.values()), "kernel_nodes": sum(kernels.values()),
            "by_primitive": dict(counts.most_common())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "bench-llama-2x384-bf16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gpu-paths", action="store_true")
    parser.add_argument("--engine", choices=["both", "vllm", "mlx_lm", "hf"], default="both",
                        help="both: mlx_lm and vllm; hf: transformers' compiled generate on "
                             '"mlx" and mlx_lm')
    parser.add_argument("--json")
    args = parser.parse_args()
    report = {"model": args.model, "batch": args.batch, "gpu_paths": args.gpu_paths}
    if args.engine in ("both", "mlx_lm", "hf"):
        report["mlx_lm"] = summary(mlx_lm_step(args.model, args.batch))
    if args.engine in ("both", "vllm"):
        report["vllm_metal"] = summary(vllm_step(args.model, args.batch, args.gpu_paths))
    if args.engine == "hf":
        report["hf_compiled"] = summary(hf_step(args.model, args.batch))
    shown = [e for e in ENGINES if e in report]
    names = sorted({k for e in shown for k in report[e]["by_primitive"]},
                   key=lambda k: -max(report[e]["by_primitive"].get(k, 0) for e in shown))
    print(f"{'primitive':28s} " + " ".join(f"{e:>11s}" for e in shown))
    for k in names:
        print(f"{k + (' (view)' if k in VIEWS else ''):28s} "
              + " ".join(f"{report[e]['by_primitive'].get(k, 0)!s:>11s}" for e in shown))
    for key in ("nodes", "kernel_nodes"):
        print(f"{key:28s} " + " ".join(f"{report[e][key]!s:>11s}" for e in shown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
