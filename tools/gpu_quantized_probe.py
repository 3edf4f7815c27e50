"""Which of MLX's quantized matmul kernels give right answers for vllm_metal's inputs on the GPU.

    python3 tools/gpu_quantized_probe.py [--json OUT]

On the H100 (MLX CUDA 0.32.4) vllm_metal's quantized models diverged from mlx-lm and some
``mx.quantized_matmul`` calls failed to launch (cuGraphAddKernelNode: invalid argument). This
runs ``mx.quantized_matmul`` over bits x group size x rows of x x activation dtype, with the
packed weights made three ways: by an MLX GPU op (device memory: how mlx-lm's weights end up
after its first step), from host data (``mx.array(numpy)``: managed memory, how torch_mlx's
storages and so every weight vLLM loads live) and through torch_mlx's bridge. Each result is
compared with the dequantized weights multiplied in float64 on the host. One subprocess per
(bits, group size), so a launch failure that poisons the CUDA context is one row, not the run;
they run side by side (MLX CUDA compiles each kernel instance on the host the first time) and
each prints its rows as it finishes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
import mlx.core as mx
bits, gs = int(sys.argv[1]), int(sys.argv[2])
rows = []
for K, N in ((256, 96), (512, 256)):
    if K % gs:
        continue
    mx.random.seed(bits * 100 + gs + K)
    w = mx.random.normal((N, K))
    wq, scales, biases = mx.quantize(w, group_size=gs, bits=bits)
    mx.eval(wq, scales, biases)
    sources = {
        "device": (wq * 1, scales * 1, biases * 1),  # outputs of GPU ops: device memory
        "host": tuple(mx.array(np.array(a)) for a in (wq, scales, biases)),  # managed memory
    }
    try:
        import torch, torch_mlx
        sources["torch_mlx"] = tuple(
            torch_mlx.to_mlx(torch.from_numpy(np.array(a)).to("mlx")) for a in (wq, scales, biases))
    except Exception as exc:  # torch_mlx missing: the two MLX-only rows still say it
        print("torch_mlx source skipped:", exc, file=sys.stderr)
    for dtype in sys.argv[3].split(","):
        for M in (1, 3, 8, 17, 80):
            x = mx.random.normal((M, K)).astype(getattr(mx, dtype))
            mx.eval(x)
            # the weights as the kernel sees them: scales and biases in x's dtype
            dense = mx.dequantize(wq, scales.astype(x.dtype), biases.astype(x.dtype),
                                  group_size=gs, bits=bits, stream=mx.cpu)
            ref = np.array(x.astype(mx.float32)).astype(np.float64) \
                @ np.array(dense.astype(mx.float32)).astype(np.float64).T
            scale = float(np.abs(ref).max())
            for source, (q, s, b) in sources.items():
                row = {"bits": bits, "group": gs, "K": K, "N": N, "dtype": dtype, "M": M,
                       "weights": source}
                try:
                    y = mx.quantized_matmul(x, q, s.astype(x.dtype), b.astype(x.dtype),
                                            transpose=True, group_size=gs, bits=bits)
                    got = np.array(y.astype(mx.float32)).astype(np.float64)
                    row["rel_error"] = float(np.abs(got - ref).max() / scale)
                except Exception as exc:
                    row["error"] = str(exc)[:200]
                rows.append(row)
    # vllm_metal's quantized embedding (and tied lm_head rows): gathered packed rows, dequantized
    ids = mx.array([0, 5, N - 1, 7, 7], dtype=mx.int32)
    ref_rows = np.array(mx.dequantize(wq, scales, biases, group_size=gs, bits=bits,
                                      stream=mx.cpu))[np.array(ids)]
    for source, (q, s, b) in sources.items():
        row = {"bits": bits, "group": gs, "K": K, "N": N, "dtype": "float32", "M": "embedding",
               "weights": source}
        try:
            got = mx.dequantize(mx.take(q, ids, axis=0), mx.take(s, ids, axis=0),
                                mx.take(b, ids, axis=0), group_size=gs, bits=bits)
            row["rel_error"] = float(np.abs(np.array(got) - ref_rows).max()
                                     / np.abs(ref_rows).max())
        except Exception as exc:
            row["error"] = str(exc)[:200]
        rows.append(row)
print(json.dumps(rows))
"""

# of the output's largest magnitude. Broken kernels miss by O(1); MLX's CPU kernel accumulates
# half types in the half type (bfloat16 at K = 512: 0.09), which is not what this looks for
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15, "float16": 0.15}


def _child(bits: int, gs: int, dtypes: str, timeout: float) -> list[dict]:
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(bits), str(gs), dtypes],
                              capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", str(exc.stdout or "") + str(exc.stderr or "")
    lines = [line for line in out.splitlines() if line.startswith("[")]
    if rc or not lines:
        return [{"bits": bits, "group": gs, "crash": rc, "output": out[-600:]}]
    return json.loads(lines[-1])


def _describe(r: dict) -> str:
    what = r.get("error") or (f"child {r['crash']}: {r['output'][-300:]}" if "crash" in r
                              else f"rel error {r['rel_error']:.3g}")
    return (f"bits {r['bits']} g{r['group']} K{r.get('K')} N{r.get('N')} {r.get('dtype')} "
            f"M={r.get('M')} weights={r.get('weights')}: {what}")


def _wrong(r: dict) -> bool:
    return "error" in r or "crash" in r or r["rel_error"] > TOLERANCE[r["dtype"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="activation dtypes (float32, bfloat16, float16)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per child")
    args = parser.parse_args()
    rows = []
    configs = [(bits, gs) for bits in (2, 3, 4, 5, 6, 8) for gs in (32, 64, 128)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_child, bits, gs, args.dtypes, args.timeout): (bits, gs)
                   for bits, gs in configs}
        for future in concurrent.futures.as_completed(futures):
            bits, gs = futures[future]
            part = future.result()
            rows += part
            bad = [r for r in part if _wrong(r)]
            print(f"bits {bits} group {gs}: {len(part)} cases, {len(bad)} wrong or failed",
                  flush=True)
            for r in bad:
                print("  " + _describe(r), flush=True)
    bad = [r for r in rows if _wrong(r)]
    by_source = {}
    for r in rows:
        if "weights" in r:
            ok, n = by_source.get(r["weights"], (0, 0))
            by_source[r["weights"]] = (ok + (not _wrong(r)), n + 1)
    print(f"{len(rows)} cases, {len(bad)} wrong or failed; right per weight memory: "
          + ", ".join(f"{k} {ok}/{n}" for k, (ok, n) in by_source.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
