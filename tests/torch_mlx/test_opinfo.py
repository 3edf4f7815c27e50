"""PyTorch's OpInfo database on "mlx": every sample of every op against the same sample on CPU.

One test per (op, dtype): test_matches_cpu_<op>_mlx_<dtype>. How a sample is compared is in
opinfo_harness.py (shared with tools/conformance.py, the faster full sweep); expected failures
are in expected_failures.py, the only place they live. A listed op that passes fails its test,
so the list only shrinks.

Which ops run:
- by default, all of op_db at float32, float16, bfloat16, int64 and bool;
- with CI=true, the CI subset (CI_OPS below; about 5 minutes on 2 cores): every OpInfo that tests
  an aten op of vLLM's models and sampler or of the transformers models (llm_ops.py, generated
  by tools/trace_llm_ops.py) at float32 / float16 / bfloat16, plus a hand-picked spread over the
  other op families at float32 with integer and bool variants where the family has them.
"""
import os
import signal

import pytest
import torch
import torch_mlx  # noqa: F401  (registers "mlx" before torch's device-type test bases are built)
from torch.testing._internal.common_device_type import (  # noqa: E402
    instantiate_device_type_tests, ops)
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_utils import TestCase  # noqa: E402

import llm_ops  # noqa: E402
import opinfo_harness as harness  # noqa: E402
from expected_failures import EXPECTED_FAILURES, NOT_VALUE_COMPARABLE  # noqa: E402

SWEEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
OP_TIMEOUT_S = 300  # one op's samples; a hung op fails instead of stalling the run

# A spread over the families of issue 4 beyond what the LLM paths use (those come from llm_ops):
# op name -> dtypes. Chosen to touch each family's distinct code paths once: a unary and a
# binary ufunc of each kind, promotion (int -> float), reductions with and without dim, scans,
# views vs copies, gathers and scatters, pooling and conv, losses, creation, random, sorting.
FAMILY_SPREAD = {
    # elementwise
    "exp": ("float32",), "log1p": ("float32",), "sigmoid": ("float32",), "erf": ("float32",),
    "floor": ("float32",), "sign": ("float32", "int64"), "clamp": ("float32", "int64"),
    "div.floor_rounding": ("float32", "int64"), "remainder": ("float32", "int64"),
    "maximum": ("float32",), "pow": ("float32", "int64"), "atan2": ("float32",),
    "eq": ("float32", "int64", "bool"), "ne": ("float32",), "logical_and": ("bool",),
    "logical_not": ("bool",), "bitwise_and": ("int64", "bool"), "bitwise_xor": ("int64",),
    "isnan": ("float32",), "lerp": ("float32",), "addcmul": ("float32",),
    # reductions and scans
    "prod": ("float32", "int64"), "var": ("float32",), "std": ("float32",),
    "max.reduction_with_dim": ("float32", "int64"), "min.reduction_no_dim": ("float32",),
    "any": ("bool", "float32"), "cumsum": ("float32", "int64"), "cumprod": ("float32",),
    "logsumexp": ("float32",), "linalg.vector_norm": ("float32",), "argmin": ("float32",),
    # linalg
    "matmul": ("float32",), "baddbmm": ("float32",), "einsum": ("float32",),
    "nn.functional.linear": ("float32",),
    # shape ops that compute
    "flip": ("float32",), "roll": ("float32",), "tril": ("float32",), "triu": ("bool",),
    "stack": ("float32",), "nn.functional.pad.constant": ("float32",),
    "nn.functional.pad.reflect": ("float32",), "permute": ("float32",),
    "reshape": ("float32",), "chunk": ("float32",), "repeat_interleave": ("float32",),
    # indexing
    "index_put": ("float32",), "index_copy": ("float32",), "scatter_add": ("float32",),
    "scatter_reduce.sum": ("float32",), "masked_select": ("float32",), "nonzero": ("float32",),
    "take": ("float32",), "masked_fill": ("float32",), "index_add": ("float32",),
    # nn
    "nn.functional.layer_norm": ("float32",), "nn.functional.group_norm": ("float32",),
    "nn.functional.rms_norm": ("float32", "bfloat16"), "nn.functional.conv1d": ("float32",),
    "nn.functional.conv2d": ("float32",), "nn.functional.max_pool2d": ("float32",),
    "nn.functional.avg_pool2d": ("float32",), "nn.functional.relu": ("float32",),
    "nn.functional.dropout": ("float32",),
    "nn.functional.scaled_dot_product_attention": ("float32", "float16", "bfloat16"),
    "nn.functional.cross_entropy": ("float32",), "nn.functional.nll_loss": ("float32",),
    # creation
    "full": ("float32",), "eye": ("float32",), "linspace": ("float32",),
    "zeros_like": ("float32",),
    # random (structure only for the random samples)
    "normal": ("float32",), "uniform": ("float32",), "bernoulli": ("float32",),
    "multinomial": ("float32",),
    # sorting
    "argsort": ("float32",), "unique": ("float32",),
}

