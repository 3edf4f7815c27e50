"""Show, for OpInfo ops at a dtype, every sample where "mlx" and the CPU disagree: the inputs,
both results, and where they differ. For diagnosing a mismatch on a machine where only logs
come back (the GPU device): `python tools/op_diff.py topk:bfloat16 kthvalue:float16`.

A spec is OP_NAME:DTYPE (OpInfo full name, as in tests/torch_mlx/expected_failures.py), or
OP_NAME:DTYPE:reference for the op's reference inputs beyond its samples (what
test_reference_matches_cpu runs)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "torch_mlx"))
import opinfo_harness as H  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

torch.set_printoptions(precision=6, linewidth=150, threshold=400)


def _show(label, value):
    for i, leaf in enumerate(H._leaves(value)):
        if isinstance(leaf, torch.Tensor):
            print(f"  {label}[{i}] {tuple(leaf.shape)} {leaf.dtype}:\n{leaf}")
        else:
            print(f"  {label}[{i}] {leaf!r}")


def _where(actual, expected):
    for i, (a, e) in enumerate(zip(H._leaves(actual), H._leaves(expected))):
        if not (isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor)) or a.shape != e.shape:
            continue
        bad = ~torch.isclose(a.double(), e.double(), rtol=1e-3, atol=1e-5, equal_nan=True) \
            if a.is_floating_point() else a != e
        idx = bad.nonzero().tolist()[:8]
        if idx:
            print(f"  output[{i}] differs at {idx}: mlx {[a[tuple(j)].item() for j in idx]} "
                  f"cpu {[e[tuple(j)].item() for j in idx]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="OP:DTYPE, e.g. topk:bfloat16")
    parser.add_argument("--max", type=int, default=3, help="failing samples shown per spec")
    args = parser.parse_args()
    by_name = {op.full_name: op for op in op_db}
    for spec in args.specs:
        name, dtype_text, *kind = spec.split(":")
        op, dtype = by_name[name], H.dtype_from_name(dtype_text)
        inputs = H.reference_inputs_of(op, dtype)[0] if kind == ["reference"] \
            else H.samples_of(op, dtype)
        shown = 0
        for n, (sample, keep) in enumerate(inputs):
            result = H.run_sample(op, sample, keep)
            if result.status == H.PASS or shown >= args.max:
                continue
            shown += 1
            print(f"=== {spec} sample {n}: {result.status}: {result.message[:400]}")
            _show("input", (sample.input, sample.args, sample.kwargs))
            expected = sample.output_process_fn_grad(op(sample.input, *sample.args,
                                                        **sample.kwargs))
            with H.no_fallback():
                mlx_in = H.sample_to_mlx((sample.input, sample.args, sample.kwargs), keep)
                actual = H._results_to_cpu(sample.output_process_fn_grad(
                    op(mlx_in[0], *mlx_in[1], **mlx_in[2])))
            _show("cpu", expected)
            _show("mlx", actual)
            _where(actual, expected)
        print(f"=== {spec}: {shown} failing sample(s) shown")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
