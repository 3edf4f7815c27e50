"""The OpInfo harness itself (opinfo_harness.py): how it moves inputs, which reference inputs it
runs, how it judges error inputs, and how tools/conformance.py counts the three kinds."""
import os
import sys

import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import ErrorInput, SampleInput

import opinfo_harness as harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import conformance  # noqa: E402

OPS = {op.full_name: op for op in op_db}


class _Op:
    """A stand-in OpInfo: a callable with a full_name."""

    def __init__(self, fn, name="abs"):
        self.fn, self.full_name = fn, name

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def test_reference_inputs_leave_out_the_samples():
    op = OPS["add"]
    samples = harness.samples_of(op, torch.float32)
    extra, duplicates = harness.reference_inputs_of(op, torch.float32, samples)
    assert duplicates == len(samples)  # reference_inputs_elementwise_binary yields them first
    assert extra
    fingerprints = {harness.sample_fingerprint(s) for s, _ in samples}
    assert not any(harness.sample_fingerprint(s) in fingerprints for s, _ in extra)


def test_an_op_without_a_reference_generator_has_no_reference_inputs():
    op = OPS["sum"]
    assert op.reference_inputs_func is None
    extra, duplicates = harness.reference_inputs_of(op, torch.float32)
    assert extra == [] and duplicates == len(harness.samples_of(op, torch.float32))


def test_fingerprint_tells_values_strides_and_structure_apart():
    x = torch.arange(6.0).reshape(2, 3)
    same = harness.sample_fingerprint(SampleInput(x.clone(), args=(1,)))
    assert harness.sample_fingerprint(SampleInput(x, args=(1,))) == same
    assert harness.sample_fingerprint(SampleInput(x + 1, args=(1,))) != same
    assert harness.sample_fingerprint(SampleInput(x.t().contiguous().t(), args=(1,))) != same
    assert harness.sample_fingerprint(SampleInput(x, args=(1.0,))) != same
    assert harness.sample_fingerprint(SampleInput([x], args=(1,))) != same


def test_moving_keeps_aliasing_among_a_samples_tensors():
    base = torch.arange(6.0)
    moved_input, moved_args, moved_kwargs = harness.sample_to_mlx(
        (base, (base[1:], base[:2]), {"out": base}))
    assert moved_kwargs["out"] is moved_input  # a tensor passed twice is one tensor
    storage = moved_input.untyped_storage()._cdata
    assert all(t.untyped_storage()._cdata == storage for t in moved_args)
    assert moved_args[0].storage_offset() == 1 and moved_input.device.type == "mlx"
    other = harness.sample_to_mlx((torch.arange(6.0), (), {}))[0]
    assert other.untyped_storage()._cdata != storage


def test_a_tensor_on_another_device_stays_there():
    meta = torch.empty(3, device="meta")
    moved = harness.sample_to_mlx((torch.ones(3), (meta,), {}))
    assert moved[0].device.type == "mlx" and moved[1][0] is meta


def test_a_call_on_python_numbers_alone_may_return_a_cpu_tensor():
    # torch.sub(2.0, 3.0) is a CPU tensor under any device context, "cuda" as "mlx"
    sub = _Op(torch.sub, "sub")
    assert not harness._follows_device_context(sub, SampleInput(2.0, args=(3.0,)))
    assert harness.run_sample(sub, SampleInput(2.0, args=(3.0,))).status == harness.PASS
    full = _Op(torch.full, "full")
    assert harness._follows_device_context(full, SampleInput((2,), args=(3.0,)))


def _raises_on(device_type, message="the CPU's message"):
    def fn(x):
        if x.device.type == device_type:
            raise RuntimeError(message)
        return x + 1
    return fn


def test_error_input_passes_when_mlx_raises_the_declared_error():
    op = _Op(lambda x: torch.cat([x, x.unsqueeze(0)]))
    error = ErrorInput(SampleInput(torch.ones(2, 3)),
                       error_regex="Tensors must have same number of dimensions")
    assert harness.run_error_input(op, error).status == harness.PASS