_LLM_DTYPES = ("float32", "float16", "bfloat16")


def ci_ops() -> dict:
    """OpInfo full name -> dtype names of the CI subset."""
    chosen = {name: set(_LLM_DTYPES)
              for name in llm_ops.LLM_OPINFOS + llm_ops.TRANSFORMERS_OPINFOS}
    for name, dtypes in FAMILY_SPREAD.items():
        chosen.setdefault(name, set()).update(dtypes)
    return chosen


CI_OPS = ci_ops()


def _ops_under_test():
    known = {op.full_name for op in op_db}
    unknown = set(CI_OPS) - known
    if unknown:  # a renamed OpInfo must not silently drop out of CI
        raise RuntimeError(f"CI_OPS names not in op_db: {sorted(unknown)}")
    chosen = []
    for op in op_db:
        if IN_CI and op.full_name not in CI_OPS:
            continue
        bare = harness.without_decorators(op)
        if IN_CI:  # the dtypes @ops instantiates for "mlx" come from dtypesIf["mlx"]
            wanted = {harness.dtype_from_name(d) for d in CI_OPS[op.full_name]}
            bare.dtypesIf = {**op.dtypesIf, "mlx": op.supported_dtypes("cpu") & wanted}
        chosen.append(bare)
    return chosen


class _OpTimeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise _OpTimeout(f"the op's samples ran longer than {OP_TIMEOUT_S} s")


class TestOpInfo(TestCase):
    @ops(_ops_under_test(), allowed_dtypes=SWEEP_DTYPES)
    def test_matches_cpu(self, device, dtype, op):
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.alarm(OP_TIMEOUT_S)
        try:
            report = harness.compare_op(op, dtype)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        if report.status == "no_samples":
            self.skipTest("op_db has no samples of this op at this dtype: nothing to compare")
        if report.status == harness.UNSUPPORTED_DTYPE:
            return  # every sample needs float64/complex128 and raised the designed TypeError
        reason = harness.expected_failure_reason(op.full_name, dtype)
        if reason is None:
            if not report.passed:
                self.fail(report.describe())
        elif report.passed:
            self.fail(f"{op.full_name} [{harness.dtype_name(dtype)}] is listed in "
                      f"expected_failures.py ({reason!r}) but now passes: delete the entry")
        else:
            pytest.xfail(f"{reason} | {report.describe()}")


instantiate_device_type_tests(TestOpInfo, globals(), only_for="mlx")

# The stock PrivateUse1TestBase serves "mlx" (torch_mlx registers torch.mlx with
# is_available()), so no test base of our own is needed. If that ever stops being true the
# class above would silently not exist and pytest would collect nothing from it: fail instead.
if "TestOpInfoMLX" not in globals() and "TestOpInfoPRIVATEUSE1" not in globals():
    raise RuntimeError("instantiate_device_type_tests made no test class for device 'mlx'")


# ----------------------------------------------------------------------------------------------
# The lists themselves


def test_expected_failures_are_well_formed():
    by_name = {op.full_name: op for op in op_db}
    for (name, dtype), reason in EXPECTED_FAILURES.items():
        assert name in by_name, f"expected_failures.py: {name!r} is not an op_db OpInfo"
        dtype_obj = harness.dtype_from_name(dtype)
        assert dtype_obj in by_name[name].supported_dtypes("cpu"), \
            f"expected_failures.py: {name} has no {dtype} samples"
        assert isinstance(reason, str) and len(reason.strip()) >= 10, \
            f"expected_failures.py: ({name}, {dtype}) needs a reason that explains the failure"
    for name, (reason, applies) in NOT_VALUE_COMPARABLE.items():
        assert name in by_name, f"NOT_VALUE_COMPARABLE: {name!r} is not an op_db OpInfo"
        assert reason and callable(applies)


def test_llm_opinfos_exist():
    names = {op.full_name for op in op_db}
    listed = set(llm_ops.LLM_OPINFOS) | set(llm_ops.TRANSFORMERS_OPINFOS)
    assert listed <= names, sorted(listed - names)


def test_every_llm_aten_op_has_an_mlx_kernel():
    """vLLM's models and sampler need each of these overloads on "mlx": a lowering (or native
    kernel) registered for PrivateUse1, or a CompositeExplicitAutograd kernel built on others."""
    missing = [name for name in llm_ops.LLM_ATEN_OPS if harness.mlx_kernel_kind(name) is None]
    assert not missing, f"aten ops used by vLLM with no mlx kernel: {missing}"
