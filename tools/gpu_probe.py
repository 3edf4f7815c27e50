"""Quick checks of torch_mlx on MLX's GPU, each in its own process, so a crash is a result.

    python3 tools/gpu_probe.py [--json OUT] [--only NAME,...] [--gdb]

Runs on any MLX backend (on MLX's CPU backend it checks the same code paths, minus the GPU).
Each check is a small program; its exit status, the time it took and the tail of its output are
reported (JSON with --json). A check that dies from a signal is rerun under cuda-gdb (or gdb)
with --gdb to print the native stack. Part of tools/device_kit.sh's "probe" selection.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PRELUDE = """
import faulthandler, sys; faulthandler.enable()
import torch, mlx.core as mx, torch_mlx
"""

CHECKS = {
    "mlx_gpu_op": """
a = mx.arange(12.0).reshape(3, 4)
print(mx.default_device(), (a @ a.T).tolist())
""",
    "mx_compile_plain": """
f = mx.compile(lambda x, y: mx.exp(x) * y + 1)
for n in (4, 6, 7):
    x, y = mx.random.normal((n, 5)), mx.random.normal((n, 5))
    print(n, float(mx.abs(f(x, y) - (mx.exp(x) * y + 1)).max()))
""",
    "mx_compile_shapeless": """
f = mx.compile(lambda x: mx.exp(x) * 2, shapeless=True)
for n in (4, 6, 7):
    x = mx.random.normal((n, 5))
    print(n, float(mx.abs(f(x) - mx.exp(x) * 2).max()))
""",
    "mx_compile_on_bridged_array": """
f = mx.compile(lambda x, y: mx.exp(x) * y + 1)
x, y = torch.randn(4, 5).to("mlx"), torch.randn(4, 5).to("mlx")
out = f(torch_mlx.to_mlx(x), torch_mlx.to_mlx(y))
mx.eval(out)
print(float(mx.abs(out - (mx.exp(torch_mlx.to_mlx(x)) * torch_mlx.to_mlx(y) + 1)).max()))
""",
    "mx_compile_on_bridged_transposed": """
f = mx.compile(lambda x: mx.exp(x) + 1)
x = torch.randn(4, 5).to("mlx")
out = f(torch_mlx.to_mlx(x.t()))
mx.eval(out)
print(out.shape, float(mx.abs(out - (mx.exp(torch_mlx.to_mlx(x.t())) + 1)).max()))
""",
    "eager_exp_softmax": """
x = torch.randn(3, 7)
print(float((torch.exp(x.to("mlx")).cpu() - torch.exp(x)).abs().max()))
print(float((x.to("mlx").softmax(-1).cpu() - x.softmax(-1)).abs().max()))
""",
    "bad_cross_entropy": """
import torch.nn.functional as F
x = torch.randn(3, 5)
try:
    F.cross_entropy(x.to("mlx"), torch.tensor([0, 1, 9]).to("mlx"))
    print("no error")
except Exception as e:
    print(type(e).__name__, str(e)[:200])
""",
    "torch_compile_small": """
def f(x, y):
    z = torch.exp(x) * y + 1
    return (z.t() - x.t()).reshape(-1), torch.sin(z)
g = torch.compile(f, backend="mlx")
for n in (4, 6, 7):
    x, y = torch.randn(n, 5), torch.randn(n, 5)
    a, b = g(x.to("mlx"), y.to("mlx"))
    ra, rb = f(x, y)
    print(n, float((a.cpu() - ra).abs().max()), float((b.cpu() - rb).abs().max()))
""",
    "matmul_precision": """
import os
torch.manual_seed(0)
a, b = torch.randn(256, 256), torch.randn(256, 256)
ref = a.double() @ b.double()
for prec in ("highest", "high"):
    torch.set_float32_matmul_precision(prec)
    out = (a.to("mlx") @ b.to("mlx")).cpu().double()
    print(prec, "mlx err", float((out - ref).abs().max()))
torch.set_float32_matmul_precision("highest")
print("cpu err", float(((a @ b).double() - ref).abs().max()))
mx_a, mx_b = mx.array(a.numpy()), mx.array(b.numpy())
print("bare mx err", float((torch.from_numpy(__import__('numpy').array(mx_a @ mx_b)).double() - ref).abs().max()),
      "MLX_ENABLE_TF32=", os.environ.get("MLX_ENABLE_TF32"))
