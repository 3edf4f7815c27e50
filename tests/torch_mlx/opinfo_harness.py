"""Compare an OpInfo's samples on "mlx" with the same samples on the CPU.

Shared by tests/torch_mlx/test_opinfo.py (one pytest test per op and dtype) and
tools/conformance.py (the in-process sweep), so both count the same way.

How a sample is compared (the mirror image of test_ops.py's test_compare_cpu):
- samples come from ``op.sample_inputs("cpu", dtype)`` (seeded); each tensor is copied to "mlx"
  with the same storage size, strides and offset (views, expanded and non-contiguous inputs stay
  so), and ``device="cpu"`` arguments become "mlx". Generating on the CPU keeps the instrument
  independent of the device's own random and factory ops. A tensor that the sample generator
  puts on the CPU whatever the device (tensor_split's indices, CPU index tensors of
  __getitem__ / index_put: found by generating the samples for "meta" too) stays on the CPU;
- the op runs on both; the "mlx" outputs must be "mlx" tensors, are copied to the CPU with the
  native copy (no lowering involved) and compared with torch's ``TestCase.assertEqual`` at the
  default tolerances of the dtype (no op-specific overrides);
- when the CPU raises for a sample, "mlx" must raise the same exception type;
- a sample with no tensor and no device argument (``torch.arange(2)``) runs on "mlx" under
  ``torch.device("mlx")``, the way such a call is placed on a device;
- a sample that needs float64, complex128 or complex32 (an argument, or the CPU's result) can
  only raise on "mlx", which has no storage for them: when it raises the TypeError naming the
  dtype it is counted apart ("unsupported_dtype"), neither passing nor failing;
- ops whose values are random or uninitialised (``NOT_VALUE_COMPARABLE``) are compared on
  structure, shape and dtype only.
The CPU fallback is switched off while comparing: an op without a lowering must fail here.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings

import torch
import torch_mlx
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_utils import TestCase, set_rng_seed

from expected_failures import EXPECTED_FAILURES, NOT_VALUE_COMPARABLE

DEVICE = "mlx"

# What a sample can come to. Only "pass" passes.
PASS = "pass"
MISMATCH = "mismatch"  # ran, gave different numbers / shapes / dtypes than the CPU
NOT_IMPLEMENTED = "not_implemented"  # NotImplementedError: an aten op without a lowering
ERROR = "error"  # any other exception on "mlx" where the CPU succeeded (or a different one)
FAILURE_KINDS = (MISMATCH, ERROR, NOT_IMPLEMENTED)
UNSUPPORTED_DTYPE = "unsupported_dtype"  # needs a dtype mlx has no storage for: TypeError by design
# dtypes with no MLX storage -> the names a TypeError may call them by (torch's and c10's)
UNSUPPORTED_DTYPES = {torch.float64: ("float64", "Double"),
                      torch.complex128: ("complex128", "ComplexDouble"),
                      torch.complex32: ("complex32", "ComplexHalf")}

_MISSING_OP = re.compile(r"(aten::[\w.]+) has no MLX lowering")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ops_for_dtype(dtype: torch.dtype, names=None) -> list:
    """op_db entries (by full name, variants included) that support ``dtype`` on the CPU."""
    ops = [op for op in op_db if dtype in op.supported_dtypes("cpu")]
    if names is not None:
        wanted = set(names)
        unknown = wanted - {op.full_name for op in op_db}
        if unknown:
            raise ValueError(f"not OpInfo names in op_db: {sorted(unknown)}")
        ops = [op for op in ops if op.full_name in wanted]
    return ops


def without_decorators(op):
    """A copy of ``op`` without its skips, xfails and tolerance overrides.

    Those decorators target torch's own CPU/CUDA test classes; a plain decorator among them
    (e.g. precisionOverride) would apply to every test of the op, including ours, and silently
    loosen or skip it. Expected outcomes for "mlx" come from expected_failures.py alone."""
    bare = copy.copy(op)
    bare.decorators = ()
    return bare


# ----------------------------------------------------------------------------------------------
# Moving samples and results


def _copy_same_layout(t: torch.Tensor, device: str) -> torch.Tensor:
    """A copy of ``t`` on ``device`` with the same storage extent, sizes, strides and offset."""
    if t.layout != torch.strided:
        raise TypeError(f"sample has a {t.layout} tensor; only strided tensors can move to mlx")
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    storage = t.untyped_storage()
    flat = torch.empty(0, dtype=t.dtype).set_(storage, 0, (storage.nbytes() // t.element_size(),),
                                              (1,))
    flat = flat.to(device) if device != "cpu" else flat.clone()
    moved = flat.as_strided(t.size(), t.stride(), t.storage_offset())
    return moved.requires_grad_(t.requires_grad) if t.is_leaf else moved


def _is_cpu_device(x) -> bool:
    if isinstance(x, torch.device):
        return x.type == "cpu"
    return isinstance(x, str) and x in ("cpu", "cpu:0")


def sample_to_mlx(value, keep_on_cpu=None):
    """A sample's input/args/kwargs with tensors copied to "mlx" and CPU device arguments made
    "mlx". ``keep_on_cpu``: one flag per leaf (in ``_leaves`` order) for tensors that stay on
    the CPU (copied there, since the CPU run may write into the originals)."""
    flags = iter(keep_on_cpu) if keep_on_cpu is not None else None

    def move(v):
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        pinned = next(flags) if flags is not None else False
        if isinstance(v, torch.Tensor):
            return _copy_same_layout(v, "cpu" if pinned else DEVICE)
        if _is_cpu_device(v):
            return torch.device(DEVICE) if isinstance(v, torch.device) else DEVICE
        return v

    return move(value)


def _cpu_pinned_leaves(cpu_sample, meta_sample):
    """Per leaf of a CPU sample: is it a tensor that its twin made for "meta" left on the CPU?
    None when the twins differ in structure (then every tensor moves)."""
    cpu = list(_leaves((cpu_sample.input, cpu_sample.args, cpu_sample.kwargs)))
    meta = list(_leaves((meta_sample.input, meta_sample.args, meta_sample.kwargs)))
    if len(cpu) != len(meta) or any(isinstance(c, torch.Tensor) != isinstance(m, torch.Tensor)
                                    for c, m in zip(cpu, meta)):
        return None
    return tuple(isinstance(m, torch.Tensor) and m.device.type == "cpu" for m in meta)


def _leaves(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _names_a_device(value) -> bool:
    """Does a sample carry a tensor or a device argument (else it is a bare factory call)?"""
    return any(isinstance(v, (torch.Tensor, torch.device)) or _is_cpu_device(v)
               for v in _leaves(value))


def _other_devices(value) -> frozenset:
    """Device types other than the CPU that a sample names (torch.device or a device string)."""
    named = set()
    for v in _leaves(value):
        if isinstance(v, (torch.device, str)):
            try:
                named.add(torch.device(v).type)
            except (RuntimeError, ValueError):
                pass
    return frozenset(named - {"cpu", DEVICE})


def _unsupported_dtype_in(*values) -> torch.dtype | None:
    for v in _leaves(values):
        dtype = v.dtype if isinstance(v, torch.Tensor) else v
        if isinstance(dtype, torch.dtype) and dtype in UNSUPPORTED_DTYPES:
            return dtype
    return None


def _results_to_cpu(value, other_devices=frozenset()):
    """"mlx" results copied to the CPU; a result tensor on another device is an error, unless the
    sample names that device (``x.to("cuda")`` samples, made where torch has CUDA)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != DEVICE and value.device.type not in other_devices:
            raise AssertionError(f"the op returned a tensor on {value.device}, not on {DEVICE}")
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        items = [_results_to_cpu(v, other_devices) for v in value]
        if hasattr(value, "_fields"):  # collections.namedtuple takes the items one by one
            return type(value)(*items)
        return type(value)(items)  # list, tuple, torch.return_types (structseq)
    if isinstance(value, dict):
        return {k: _results_to_cpu(v, other_devices) for k, v in value.items()}
    return value


