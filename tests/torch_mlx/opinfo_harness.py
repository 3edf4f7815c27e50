"""Compare an OpInfo's inputs on "mlx" with the same inputs on the CPU.

Shared by tests/torch_mlx/test_opinfo.py (one pytest test per op and dtype) and
tools/conformance.py (the in-process sweep), so both count the same way.

Three kinds of input (INPUT_KINDS), each counted apart:
- "samples": ``op.sample_inputs("cpu", dtype)``;
- "reference": ``op.reference_inputs("cpu", dtype)`` (what test_ops.py's test_compare_cpu runs),
  less those already among the samples: reference generators mostly start with the samples, so
  a reference input whose structure, dtypes, shapes, strides and values equal a sample's is not
  run again (``duplicates`` counts them). An op without a reference generator has none;
- "error": ``op.error_inputs("cpu")`` (test_ops.py's test_errors; no dtype, so the same inputs in
  every dtype's run): "mlx" must raise the ErrorInput's error_type with a message matching its
  error_regex, as the CPU does. An error input that the CPU does not raise as declared (a few
  generic ones for binary ops) is compared like a sample and counted (``cpu_not_raising``).
  Error inputs that mix the device's tensors with CPU tensors (where's and dot's device checks)
  cannot be made on the CPU: those are made for "mlx" and run there alone.

How a sample is compared (the mirror image of test_ops.py's test_compare_cpu):
- samples come from the generators above on the CPU (seeded); each tensor is copied to "mlx"
  with the same storage size, strides and offset (views, expanded and non-contiguous inputs stay
  so; tensors sharing a storage share one on "mlx", a tensor passed twice is one tensor), and
  ``device="cpu"`` arguments become "mlx". Generating on the CPU keeps the instrument
  independent of the device's own random and factory ops. A tensor that the sample generator
  puts on the CPU whatever the device (tensor_split's indices, CPU index tensors of
  __getitem__ / index_put: found by generating the samples for "meta" too) stays on the CPU,
  and one it puts on another device ("meta", in error inputs) stays there;
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

import collections
import contextlib
import copy
import dataclasses
import hashlib
import re
import warnings

import torch
import torch_mlx
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_utils import TestCase, set_rng_seed

from expected_failures import (EXPECTED_ERROR_FAILURES, EXPECTED_FAILURES,
                               EXPECTED_REFERENCE_FAILURES, NOT_VALUE_COMPARABLE)

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


def _copy_same_layout(t: torch.Tensor, device: str, storages: dict | None = None) -> torch.Tensor:
    """A copy of ``t`` on ``device`` with the same storage extent, sizes, strides and offset.
    ``storages``: the copies made so far, by (device, storage, dtype): tensors that share a
    storage on the CPU (a view and its base, out= aliasing an input) share one there too."""
    if t.layout != torch.strided:
        raise TypeError(f"sample has a {t.layout} tensor; only strided tensors can move to mlx")
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    storage = t.untyped_storage()
    key = (device, storage._cdata, t.dtype)
    flat = storages.get(key) if storages is not None else None
    if flat is None:
        flat = torch.empty(0, dtype=t.dtype).set_(
            storage, 0, (storage.nbytes() // t.element_size(),), (1,))
        flat = flat.to(device) if device != "cpu" else flat.clone()
        if storages is not None:
            storages[key] = flat
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
    storages = {}  # see _copy_same_layout: aliasing among the sample's tensors is kept
    tensors = {}  # a tensor passed twice (out= one of the inputs) is one tensor on "mlx" too

    def move(v):
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        pinned = next(flags) if flags is not None else False
        if isinstance(v, torch.Tensor):
            if v.device.type != "cpu":  # put on another device on purpose (a "meta" tensor)
                return v
            device = "cpu" if pinned else DEVICE
            if (device, id(v)) not in tensors:
                tensors[device, id(v)] = _copy_same_layout(v, device, storages)
            return tensors[device, id(v)]
        if _is_cpu_device(v):
            return torch.device(DEVICE) if isinstance(v, torch.device) else DEVICE
        return v

    return move(value)


def _cpu_pinned_leaves(cpu_sample, meta_sample):
    """Per leaf of a CPU sample: is it a tensor that its twin made for "meta" left on the CPU?
    None when the twins differ in structure, or when the twin has no tensor on "meta" at all
    (a generator that ignores the device, e.g. logsumexp's torch.tensor(inf)): every tensor
    moves then."""
    cpu = list(_leaves((cpu_sample.input, cpu_sample.args, cpu_sample.kwargs)))
    meta = list(_leaves((meta_sample.input, meta_sample.args, meta_sample.kwargs)))
    if len(cpu) != len(meta) or any(isinstance(c, torch.Tensor) != isinstance(m, torch.Tensor)
                                    for c, m in zip(cpu, meta)):
        return None
    if not any(isinstance(m, torch.Tensor) and m.device.type == "meta" for m in meta):
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
    """Device types other than the CPU that a sample names: a torch.device, a device string, or
    a tensor made there (``x.to(other)`` samples carry a "cuda" tensor where torch has CUDA)."""
    named = set()
    for v in _leaves(value):
        if isinstance(v, torch.Tensor):
            named.add(v.device.type)
        elif isinstance(v, (torch.device, str)):
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
    cpu_not_raising: bool = False  # an error input the CPU does not raise as declared


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


@dataclasses.dataclass
class _Run:
    """What one input did on each device."""
    unsupported: torch.dtype | None = None  # a dtype without MLX storage in the input or result
    move_error: BaseException | None = None  # copying the input to "mlx" failed: nothing ran
    pristine: object = None  # a CPU copy of (input, args, kwargs) taken before the CPU ran
    cpu_value: object = None
    cpu_error: BaseException | None = None
    mlx_value: object = None  # already copied back to the CPU
    mlx_error: BaseException | None = None


def _run_both(op, sample, keep_on_cpu) -> _Run:
    cpu_args = (sample.input, sample.args, sample.kwargs)
    run = _Run(unsupported=_unsupported_dtype_in(cpu_args))
    # a bare factory call is placed on "mlx" the way users do it: torch.device("mlx") as context;
    # a bare call that no device context places (sub(2.0, 3.0)) runs on the CPU everywhere
    bare = not _names_a_device(cpu_args)
    placement = torch.device(DEVICE) if bare else contextlib.nullcontext()
    # results may be on a device the sample names, or on the CPU for a bare call the device
    # context does not place
    other_devices = _other_devices(cpu_args)
    if bare and not _follows_device_context(op, sample):
        other_devices = other_devices | {"cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mlx_args = sample_to_mlx(cpu_args, keep_on_cpu)
        except Exception as exc:  # e.g. a sparse input, or a dtype mlx has no storage for
            run.move_error = exc
            return run
        run.pristine = _map_tensors(
            cpu_args, lambda t: _copy_same_layout(t, "cpu") if t.device.type == "cpu" else t)
        try:  # the CPU run may mutate the CPU sample: the "mlx" copy was taken first
            run.cpu_value = sample.output_process_fn_grad(
                op(sample.input, *sample.args, **sample.kwargs))
            run.unsupported = run.unsupported or _unsupported_dtype_in(run.cpu_value)
        except Exception as exc:
            run.cpu_error = exc
        try:
            with no_fallback(), placement:
                mlx_input, mlx_pos, mlx_kw = mlx_args
                run.mlx_value = _results_to_cpu(
                    sample.output_process_fn_grad(op(mlx_input, *mlx_pos, **mlx_kw)),
                    other_devices)
        except Exception as exc:
            run.mlx_error = exc
    return run


def _follows_device_context(op, sample) -> bool:
    """Does a bare call (no tensor, no device argument) put its result on the device of a
    ``torch.device(...)`` context? Factory ops do; ops on Python numbers alone (sub(2.0, 3.0))
    return CPU tensors under any context, "cuda" as "mlx". Asked of the "meta" device."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            result = op(sample.input, *sample.args, **sample.kwargs)
    except Exception:  # cannot tell: the result must be on "mlx"
        return True
    tensors = [t for t in _leaves(result) if isinstance(t, torch.Tensor)]
    return not tensors or any(t.device.type == "meta" for t in tensors)


def _judge_sample(op, sample, run: _Run) -> SampleResult:
    if run.move_error is not None:
        return _dtype_or_exception_result(run.move_error, run.unsupported)
    cpu_error = run.cpu_error
    if run.mlx_error is not None:
        if cpu_error is not None and type(run.mlx_error) is type(cpu_error):
            return SampleResult(PASS)
        result = _dtype_or_exception_result(run.mlx_error, run.unsupported)
        if cpu_error is not None and result.status == ERROR:
            result.message = (f"CPU raised {type(cpu_error).__name__}, mlx raised "
                              + result.message)
        return result
    if cpu_error is not None:
        return SampleResult(ERROR, f"CPU raised {type(cpu_error).__name__}: {cpu_error}; "
                                   "mlx raised nothing")
    value_comparable = value_comparable_sample(op.full_name, sample)
    actual, expected = run.mlx_value, run.cpu_value
    try:
        if value_comparable:
            _COMPARER.assertEqual(actual, expected)
        else:
            _COMPARER.assertEqual(_structure(actual), _structure(expected))
    except AssertionError as exc:
        note = (_float64_note(op, sample, run.pristine, actual, expected)
                if value_comparable else "")
        return SampleResult(MISMATCH, f"{exc}{note}")
    return SampleResult(PASS)


def run_sample(op, sample, keep_on_cpu=None) -> SampleResult:
    """Run one CPU sample on "mlx" and on the CPU and compare (see the module docstring)."""
    return _judge_sample(op, sample, _run_both(op, sample, keep_on_cpu))


def _raised_as_declared(exc: BaseException | None, error_input) -> bool:
    """Would torch's test_errors accept ``exc`` (assertRaisesRegex: a subclass of error_type
    whose message re.search-es error_regex)?"""
    return (exc is not None and isinstance(exc, error_input.error_type)
            and re.search(error_input.error_regex, str(exc)) is not None)


@dataclasses.dataclass
class ErrorCase:
    """An ErrorInput made on the CPU, and the error its generator declares for the same input
    on a device other than the CPU where that differs (``elsewhere``: an ErrorInput made for
    "meta"). A few generators branch on the device: narrow_copy's out-of-range dim is the CPU
    kernel's RuntimeError on the CPU, the IndexError of torch's composite elsewhere.

    ``cross_device``: an ErrorInput made for "mlx" that mixes CPU and "mlx" tensors (where's,
    dot's "Expected all tensors to be on the same device"): the CPU has no such call, so it
    runs on "mlx" alone."""
    error_input: object
    elsewhere: object = None
    cross_device: bool = False


def _run_cross_device(op, error_input) -> SampleResult:
    sample = error_input.sample_input
    exc = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with no_fallback():
                op(sample.input, *sample.args, **sample.kwargs)
        except Exception as raised:
            exc = raised
    if _raised_as_declared(exc, error_input):
        return SampleResult(PASS)
    declared = f"{error_input.error_type.__name__} matching {error_input.error_regex!r}"
    if exc is None:
        return SampleResult(MISMATCH, f"expected {declared}; mlx raised nothing")
    result = _exception_result(exc)
    if result.status == ERROR:
        return SampleResult(MISMATCH, f"expected {declared}; mlx raised "
                                      f"{type(exc).__name__}: {exc}")
    return result


def run_error_input(op, case, keep_on_cpu=None) -> SampleResult:
    """Run one ErrorInput (made on the CPU; or an ErrorCase) on "mlx" and on the CPU: "mlx" must
    raise the declared error_type with a message matching error_regex, as the CPU does (or as
    the generator declares for other devices, where it says otherwise). Anything else is a
    mismatch (another exception, or none: a silent result), except a missing lowering
    (not_implemented) and the designed TypeError for float64/complex128 (unsupported_dtype).
    Where the CPU itself does not raise as declared, the input is compared like a sample.
    A cross-device case runs on "mlx" alone and must raise as declared."""
    if not isinstance(case, ErrorCase):
        case = ErrorCase(case)
    error_input = case.error_input
    if case.cross_device:
        return _run_cross_device(op, error_input)
    sample = error_input.sample_input
    run = _run_both(op, sample, keep_on_cpu)
    if run.move_error is None and not _raised_as_declared(run.cpu_error, error_input):
        result = _judge_sample(op, sample, run)
        result.cpu_not_raising = True
        return result
    exc = run.move_error if run.move_error is not None else run.mlx_error
    if _raised_as_declared(exc, error_input) or (
            case.elsewhere is not None and _raised_as_declared(exc, case.elsewhere)):
        return SampleResult(PASS)
    declared = f"{error_input.error_type.__name__} matching {error_input.error_regex!r}"
    if case.elsewhere is not None:
        declared += (f" (or, as declared for other devices, {case.elsewhere.error_type.__name__}"
                     f" matching {case.elsewhere.error_regex!r})")
    if run.cpu_error is not None:
        declared += f" (the CPU: {type(run.cpu_error).__name__}: {run.cpu_error})"
    if exc is None:
        return SampleResult(MISMATCH, f"expected {declared}; mlx raised nothing")
    result = _dtype_or_exception_result(exc, run.unsupported)
    if result.status == ERROR:
        return SampleResult(MISMATCH, f"expected {declared}; mlx raised "
                                      f"{type(exc).__name__}: {exc}")
    return result


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

# The kinds of input, each counted apart (module docstring)
KIND_SAMPLES = "samples"
KIND_REFERENCE = "reference"
KIND_ERROR = "error"
INPUT_KINDS = (KIND_SAMPLES, KIND_REFERENCE, KIND_ERROR)


def _generate(make) -> list:
    """``make()``'s inputs, drawn after seeding torch's, Python's and NumPy's global RNGs."""
    set_rng_seed(SAMPLE_SEED)
    return list(make())


def _with_twins(cpu_items, make_meta, sample_of=lambda item: item) -> list:
    """(item, keep_on_cpu) pairs; keep_on_cpu (see sample_to_mlx) comes from the same inputs
    made for "meta", a non-CPU device: tensors the generator still put on the CPU are meant to
    be there. None (every tensor moves) where the twins cannot be made or do not pair up."""
    try:
        twins = _generate(make_meta)
    except Exception:  # a generator that needs data (e.g. .item()): no twins, all move
        twins = []
    if len(twins) != len(cpu_items):
        return [(item, None) for item in cpu_items]
    return [(item, _cpu_pinned_leaves(sample_of(item), sample_of(twin)))
            for item, twin in zip(cpu_items, twins)]


def samples_of(op, dtype: torch.dtype) -> list:
    """The op's samples at ``dtype``, the same in every run and whatever ran before (the sweep,
    one pytest test, or another order): generators draw from torch's, Python's and NumPy's
    global RNGs, all three seeded here once. (op_db would otherwise reseed before each sample
    with a hash of the running test's name, so pytest and the sweep would see other values.)

    Returns (sample, keep_on_cpu) pairs (see _with_twins)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = _generate(lambda: op.sample_inputs("cpu", dtype, set_seed=False))
        return _with_twins(samples, lambda: op.sample_inputs("meta", dtype, set_seed=False))


def _fingerprint(value):
    """A hashable summary of an input: its structure, and per tensor its dtype, shape, strides,
    offset, requires_grad and the bytes of its values. Equal fingerprints: the same call."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.device.type != "cpu":
            return ("tensor", str(value.layout), str(value.device), id(value))  # never equal
        t = value.detach().resolve_conj().resolve_neg()
        flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))  # stride 1
        data = flat.view(torch.uint8).numpy().tobytes()
        return ("tensor", t.dtype, tuple(t.shape), t.stride(), t.storage_offset(),
                value.requires_grad, hashlib.sha1(data).hexdigest())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_fingerprint(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _fingerprint(v)) for k, v in value.items()))
    return (type(value).__name__, repr(value))


