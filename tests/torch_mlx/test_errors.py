"""Bad input on "mlx" fails the way torch users expect.

- float64 / complex128 have no MLX storage: TypeError naming the dtype;
- an op without a lowering: NotImplementedError naming the aten op and TORCH_MLX_FALLBACK;
- shape and index errors: the exception type the CPU raises for the same call;
- the CPU fallback (torch_mlx.set_fallback(True) or TORCH_MLX_FALLBACK=1) runs an op without a
  lowering correctly, on "mlx" tensors, and warns once per op.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import opinfo_harness as harness

# Ops that MLX has no natural lowering for, each with a call on a float tensor: the tests below
# use the first one that is still unlowered, so they stay meaningful as the table grows.
UNLOWERED_CANDIDATES = [
    ("glu_jvp", "torch.ops.aten.glu_jvp(torch.nn.functional.glu(torch.clone(x).repeat(2)), "
                "torch.clone(x).repeat(2), torch.clone(x).repeat(2), 0)"),
    ("special_airy_ai", "torch.special.airy_ai(x)"),
    ("special_scaled_modified_bessel_k1", "torch.special.scaled_modified_bessel_k1(x)"),
    ("special_spherical_bessel_j0", "torch.special.spherical_bessel_j0(x)"),
    ("special_bessel_y1", "torch.special.bessel_y1(x)"),
    ("special_modified_bessel_i1", "torch.special.modified_bessel_i1(x)"),
]


def unlowered_op():
    """(aten name, expression over ``x``) of an op with no "mlx" kernel."""
    for name, expression in UNLOWERED_CANDIDATES:
        if harness.mlx_kernel_kind(name) is None:
            return name, expression
    pytest.fail("every op in UNLOWERED_CANDIDATES now has an mlx kernel: add a new candidate")


# ----------------------------------------------------------------------------------------------
# Unsupported dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("how", ["to", "factory", "cast_on_device"])
def test_unsupported_dtype_raises_type_error_naming_it(dtype, how):
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=name):
        if how == "to":
            torch.zeros(3, dtype=dtype).to("mlx")
        elif how == "factory":
            torch.zeros(3, dtype=dtype, device="mlx")
        else:
            torch.zeros(3, device="mlx").to(dtype)


# ----------------------------------------------------------------------------------------------
# Ops without a lowering


def test_unlowered_op_raises_not_implemented_error_naming_op_and_switch():
    name, expression = unlowered_op()
    x = torch.rand(4).to("mlx")
    with pytest.raises(NotImplementedError) as info:
        eval(expression, {"torch": torch, "x": x})
    message = str(info.value)
    assert f"aten::{name}" in message
    assert "TORCH_MLX_FALLBACK" in message


def test_unlowered_custom_op_error_names_its_own_namespace():
    # e.g. a vLLM custom op without an mlx kernel must not be reported as an aten op
    lib = torch.library.Library("mlx_errors_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    with pytest.raises(NotImplementedError, match="mlx_errors_test::twice"):
        torch.ops.mlx_errors_test.twice(torch.ones(2).to("mlx"))


_FALLBACK_SCRIPT = """
import warnings, torch, torch_mlx
{enable}
x_cpu = torch.rand(6, generator=torch.Generator().manual_seed(0)) + 0.5
expected = {expression_cpu}
x = x_cpu.to("mlx")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = {expression}
    second = {expression}