""",
    # MLX CUDA 0.32.4: the grouped GEMM of gather_mm(sorted_indices=True) was wrong for weights
    # made from host data (vllm_metal/ops/moe.py GROUPED_GEMM turns it off there); prints the
    # error for weights an MLX op made and for the same weights made from host data
    "gather_mm_sorted_host_weights": """
import numpy as np
mx.random.seed(0)
E, N, K, P = 8, 64, 64, 66
w = mx.random.normal((E, N, K))
ids = mx.sort(mx.random.randint(0, E, (P,)).astype(mx.uint32))
x = mx.random.normal((P, 1, K))
ref = np.einsum("pk,pnk->pn", np.array(x[:, 0]), np.array(w)[np.array(ids)])
for name, weights in (("device-made", w), ("host-made", mx.array(np.array(w)))):
    y = mx.gather_mm(x, weights.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True)
    print(name, "max error", float(np.abs(np.array(y).reshape(P, N) - ref).max()))
""",
    # What tells the two apart (the device-made weights above were read by the host for the
    # reference, so both lived in managed memory): weights never read by the host, host-made
    # ones, a GPU copy of host-made ones, host-read ones, at a Mixtral-like size too, and what
    # the sorted (grouped) GEMM saves over the gathered one there (vllm_metal's MoE at 32
    # sequences on the H100 read every expert once per (token, expert) pair: 0.77 ms a layer)
    "gather_mm_sorted_variants": """
import numpy as np, time
def case(E, N, K, P, seed=0):
    mx.random.seed(seed)
    w = mx.random.normal((E, N, K)) / K ** 0.5
    ids = mx.sort(mx.random.randint(0, E, (P,)).astype(mx.uint32))
    x = mx.random.normal((P, 1, K))
    mx.eval(w, ids, x)
    unsorted_ref = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=ids)  # no host read of w
    host = mx.array(np.array(w))  # (reads w on the host: w moves to managed memory after this)
    fresh = mx.random.normal((E, N, K)) / K ** 0.5
    mx.eval(unsorted_ref, fresh)
    fresh_ref = mx.gather_mm(x, fresh.swapaxes(-1, -2), rhs_indices=ids)
    variants = {"never host-read": (fresh, fresh_ref), "host-made": (host, unsorted_ref),
                "GPU copy of host-made": (host + 0, unsorted_ref),
                "host-read device-made": (w, unsorted_ref)}
    for name, (weights, ref) in variants.items():
        mx.eval(weights)
        y = mx.gather_mm(x, weights.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True)
        err = mx.abs(y - ref).max().item()
        times = {}
        for sort in (True, False):
            f = lambda: mx.eval(mx.gather_mm(x, weights.swapaxes(-1, -2), rhs_indices=ids,
                                             sorted_indices=sort))
            f(); mx.synchronize(); t = time.perf_counter()
            for _ in range(20): f()
            mx.synchronize(); times[sort] = (time.perf_counter() - t) / 20 * 1e3
        print(f"E={E} N={N} K={K} pairs={P} {name:24} sorted max error {err:.3g}; "
              f"sorted {times[True]:.3f} ms, gathered {times[False]:.3f} ms")
case(8, 64, 64, 66)
case(8, 7168, 1024, 64)  # Mixtral-like w13 at a quarter width, 32 tokens x top-2
""",
    "launch_by_weight_memory": """
# A decode step of a 16-layer, hidden-1536 bf16 Llama written in plain MLX (mlx-lm's ops:
# rms_norm, GEMVs, fast.rope, fast SDPA over a fixed KV, SiLU MLP), with its weights in three
# kinds of memory: MLX-made (device memory on CUDA), MLX-made from host data (managed memory),
# and torch_mlx storages bridged with to_mlx (what vllm_metal's compiled forward reads); then
# with the MLP mx.compiled, and the whole step as one mx.compile (vllm_metal's segments are
# mx.compile'd). Times per step: recording the graph, mx.async_eval (encoding the kernels),
# waiting. Tells which of these makes a step's launch slow.
import time, numpy as np
L, H, F, NH, KVH, D, T = 16, 1536, 4096, 12, 2, 128, 256
def mlx_made(shape):
    return (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
def host_made(shape):
    return mx.array((np.random.randn(*shape) * 0.02).astype(np.float32)).astype(mx.bfloat16)
keep = []
def torch_made(shape):
    t = (torch.randn(*shape, device="mlx") * 0.02).to(torch.bfloat16)
    keep.append(t)
    return lambda: torch_mlx.to_mlx(t)  # bridged anew every step, as MlxGraph.forward does
def mlp(h, wg, wu, wd):
    g = h @ wg.T
    return (mx.sigmoid(g) * g * (h @ wu.T)) @ wd.T
compiled_mlp = mx.compile(mlp)
def layer(x, k, v, wq, wk, wv, wo, wg, wu, wd, n1, n2, mlp_fn=mlp):
    h = mx.fast.rms_norm(x, n1, 1e-6)
    q = (h @ wq.T).reshape(1, 1, NH, D).transpose(0, 2, 1, 3)
    kk = (h @ wk.T).reshape(1, 1, KVH, D).transpose(0, 2, 1, 3)
    q = mx.fast.rope(q, D, traditional=False, base=10000.0, scale=1.0, offset=T - 1)
    kk = mx.fast.rope(kk, D, traditional=False, base=10000.0, scale=1.0, offset=T - 1)
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)
    x = x + o.transpose(0, 2, 1, 3).reshape(1, 1, NH * D) @ wo.T
    h = mx.fast.rms_norm(x, n2, 1e-6)
    return x + mlp_fn(h, wg, wu, wd)