def sample_fingerprint(sample):
    return _fingerprint((sample.input, sample.args, sample.kwargs))


def reference_inputs_of(op, dtype: torch.dtype, samples=None) -> tuple[list, int]:
    """The op's reference inputs at ``dtype`` that are not among its samples, as
    (sample, keep_on_cpu) pairs, and how many reference inputs were such duplicates.

    op.reference_inputs is the sample generator when the OpInfo has no reference generator
    (every input a duplicate); reference generators mostly yield the samples first, which,
    drawn from the same seed, come out equal and are recognised by their fingerprint.
    ``samples``: the samples_of pairs, when the caller has them already."""
    if op.reference_inputs_func is None:
        return [], len(samples if samples is not None else samples_of(op, dtype))
    if samples is None:
        samples = samples_of(op, dtype)
    seen = collections.Counter(sample_fingerprint(s) for s, _ in samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        references = _generate(lambda: op.reference_inputs("cpu", dtype, set_seed=False))
        pairs = _with_twins(references,
                            lambda: op.reference_inputs("meta", dtype, set_seed=False))
    extra, duplicates = [], 0
    for sample, keep_on_cpu in pairs:
        fingerprint = sample_fingerprint(sample)
        if seen[fingerprint] > 0:
            seen[fingerprint] -= 1
            duplicates += 1
        else:
            extra.append((sample, keep_on_cpu))
    return extra, duplicates


def _devices_of(error_input) -> set:
    sample = error_input.sample_input
    return {t.device.type for t in _leaves((sample.input, sample.args, sample.kwargs))
            if isinstance(t, torch.Tensor)}


def _cross_device(error_input, device: str) -> bool:
    """Does the input mix CPU tensors and tensors on ``device`` (a generator's device check)?"""
    return _devices_of(error_input) == {"cpu", device}


def _error_twins(op) -> list:
    try:
        return _generate(lambda: op.error_inputs("meta", set_seed=False))
    except Exception:
        return []


def has_error_inputs(op) -> bool:
    """Does error_inputs_of(op) yield anything? (Binary ufuncs that take Python numbers in
    every position, add, mul, div, ..., have a generator that yields nothing.)"""
    if op.error_inputs_func is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if next(iter(op.error_inputs("cpu")), None) is not None:
            return True
        return any(_cross_device(twin, "meta") for twin in _error_twins(op))


def error_inputs_of(op) -> list:
    """The op's ErrorInputs made on the CPU, as (ErrorCase, keep_on_cpu) pairs. They have no
    dtype (test_ops.py's test_errors runs them once per op): the same in every dtype's run.
    Their twins made for "meta" give keep_on_cpu (_with_twins) and, where a twin declares
    another error, ErrorCase.elsewhere. Where the generator also makes, for a device other
    than the CPU, inputs that mix that device's tensors with CPU tensors (twins mixing "meta"
    and the CPU), those made for "mlx" follow as cross-device cases."""
    if op.error_inputs_func is None:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = _generate(lambda: op.error_inputs("cpu", set_seed=False))
        twins = _error_twins(op)
        mixed = [t for t in twins if _cross_device(t, "meta")]
        twins = [t for t in twins if not _cross_device(t, "meta")]
        crossing = []
        if mixed:  # made on "mlx" itself: its make_tensor runs lowerings
            crossing = [e for e in _generate(lambda: op.error_inputs(DEVICE, set_seed=False))
                        if _cross_device(e, DEVICE)]
    crossing = [(ErrorCase(e, cross_device=True), None) for e in crossing]
    if len(twins) != len(errors):
        return [(ErrorCase(error), None) for error in errors] + crossing
    cases = []
    for error, twin in zip(errors, twins):
        differs = (twin.error_type, twin.error_regex) != (error.error_type, error.error_regex)
        cases.append((ErrorCase(error, twin if differs else None),
                      _cpu_pinned_leaves(error.sample_input, twin.sample_input)))
    return cases + crossing


def inputs_of(op, dtype: torch.dtype, kind: str, samples=None) -> tuple[list, int]:
    """(item, keep_on_cpu) pairs of one kind, and the reference duplicates (0 for the others).
    Items are SampleInputs, or ErrorInputs for KIND_ERROR; run them with run_input."""
    if kind == KIND_SAMPLES:
        return (samples if samples is not None else samples_of(op, dtype)), 0
    if kind == KIND_REFERENCE:
        return reference_inputs_of(op, dtype, samples)
    if kind == KIND_ERROR:
        return error_inputs_of(op), 0
    raise ValueError(f"not an input kind: {kind!r} (one of {INPUT_KINDS})")


def run_input(op, kind: str, item, keep_on_cpu=None) -> SampleResult:
    if kind == KIND_ERROR:
        return run_error_input(op, item, keep_on_cpu)
    return run_sample(op, item, keep_on_cpu)


@dataclasses.dataclass
class KindReport:
    """Every input of one kind of one op at one dtype."""
    kind: str
    counts: dict = dataclasses.field(default_factory=dict)  # status -> number of inputs
    first_message: dict = dataclasses.field(default_factory=dict)  # failure -> first message
    duplicates: int = 0  # reference inputs equal to a sample (not run again)
    cpu_not_raising: int = 0  # error inputs the CPU does not raise as declared (compared)

    @property
    def samples(self) -> int:
        """Inputs that count: all but those needing a dtype mlx rejects by design."""
        return sum(n for status, n in self.counts.items() if status != UNSUPPORTED_DTYPE)

    @property
    def passed(self) -> bool:
        return self.samples > 0 and self.counts.get(PASS, 0) == self.samples

    @property
    def status(self) -> str:
        """pass, or the most serious failure kind seen: mismatch > error > not_implemented;
        no_samples / unsupported_dtype when no input counts."""
        if self.samples == 0:
            return UNSUPPORTED_DTYPE if self.counts.get(UNSUPPORTED_DTYPE) else "no_samples"
        for failure in FAILURE_KINDS:
            if self.counts.get(failure):
                return failure
        return PASS


@dataclasses.dataclass
class OpReport:
    """Every input of one op at one dtype, per kind."""
    name: str
    dtype: str
    kinds: dict  # input kind -> KindReport, for the kinds that ran
    missing_ops: list  # aten ops named by NotImplementedErrors, in order of first appearance
    value_compared: bool = True  # False for NOT_VALUE_COMPARABLE ops (structure only)

    def kind(self, kind: str) -> KindReport:
        if kind not in self.kinds:
            self.kinds[kind] = KindReport(kind)
        return self.kinds[kind]

    @property
    def counts(self) -> dict:
        """status -> number of inputs, over the kinds that ran."""
        total = collections.Counter()
        for report in self.kinds.values():
            total.update(report.counts)
        return dict(total)

    @property
    def samples(self) -> int:
        return sum(report.samples for report in self.kinds.values())

    @property
    def passed(self) -> bool:
        """Every kind with inputs that count passes (and there is one)."""
        counted = [r for r in self.kinds.values() if r.samples]
        return bool(counted) and all(r.passed for r in counted)

    @property
    def status(self) -> str:
        """The most serious status over the kinds that ran (as KindReport.status)."""
        statuses = {report.status for report in self.kinds.values()}
        for status in FAILURE_KINDS + (PASS, UNSUPPORTED_DTYPE):
            if status in statuses:
                return status
        return "no_samples"

    def describe(self) -> str:
        parts = [f"{self.name} [{self.dtype}]:"]
        for kind, report in self.kinds.items():
            line = f"{kind}: {report.counts.get(PASS, 0)}/{report.samples} pass"
            if report.duplicates:
                line += f" ({report.duplicates} more equal to a sample, not run again)"
            if report.cpu_not_raising:
                line += (f" ({report.cpu_not_raising} that the CPU does not raise as declared "
                         "are compared as samples)")
            if report.counts.get(UNSUPPORTED_DTYPE):
                line += (f"; {report.counts[UNSUPPORTED_DTYPE]} more need a dtype without MLX "
                         "storage and raise the designed TypeError")
            for failure in FAILURE_KINDS:
                if report.counts.get(failure):
                    line += (f"\n    {report.counts[failure]} {failure}; first: "
                             f"{_shorten(report.first_message[failure])}")
            parts.append(line)
        if self.missing_ops:
            parts.append("missing lowerings: " + ", ".join(self.missing_ops))
        return "\n  ".join(parts)


def _shorten(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def new_report(op, dtype: torch.dtype | None) -> OpReport:
    return OpReport(op.full_name, dtype_name(dtype) if dtype is not None else "no dtype", {}, [],
                    value_compared=op.full_name not in NOT_VALUE_COMPARABLE)


def record(report: OpReport, kind: str, result: SampleResult) -> None:
    part = report.kind(kind)
    part.counts[result.status] = part.counts.get(result.status, 0) + 1
    if result.cpu_not_raising:
        part.cpu_not_raising += 1
    if result.status in FAILURE_KINDS:
        part.first_message.setdefault(result.status, _shorten(result.message, 2000))
    if result.missing_op and result.missing_op not in report.missing_ops:
        report.missing_ops.append(result.missing_op)


def compare_op(op, dtype: torch.dtype | None, kinds=(KIND_SAMPLES,)) -> OpReport:
    """Run every input of the given kinds of ``op`` at ``dtype`` (None: error inputs only, which
    have no dtype); never raises for a failing input."""
    report = new_report(op, dtype)
    samples = None
    for kind in kinds:
        if kind in (KIND_SAMPLES, KIND_REFERENCE) and samples is None:
            samples = samples_of(op, dtype)
        items, duplicates = inputs_of(op, dtype, kind, samples)
        report.kind(kind).duplicates = duplicates
        for item, keep_on_cpu in items:
            record(report, kind, run_input(op, kind, item, keep_on_cpu))
    return report


def expected_failure_reason(op_name: str, dtype, kind: str = KIND_SAMPLES) -> str | None:
    """The listed reason why ``op_name``'s inputs of ``kind`` fail at ``dtype`` (a torch dtype
    or its name; ignored for error inputs, which have none), or None."""
    if kind == KIND_ERROR:
        return EXPECTED_ERROR_FAILURES.get(op_name)
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    table = EXPECTED_FAILURES if kind == KIND_SAMPLES else EXPECTED_REFERENCE_FAILURES
    return table.get((op_name, name))


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
