"""Routed experts (vLLM's FusedMoE on mlx) against the dense MLP of equal active parameters.

    python tools/bench_moe.py [--tokens 1 32] [--shape mixtral qwen3] [--bits 4] [--mlx-gather]
                              [--repeats N] [--json OUT]

One MoE layer as vllm_metal runs it: the router's logits (x @ gate.T), vllm_metal::moe_route
(softmax top-k, renormalized) and vllm_metal::moe_experts (rows sorted by expert, the experts'
products, SiluAndMul, the weighted sum over the k experts), against a dense SwiGLU MLP whose
intermediate size is k times an expert's, the parameters one token uses (x @ W13.T, SiluAndMul,
@ W2.T). Both go through vllm_metal's lowerings and are mx.compile'd, as in a compiled forward.
With --bits both sides are MLX affine-quantized (group 64), as an mlx_lm checkpoint runs:
vllm_metal::quantized_moe_experts against vllm_metal::quantized_matmul. T tokens are a decode
step of T sequences. MLX's default device (the CPU backend on Linux, with torch_mlx's BLAS);
the two are timed alternately, and the ratio is of the medians. Issue 18's goal: at most 1.5x at
1 and 32 sequences. --mlx-gather runs the experts' products with MLX's gather_mm / gather_qmm
(what the GPU runs) instead of torch_mlx's grouped CPU kernels.

A third line runs the same layer as mlx-lm does (its SwitchGLU and Mixtral-style routing:
argpartition top-k, softmax over the chosen logits), on the same weights: what the peer this
project is measured against pays for routed experts (``mlx_lm_ms``, ``ratio_vs_mlx_lm``).

What bounds the ratio at 32 sequences: the step reads every expert some token routed to
(``experts_touched``, each whole) where the dense MLP reads k experts' worth; the JSON reports
both byte counts.
"""
import argparse
import json
import statistics
import time

import torch  # noqa: F401  (loads torch_mlx first: MLX then gets its BLAS)

import mlx.core as mx

# (hidden, expert intermediate, experts, top-k): Mixtral-8x7B's layer at a quarter of its width,
# and Qwen3-30B-A3B's (128 experts, top-8) at half its width with half the experts
SHAPES = {"mixtral": (1024, 3584, 8, 2), "qwen3": (1024, 384, 64, 8)}