def whole(x, k, v, *flat):
    for i in range(L):
        x = layer(x, k, v, *flat[9 * i: 9 * i + 9])
    return x
compiled_whole = mx.compile(whole)
def run(kind, make, mode="plain"):
    ws = [[make(s) for s in [(NH*D, H), (KVH*D, H), (KVH*D, H), (H, NH*D), (F, H), (F, H), (H, F), (H,), (H,)]]
          for _ in range(L)]
    mx.eval([w for l in ws for w in l if isinstance(w, mx.array)])
    get = lambda w: w() if callable(w) else w
    k = mx.zeros((1, KVH, T, D), mx.bfloat16); v = mx.zeros((1, KVH, T, D), mx.bfloat16)
    x0 = mx.random.normal((1, 1, H)).astype(mx.bfloat16); mx.eval(k, v, x0)
    rec = lau = wai = 0.0; n = 40 if mx.default_device() == mx.gpu else 2
    for i in range(n + 5):
        t0 = time.perf_counter()
        if mode == "whole":
            x = compiled_whole(x0, k, v, *(get(w) for l in ws for w in l))
        else:
            x = x0
            for l in ws:
                x = layer(x, k, v, *(get(w) for w in l),
                          mlp_fn=compiled_mlp if mode == "mlp" else mlp)
        t1 = time.perf_counter(); mx.async_eval(x); t2 = time.perf_counter(); mx.eval(x)
        t3 = time.perf_counter()
        if i >= 5:
            rec += t1 - t0; lau += t2 - t1; wai += t3 - t2
    print(f"{kind:44s} record {rec/n*1e3:6.3f} ms  launch {lau/n*1e3:6.3f} ms  "
          f"wait {wai/n*1e3:6.3f} ms a step")
run("MLX-made weights", mlx_made)
run("MLX-made from host data", host_made)
run("torch_mlx storages (to_mlx)", torch_made)
run("MLX-made weights, again", mlx_made)
run("MLX-made weights, MLP mx.compiled", mlx_made, "mlp")
run("torch_mlx storages, MLP mx.compiled", torch_made, "mlp")
run("MLX-made weights, whole step mx.compiled", mlx_made, "whole")
run("torch_mlx storages, whole step mx.compiled", torch_made, "whole")
""",
}


def run_check(name: str, code: str, timeout: float, gdb: bool) -> dict:
    cmd = [sys.executable, "-c", PRELUDE + code]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", (exc.stdout or b"").decode(errors="replace")
    result = {"name": name, "rc": rc, "seconds": round(time.perf_counter() - started, 2),
              "output": out[-4000:]}
    if gdb and isinstance(rc, int) and rc < 0:
        debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
        if debugger:
            dbg = subprocess.run([debugger, "-batch", "-ex", "run", "-ex", "bt 40", "--args", *cmd],
                                 capture_output=True, text=True, timeout=min(timeout, 150))
            result["native_stack"] = (dbg.stdout + dbg.stderr)[-6000:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--only", help="comma-separated check names")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--gdb", action="store_true", help="native stack of a crashed check")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CHECKS)
    results = []
    for name in names:
        res = run_check(name, CHECKS[name], args.timeout, args.gdb)
        results.append(res)
        print(f"--- {name}: rc={res['rc']} ({res['seconds']} s)\n{res['output'].strip()}")
        if "native_stack" in res:
            print(res["native_stack"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