mentions = [str(w.message) for w in caught if "{name}" in str(w.message)]
assert first.device.type == "mlx" and second.device.type == "mlx", (first.device, second.device)
torch.testing.assert_close(first.cpu(), expected, rtol=0, atol=0)
torch.testing.assert_close(second.cpu(), expected, rtol=0, atol=0)
print(len(mentions))
"""


@pytest.mark.parametrize("switch", ["api", "env"])
def test_cpu_fallback_runs_unlowered_op_and_warns_once(switch):
    # A fresh interpreter: "warns once" is per process, and the switch is process-wide.
    name, expression = unlowered_op()
    script = _FALLBACK_SCRIPT.format(
        enable="torch_mlx.set_fallback(True)" if switch == "api" else "",
        name=name, expression=expression, expression_cpu=expression.replace("(x)", "(x_cpu)"))
    env = dict(os.environ, TORCH_MLX_FALLBACK="1" if switch == "env" else "0")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "1", f"expected one warning naming {name}, got {out.stdout}"


def test_fallback_off_by_default_in_a_fresh_process():
    name, expression = unlowered_op()
    script = ("import torch\nx = torch.rand(3).to('mlx')\ntry:\n"
              f"    {expression}\nexcept NotImplementedError as e:\n    print('raised', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_MLX_FALLBACK"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.stdout.startswith("raised") and f"aten::{name}" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Shape and index errors: same exception type as on the CPU


def _x(device):
    return torch.arange(12.0).reshape(3, 4).to(device)


def _i(values, device):
    return torch.tensor(values).to(device)


BAD_CALLS = {
    "add_broadcast": lambda d: _x(d) + torch.ones(5, device=d),
    "mm_inner_dims": lambda d: _x(d) @ torch.ones(3, 2, device=d),
    "bmm_batch": lambda d: torch.bmm(torch.ones(2, 3, 4, device=d), torch.ones(3, 4, 5, device=d)),
    "view_size": lambda d: _x(d).view(5, -1),
    "reshape_size": lambda d: _x(d).reshape(7),
    "cat_shapes": lambda d: torch.cat([_x(d), torch.ones(3, 5, device=d)], dim=0),
    "stack_shapes": lambda d: torch.stack([_x(d), torch.ones(4, 3, device=d)]),
    "expand_size": lambda d: _x(d).expand(2, 3, 5),
    "dim_out_of_range_sum": lambda d: _x(d).sum(dim=2),
    "dim_out_of_range_softmax": lambda d: _x(d).softmax(dim=-3),
    "transpose_dim": lambda d: _x(d).transpose(0, 2),
    "getitem_out_of_range": lambda d: _x(d)[3],
    "getitem_too_many_indices": lambda d: _x(d)[0, 0, 0],
    "select_out_of_range": lambda d: _x(d).select(1, 4),
    "index_tensor_out_of_range": lambda d: _x(d)[_i([0, 5], d)],
    "index_select_out_of_range": lambda d: _x(d).index_select(0, _i([3], d)),
    "index_select_float_index": lambda d: _x(d).index_select(0, torch.ones(1, device=d)),
    "gather_out_of_range": lambda d: _x(d).gather(1, _i([[0], [4], [1]], d)),
    "gather_index_rank": lambda d: _x(d).gather(1, _i([0, 1], d)),
    "scatter_out_of_range": lambda d: _x(d).scatter(1, _i([[9]], d), 1.0),
    "index_put_out_of_range": lambda d: _x(d).index_put_((_i([7], d),), torch.ones(4, device=d)),
    "embedding_out_of_range": lambda d: F.embedding(_i([[1, 12]], d), _x(d)),
    "masked_fill_mask_shape": lambda d: _x(d).masked_fill(torch.ones(2, dtype=torch.bool,
                                                                    device=d), 0.0),
    "where_shapes": lambda d: torch.where(torch.ones(2, dtype=torch.bool, device=d), _x(d),
                                          torch.zeros(5, device=d)),
    "linear_shapes": lambda d: F.linear(_x(d), torch.ones(2, 5, device=d)),
    "layer_norm_shape": lambda d: F.layer_norm(_x(d), (5,)),
    "cross_entropy_target_class": lambda d: F.cross_entropy(_x(d), _i([0, 1, 9], d)),
    "inplace_broadcast_into_smaller": lambda d: torch.ones(4, device=d).add_(_x(d)),
    "inplace_integer_result_type": lambda d: torch.ones(3, dtype=torch.long, device=d).div_(2.5),
    "copy_shape": lambda d: _x(d).copy_(torch.ones(5, device=d)),
}


def _raised(call, device):
    try:
        call(device)
    except Exception as exc:  # the point is which type
        return exc
    return None


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_call_raises_like_cpu(case):
    expected = _raised(BAD_CALLS[case], "cpu")
    assert expected is not None, f"{case} does not fail on the CPU: the test case is wrong"
    actual = _raised(BAD_CALLS[case], "mlx")
    assert type(actual) is type(expected), (
        f"{case}: CPU raises {type(expected).__name__} ({expected}), mlx "
        + (f"raises {type(actual).__name__} ({actual})" if actual else "raises nothing"))


# ----------------------------------------------------------------------------------------------
# The CPU's message as well as its type (OpInfo's error inputs match messages), and out= checks


def _ones(shape, device, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device=device)


def _aliased(device, make):
    """``make(base)`` on a fresh 6-element base tensor: out= arguments that share its memory."""
    return make(torch.arange(6.0, device=device))


SAME_MESSAGE_CALLS = {
    # meta kernels (Python refs) word these differently from the CPU kernels
    "cat_ranks": lambda d: torch.cat([_ones((2, 3), d), _ones((2, 3, 4), d)]),
    "mean_of_integers": lambda d: _ones(3, d, torch.int64).mean(),
    "masked_scatter_float_mask": lambda d: _ones(3, d).masked_scatter(_ones(3, d), _ones(3, d)),
    "multi_margin_empty_classes": lambda d: F.multi_margin_loss(_ones((5, 0), d),
                                                                _ones(5, d, torch.int64)),
    # torch's sub_check, which the meta kernel (a Python reference) lacks: was -1, False, 1
    "sub_bool_and_number": lambda d: _ones(3, d, torch.bool) - 1,
    "sub_number_bool": lambda d: _ones(3, d) - True,
    "sub_two_bools": lambda d: _ones(3, d, torch.bool) - _ones(3, d, torch.bool),
    "rsub_bool": lambda d: 2 - _ones(3, d, torch.bool),
    "sub__bool": lambda d: _ones(3, d, torch.int64).sub_(_ones(3, d, torch.bool)),
    # a check on a 0-dim tensor's value: a complex fill value for an integer tensor
    "masked_fill_complex_into_long": lambda d: _ones(2, d, torch.int64).masked_fill(
        _ones(2, d, torch.bool), torch.tensor(1j, device=d)),
    # out= with the wrong dtype: the CPU kernel's own check
    "amax_out_dtype": lambda d: torch.amax(_ones((2, 3), d), 1,
                                           out=torch.empty(2, dtype=torch.int32, device=d)),
    # out= sharing memory with itself or an input
    "index_select_out_expanded": lambda d: torch.index_select(
        _ones((3, 6), d), 1, torch.tensor([0, 1], device=d), out=_ones((1, 6), d).expand(2, 6)),
    "add_out_expanded": lambda d: torch.add(_ones(3, d), 1, out=_ones(1, d).expand(3)),
    "add_out_partial_overlap": lambda d: _aliased(d, lambda b: torch.add(b[:3], 1, out=b[1:4])),
    "take_out_is_input": lambda d: _aliased(
        d, lambda b: torch.take(b, torch.tensor([2, 1, 0], device=d), out=b)),
    "cat_out_is_input": lambda d: _aliased(d, lambda b: torch.cat([b, b], out=b)),
    "gather_out_overlaps_index_after_resize": lambda d: (lambda i: torch.gather(
        i.clone(), 0, i[1:], out=i[:1]))(torch.tensor([2, 1, 0], device=d)),
    # lowerings without a meta kernel in front of them
    "logcumsumexp_dim": lambda d: torch.logcumsumexp(_ones((2, 3), d), 3),
    "bucketize_2d_boundaries": lambda d: torch.bucketize(_ones(3, d), _ones((2, 2), d)),
    "histogramdd_bin_count": lambda d: torch.histogramdd(_ones((5, 6), d), [1, 1, 1, 1, 1]),
    "lstsq_vector": lambda d: torch.linalg.lstsq(_ones(3, d), _ones(3, d)),
    "index_add_source_shape": lambda d: torch.index_add(
        _ones((3, 2), d), 0, torch.tensor([0, 2], device=d), _ones(2, d)),
    "index_add__source_shape": lambda d: _ones((3, 2), d).index_add_(
        0, torch.tensor([0, 2], device=d), _ones((2, 3), d)),
}


@pytest.mark.parametrize("case", sorted(SAME_MESSAGE_CALLS))
def test_bad_call_raises_the_cpus_error(case):
    expected = _raised(SAME_MESSAGE_CALLS[case], "cpu")
    assert expected is not None, f"{case} does not fail on the CPU: the test case is wrong"
    actual = _raised(SAME_MESSAGE_CALLS[case], "mlx")
    assert (type(actual), str(actual)) == (type(expected), str(expected)), (
        f"{case}: CPU raises {type(expected).__name__} ({expected}), mlx "
        + (f"raises {type(actual).__name__} ({actual})" if actual else "raises nothing"))


def test_out_that_is_an_input_is_allowed_where_the_cpu_allows_it():
    for device in ("cpu", "mlx"):
        x = torch.arange(4.0, device=device)
        torch.add(x, 1, out=x)  # full overlap: elementwise kernels accept it
        torch.testing.assert_close(x.cpu(), torch.arange(4.0) + 1)
        torch.sum(_ones((3, 3), device), 0, out=torch.empty(3, device=device))
