"""MLX float32 matmul with the BLAS torch_mlx gives MLX on Linux vs the mlx[cpu] wheel as shipped.

Each configuration runs in its own process (the BLAS is chosen when mlx.core loads): the mlx[cpu]
wheel as shipped, in a process that imports only mlx (its netlib BLAS; with torch imported first,
netlib's cblas wrapper would bind sgemm_ to the MKL inside libtorch_cpu, which torch loads into the
global symbol scope), and torch_mlx's default (PyPI's OpenBLAS through its shims) with the shim's
own matrix-vector kernel and with ``TORCH_MLX_GEMV=openblas``. Products: the issue's
256x4096 @ 4096x4096 GEMM (GFLOP/s) and a decode step's matrix-vector product,
1x1536 @ (4096x1536).T (GB/s of weights read).

    python tools/bench_blas.py [--json OUT]
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap

PROBE = """
import json, time
if {with_torch}:
    import torch  # loads torch_mlx, which picks MLX's BLAS before mlx.core loads
    torch.empty(1, device="mlx")  # the device's first use sizes the BLAS thread pools
    blas = torch.mlx.blas_info()
else:
    blas = {{"library": "shipped (netlib, no torch in the process)"}}
import mlx.core as mx
def best_s(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
a = mx.random.normal((256, 4096))
b = mx.random.normal((4096, 4096))
x = mx.random.normal((1, 1536))
w = mx.random.normal((4096, 1536))
mx.eval(a, b, x, w)
gemm_s = best_s(lambda: mx.eval(a @ b), {gemm_repeats})
gemv_s = best_s(lambda: mx.eval(x @ w.T), 50)
print(json.dumps({{"blas": blas,
                  "gemm_gflop_s": 2 * 256 * 4096 * 4096 / gemm_s / 1e9,
                  "gemv_ms": gemv_s * 1e3, "gemv_gb_s": 4096 * 1536 * 4 / gemv_s / 1e9}}))
"""

CONFIGS = {
    "shipped": {},
    "openblas": {"TORCH_MLX_BLAS": "auto", "TORCH_MLX_GEMV": "openblas"},
    "openblas_own_gemv": {"TORCH_MLX_BLAS": "auto", "TORCH_MLX_GEMV": "own"},
}


def run(env: dict, gemm_repeats: int, with_torch: bool) -> dict:
    code = textwrap.dedent(PROBE.format(gemm_repeats=gemm_repeats, with_torch=with_torch))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    # the shipped BLAS takes seconds per GEMM: fewer repeats there
    result = {name: run(env, 2 if name == "shipped" else 10, name != "shipped")
              for name, env in CONFIGS.items()}
    ref, fast = result["shipped"], result["openblas_own_gemv"]
    result["gemm_speedup"] = fast["gemm_gflop_s"] / ref["gemm_gflop_s"]
    result["gemv_speedup"] = ref["gemv_ms"] / fast["gemv_ms"]
    print(f"{'BLAS':20} {'GEMM GFLOP/s':>13} {'GEMV ms':>9} {'GEMV GB/s':>10}")
    for name in CONFIGS:
        r = result[name]
        library = " ".join(filter(None, [r["blas"]["library"], r["blas"].get("version")]))
        print(f"{name:20} {r['gemm_gflop_s']:13.1f} {r['gemv_ms']:9.3f} {r['gemv_gb_s']:10.1f}"
              f"  ({library})")
    print(f"float32 GEMM 256x4096 @ 4096x4096: {result['gemm_speedup']:.0f}x the shipped BLAS; "
          f"GEMV 1x1536 @ 1536x4096: {result['gemv_speedup']:.1f}x")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