def test_error_input_that_mlx_does_not_raise_is_a_mismatch():
    error = ErrorInput(SampleInput(torch.ones(2)), error_regex="CPU's message")
    result = harness.run_error_input(_Op(_raises_on("cpu")), error)
    assert result.status == harness.MISMATCH and "mlx raised nothing" in result.message
    # another message
    both = _Op(lambda x: _raises_on(x.device.type, f"{x.device.type} says no")(x))
    error = ErrorInput(SampleInput(torch.ones(2)), error_regex="cpu says no")
    result = harness.run_error_input(both, error)
    assert result.status == harness.MISMATCH and "mlx says no" in result.message
    # another type
    error = ErrorInput(SampleInput(torch.ones(2)), error_type=IndexError, error_regex="")
    result = harness.run_error_input(_Op(lambda x: x[5]), error)
    assert result.status == harness.PASS
    wrong = _Op(lambda x: x[5] if x.device.type == "cpu" else _raises_on("mlx")(x))
    assert harness.run_error_input(wrong, error).status == harness.MISMATCH


def test_error_input_the_cpu_does_not_raise_is_compared_as_a_sample():
    error = ErrorInput(SampleInput(torch.ones(2)), error_type=Exception, error_regex="")
    result = harness.run_error_input(_Op(torch.abs), error)
    assert result.status == harness.PASS and result.cpu_not_raising


def test_error_input_may_raise_as_declared_for_other_devices():
    # narrow_copy's out-of-range dim: the CPU kernel's RuntimeError on the CPU, the IndexError
    # of torch's composite on other devices (its generator declares both)
    cases = harness.error_inputs_of(OPS["narrow_copy"])
    elsewhere = [case for case, _ in cases if case.elsewhere is not None]
    assert elsewhere
    for case in elsewhere:
        assert harness.run_error_input(OPS["narrow_copy"], case).status == harness.PASS


def test_compare_op_reports_each_kind_apart():
    report = harness.compare_op(OPS["cat"], torch.float32, harness.INPUT_KINDS)
    assert set(report.kinds) == set(harness.INPUT_KINDS)
    assert report.kind(harness.KIND_SAMPLES).samples == len(
        harness.samples_of(OPS["cat"], torch.float32))
    assert report.kind(harness.KIND_ERROR).samples > 0
    assert report.passed, report.describe()


def _kind(status, **counts):
    return {"status": status, "counts": counts, "first_error": {}, "duplicates": 0,
            "cpu_not_raising": 0}


def test_conformance_counts_ops_per_kind_and_overall():
    results = {
        "abs": {"status": "pass", "kinds": {"samples": _kind("pass", **{"pass": 3}),
                                            "reference": _kind("pass", **{"pass": 2}),
                                            "error": _kind("no_samples")},
                "missing_ops": [], "value_compared": True, "seconds": 0.1},
        "cat": {"status": "mismatch", "kinds": {"samples": _kind("pass", **{"pass": 4}),
                                                "error": _kind("mismatch", mismatch=1, **{
                                                    "pass": 2})},
                "missing_ops": [], "value_compared": True, "seconds": 0.1},
        "exp": {"status": "crash", "kinds": {"samples": _kind("crash", crash=1)},
                "missing_ops": [], "value_compared": True, "seconds": 0.1},
    }
    summary = conformance.summarize("float32", results, 1.0)
    assert (summary["ops_total"], summary["ops_passing"]) == (3, 1)
    samples, reference, error = (summary["by_kind"][k] for k in harness.INPUT_KINDS)
    assert (samples["ops_total"], samples["ops_passing"]) == (3, 2)
    assert (samples["inputs_total"], samples["inputs_passing"]) == (8, 7)
    assert (reference["ops_total"], reference["ops_passing"]) == (1, 1)
    assert (error["ops_total"], error["ops_passing"], error["inputs_total"]) == (1, 0, 3)
    assert error["mismatches_unexplained"] == 1
    assert summary["ops_crashed"] == ["exp"]
    assert summary["per_op"]["exp"]["status"] == "crash"
    assert "error 0/1 ops, 2/3 inputs" in conformance.summary_line(summary)