def _structure(value):
    """Type, shape and dtype of every tensor in a result: what random ops are compared on."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_structure(v) for v in value))
    return (type(value).__name__,)


class _Comparer(TestCase):
    """torch's TestCase.assertEqual, outside a test: default tolerances for the dtype."""

    def runTest(self):  # unittest requires a test method to instantiate the case
        pass


_COMPARER = _Comparer()


# ----------------------------------------------------------------------------------------------
# One sample, one op


@dataclasses.dataclass
class SampleResult:
    status: str
    message: str = ""
    missing_op: str | None = None  # the aten op named by a NotImplementedError


@contextlib.contextmanager
def no_fallback():
    """An op without a lowering must fail the comparison, not run on the CPU."""
    was = torch_mlx.fallback_enabled()
    torch_mlx.set_fallback(False)
    try:
        yield
    finally:
        torch_mlx.set_fallback(was)


def _exception_result(exc: BaseException) -> SampleResult:
    message = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, NotImplementedError):
        found = _MISSING_OP.search(str(exc))
        if found:  # the rest of the message is the same advice for every op
            return SampleResult(NOT_IMPLEMENTED, f"no MLX lowering for {found.group(1)}",
                                found.group(1))
        return SampleResult(NOT_IMPLEMENTED, message)
    return SampleResult(ERROR, message)