def mlx_lm_layer(gate, w13, w2, top_k, bits=None):
    """The layer as mlx-lm runs it (mlx_lm.models.mixtral's block over SwitchGLU)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchGLU

    experts, inter2, hidden = w13.shape
    switch = SwitchGLU(hidden, inter2 // 2, experts)
    switch.gate_proj.weight = w13[:, :inter2 // 2]
    switch.up_proj.weight = w13[:, inter2 // 2:]
    switch.down_proj.weight = w2
    if bits is not None:
        nn.quantize(switch, group_size=64, bits=bits)
    mx.eval(switch.parameters())

    def layer(x):
        gates = x @ gate.T
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=top_k - 1, axis=-1)[..., :top_k])
        scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
        return (switch(x, inds) * scores[..., None]).sum(axis=-2)

    return mx.compile(layer)


def layer_functions(hidden, inter, experts, top_k, bits=None, seed=0):
    """(moe(x), dense(x), route(x) -> expert ids, bytes of one expert's matrices, mlx-lm's
    layer(x))."""
    from vllm_metal.ops.activation import silu_and_mul
    from vllm_metal.ops.moe import moe_experts, moe_route, quantized_moe_experts
    from vllm_metal.ops.quantized import quantized_matmul

    mx.random.seed(seed)
    gate = mx.random.normal((experts, hidden)) / hidden ** 0.5
    w13 = mx.random.normal((experts, 2 * inter, hidden)) / hidden ** 0.5
    w2 = mx.random.normal((experts, hidden, inter)) / inter ** 0.5
    # the dense MLP of equal active parameters: top_k experts' gate rows, then their up rows
    dense13 = mx.concatenate([w13[:top_k, :inter].reshape(-1, hidden),
                              w13[:top_k, inter:].reshape(-1, hidden)])
    dense2 = w2[:top_k].transpose(1, 0, 2).reshape(hidden, -1)
    mx.eval(gate, w13, w2, dense13, dense2)

    def route(x):
        return moe_route(x @ gate.T, top_k, "softmax", True, 1, 1, 1.0, None)

    if bits is None:
        def moe(x):
            weights, ids = route(x)
            return moe_experts(x, weights, ids, w13, w2, None, None, "silu", None, False)

        def dense(x):
            return silu_and_mul(x @ dense13.T) @ dense2.T

        return (mx.compile(moe), mx.compile(dense), route, 3 * inter * hidden * 4,
                mlx_lm_layer(gate, w13, w2, top_k))

    q13, q2, qd13, qd2 = (mx.quantize(w, group_size=64, bits=bits)
                          for w in (w13, w2, dense13, dense2))
    mx.eval(q13, q2, qd13, qd2)

    def moe(x):
        weights, ids = route(x)
        return quantized_moe_experts(x, weights, ids, *q13, 64, bits, *q2, 64, bits, "silu",
                                     None, False)

    def dense(x):
        return quantized_matmul(silu_and_mul(quantized_matmul(x, *qd13, 64, bits)), *qd2, 64,
                                bits)

    expert_bytes = sum(a.nbytes for a in (*q13, *q2)) // experts
    return (mx.compile(moe), mx.compile(dense), route, expert_bytes,
            mlx_lm_layer(gate, w13, w2, top_k, bits))


def time_alternately(fns, x, repeats):
    for fn in fns:  # trace and warm up
        mx.eval(fn(x))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            mx.eval(fn(x))
            out.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=sorted(SHAPES))
    parser.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--mlx-gather", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    import vllm_metal.ops.moe

    vllm_metal.ops.moe.CPU_KERNELS = not args.mlx_gather
    results = []
    for shape in args.shape:
        hidden, inter, experts, top_k = SHAPES[shape]
        moe, dense, route, expert_bytes, peer = layer_functions(hidden, inter, experts, top_k,
                                                                args.bits)
        for tokens in args.tokens:
            x = mx.random.normal((tokens, hidden))
            moe_s, dense_s, peer_s = time_alternately([moe, dense, peer], x, args.repeats)
            # the peer's layer is the same function of the same weights: say how close
            peer_diff = mx.abs(moe(x) - peer(x)).max().item()
            touched = len(set(route(x)[1].flatten().tolist()))
            row = {"shape": shape, "bits": args.bits or 32, "mlx_gather": args.mlx_gather,
                   "hidden": hidden,
                   "expert_intermediate": inter, "experts": experts, "top_k": top_k,
                   "tokens": tokens, "moe_ms": statistics.median(moe_s) * 1e3,
                   "dense_ms": statistics.median(dense_s) * 1e3,
                   "moe_min_ms": min(moe_s) * 1e3, "dense_min_ms": min(dense_s) * 1e3,
                   "experts_touched": touched, "moe_mb_read": touched * expert_bytes / 1e6,
                   "dense_mb_read": top_k * expert_bytes / 1e6,
                   "mlx_lm_ms": statistics.median(peer_s) * 1e3, "mlx_lm_max_abs_diff": peer_diff}
            row["ratio"] = row["moe_ms"] / row["dense_ms"]
            row["ratio_vs_mlx_lm"] = row["moe_ms"] / row["mlx_lm_ms"]
            results.append(row)
            print(f"{shape:8} {row['bits']:2} bits T={tokens:3}: MoE {row['moe_ms']:8.2f} ms, "
                  f"dense {row['dense_ms']:8.2f} ms, ratio {row['ratio']:.2f} "
                  f"({touched} experts read); mlx-lm's layer {row['mlx_lm_ms']:8.2f} ms",
                  flush=True)
    report = {"device": str(mx.default_device()), "goal_ratio": 1.5, "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