def _dtype_or_exception_result(exc: BaseException, unsupported) -> SampleResult:
    """The designed TypeError for a sample that needs float64/complex128, else a failure."""
    if unsupported is not None and isinstance(exc, TypeError) \
            and any(name in str(exc) for name in UNSUPPORTED_DTYPES[unsupported]):
        return SampleResult(UNSUPPORTED_DTYPE, f"{type(exc).__name__}: {exc}")
    return _exception_result(exc)


def run_sample(op, sample, keep_on_cpu=None) -> SampleResult:
    """Run one CPU sample on "mlx" and on the CPU and compare (see the module docstring)."""
    value_comparable = value_comparable_sample(op.full_name, sample)
    cpu_args = (sample.input, sample.args, sample.kwargs)
    unsupported = _unsupported_dtype_in(cpu_args)
    # a bare factory call is placed on "mlx" the way users do it: torch.device("mlx") as context
    placement = contextlib.nullcontext() if _names_a_device(cpu_args) else torch.device(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mlx_args = sample_to_mlx(cpu_args, keep_on_cpu)
        except Exception as exc:  # e.g. a sparse input, or a dtype mlx has no storage for
            return _dtype_or_exception_result(exc, unsupported)
        pristine = _map_tensors(cpu_args, lambda t: _copy_same_layout(t, "cpu"))
        try:  # the CPU run may mutate the CPU sample: the "mlx" copy was taken first
            expected = sample.output_process_fn_grad(
                op(sample.input, *sample.args, **sample.kwargs))
            cpu_error = None
            unsupported = unsupported or _unsupported_dtype_in(expected)
        except Exception as exc:
            cpu_error = exc
        try:
            with no_fallback(), placement:
                mlx_input, mlx_pos, mlx_kw = mlx_args
                actual = _results_to_cpu(
                    sample.output_process_fn_grad(op(mlx_input, *mlx_pos, **mlx_kw)),
                    _other_devices(cpu_args))
        except Exception as exc:
            if cpu_error is not None and type(exc) is type(cpu_error):
                return SampleResult(PASS)
            result = _dtype_or_exception_result(exc, unsupported)
            if cpu_error is not None and result.status == ERROR:
                result.message = (f"CPU raised {type(cpu_error).__name__}, mlx raised "
                                  + result.message)
            return result
    if cpu_error is not None:
        return SampleResult(ERROR, f"CPU raised {type(cpu_error).__name__}: {cpu_error}; "
                                   "mlx raised nothing")
    try:
        if value_comparable:
            _COMPARER.assertEqual(actual, expected)
        else:
            _COMPARER.assertEqual(_structure(actual), _structure(expected))
    except AssertionError as exc:
        note = _float64_note(op, sample, pristine, actual, expected) if value_comparable else ""
        return SampleResult(MISMATCH, f"{exc}{note}")
    return SampleResult(PASS)


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _float64_note(op, sample, pristine, actual, expected) -> str:
    """For a mismatch: how far each side is from the op run in float64 on the CPU. Two results
    that are equally far from it differ by rounding (summation order), not by a bug."""
    def widen(t):
        return t.double() if t.is_floating_point() else t

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = _map_tensors(pristine, widen)
            reference = sample.output_process_fn_grad(op(args[0], *args[1], **args[2]))
    except Exception:  # no float64 kernel, or a float64 input the op rejects: no note
        return ""
    err_mlx = err_cpu = None
    for a, e, r in zip(*(list(t for t in _leaves(x) if isinstance(t, torch.Tensor))
                         for x in (actual, expected, reference))):
        if not (a.is_floating_point() and a.shape == e.shape == r.shape):
            continue
        r = r.double()
        finite = torch.isfinite(r) & torch.isfinite(a) & torch.isfinite(e)
        if finite.any():
            err_mlx = max(err_mlx or 0.0, (a.double() - r)[finite].abs().max().item())
            err_cpu = max(err_cpu or 0.0, (e.double() - r)[finite].abs().max().item())
    if err_mlx is None:  # no floating-point result to measure (indices, integers)
        return ""
    return (f" | against the op in float64 on the CPU: max |mlx - f64| = {err_mlx:.3g}, "
            f"max |cpu - f64| = {err_cpu:.3g}")


def value_comparable_sample(op_name: str, sample) -> bool:
    entry = NOT_VALUE_COMPARABLE.get(op_name)
    if entry is None:
        return True
    _reason, applies = entry
    return not applies(sample)


SAMPLE_SEED = 0


def samples_of(op, dtype: torch.dtype) -> list:
    """The op's samples at ``dtype``, the same in every run and whatever ran before (the sweep,
    one pytest test, or another order): generators draw from torch's, Python's and NumPy's
    global RNGs, all three seeded here once. (op_db would otherwise reseed before each sample
    with a hash of the running test's name, so pytest and the sweep would see other values.)

    Returns (sample, keep_on_cpu) pairs; keep_on_cpu (see sample_to_mlx) comes from the same
    samples made for "meta", a non-CPU device: tensors the generator still put on the CPU are
    meant to be there. None: every tensor moves to "mlx"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_rng_seed(SAMPLE_SEED)
        samples = list(op.sample_inputs("cpu", dtype, set_seed=False))
        try:
            set_rng_seed(SAMPLE_SEED)
            twins = list(op.sample_inputs("meta", dtype, set_seed=False))
        except Exception:  # a generator that needs data (e.g. .item()): no twins, all move
            twins = []
    if len(twins) != len(samples):
        return [(sample, None) for sample in samples]
    return [(sample, _cpu_pinned_leaves(sample, twin)) for sample, twin in zip(samples, twins)]


@dataclasses.dataclass
class OpReport:
    """Every sample of one op at one dtype."""
    name: str
    dtype: str
    counts: dict  # status -> number of samples
    first_message: dict  # failure kind -> first message seen
    missing_ops: list  # aten ops named by NotImplementedErrors, in order of first appearance
    value_compared: bool = True  # False for NOT_VALUE_COMPARABLE ops (structure only)

    @property
    def samples(self) -> int:
        """Samples that count: all but those needing a dtype mlx rejects by design."""
        return sum(n for status, n in self.counts.items() if status != UNSUPPORTED_DTYPE)

    @property
    def passed(self) -> bool:
        return self.samples > 0 and self.counts.get(PASS, 0) == self.samples

    @property
    def status(self) -> str:
        """pass, or the most serious failure kind seen: mismatch > error > not_implemented;
        no_samples / unsupported_dtype when no sample counts."""
        if self.samples == 0:
            return UNSUPPORTED_DTYPE if self.counts.get(UNSUPPORTED_DTYPE) else "no_samples"
        for kind in FAILURE_KINDS:
            if self.counts.get(kind):
                return kind
        return PASS

    def describe(self) -> str:
        parts = [f"{self.name} [{self.dtype}]: {self.counts.get(PASS, 0)}/{self.samples} "
                 "samples pass"]
        if self.counts.get(UNSUPPORTED_DTYPE):
            parts.append(f"{self.counts[UNSUPPORTED_DTYPE]} more need a dtype without MLX "
                         "storage and raise the designed TypeError")
        for kind in FAILURE_KINDS:
            if self.counts.get(kind):
                parts.append(f"{self.counts[kind]} {kind}; first: "
                             f"{_shorten(self.first_message[kind])}")
        if self.missing_ops:
            parts.append("missing lowerings: " + ", ".join(self.missing_ops))
        return "\n  ".join(parts)


def _shorten(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def new_report(op, dtype: torch.dtype) -> OpReport:
    return OpReport(op.full_name, dtype_name(dtype), {}, {}, [],
                    value_compared=op.full_name not in NOT_VALUE_COMPARABLE)


def record(report: OpReport, result: SampleResult) -> None:
    report.counts[result.status] = report.counts.get(result.status, 0) + 1
    if result.status in FAILURE_KINDS:
        report.first_message.setdefault(result.status, _shorten(result.message, 2000))
    if result.missing_op and result.missing_op not in report.missing_ops:
        report.missing_ops.append(result.missing_op)


def compare_op(op, dtype: torch.dtype) -> OpReport:
    """Run every sample of ``op`` at ``dtype``; never raises for a failing sample."""
    report = new_report(op, dtype)
    for sample, keep_on_cpu in samples_of(op, dtype):
        record(report, run_sample(op, sample, keep_on_cpu))
    return report


def expected_failure_reason(op_name: str, dtype: torch.dtype) -> str | None:
    return EXPECTED_FAILURES.get((op_name, dtype_name(dtype)))


def mlx_kernel_kind(aten_name: str) -> str | None:
    """How an aten overload ("add.Tensor", "mm") runs on "mlx": "mlx" (a lowering or native
    kernel for PrivateUse1), "composite" (torch's CompositeExplicit/ImplicitAutograd kernel,
    built on other ops), or None (it would reach the fallback: NotImplementedError)."""
    qualified = f"aten::{aten_name}"
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if has(qualified, "PrivateUse1"):
        return "mlx"
    if has(qualified, "CompositeExplicitAutograd") or has(qualified, "CompositeImplicitAutograd"):
        return "composite"
    if has(qualified, "CompositeExplicitAutogradNonFunctional"):
        # the functional form of a structured op: its kernel just calls the out= overload
        base = aten_name.split(".")[0]
        packet = getattr(torch.ops.aten, base)
        out = next((o for o in packet.overloads() if o == "out" or o.endswith("_out")), None)
        return "composite" if out and mlx_kernel_kind(f"{base}.{out}") else None
    return None
