"""Python numbers in Tensor operand positions (issue 22).

torch lets a number stand for a tensor operand: ``torch.add(1, t)``, ``3.0 // t``, torch._refs
and prims, and FX graphs of compiled code pass one. The dispatcher wraps it in a 0-d CPU
tensor marked as a wrapped number (which type promotion treats as a Python scalar) and a Python
kernel receives the number again. registry.py turns it into an mx.array of the right dtype
for every lowering; these tests check every binary and ternary elementwise op of the lowering
table with a bool, an int and a float in each operand position, eagerly and in a compiled
graph, against the CPU given the same wrapped number (``torch_mlx._C.wrapped_number``, as the
dispatcher builds one): values and dtypes, or the same exception type where the CPU raises."""
import pytest
import torch
import torch.fx as fx

import torch_mlx  # noqa: F401
from torch_mlx import _C
from torch_mlx.compile import MlxGraph
from torch_mlx.ops import registry

NUMBERS = [True, 3, -2.5]  # a bool, an int, a float (exact in every float dtype)
DTYPES = [torch.float32, torch.float16, torch.int16, torch.bool]


def _tensor_operands(name: str) -> int:
    """How many (non-optional) Tensor arguments the overload's schema has."""
    return sum(str(a.type) == "Tensor" for a in registry.overload(name)._schema.arguments)


# the product's lowerings (other test modules register test-only ops in their own namespaces)
BINARY_TERNARY = sorted(n for n in registry.TABLE
                        if not n.startswith("torch_mlx_test::") and _tensor_operands(n) in (2, 3))

# Elementwise ops torch does not tag "pointwise" and that do not promote in the adapter.
UNTAGGED_ELEMENTWISE = {
    "complex", "polar", "masked_fill.Tensor", "_prelu_kernel", "_prelu_kernel_backward",
    "elu_backward", "hardshrink_backward", "hardsigmoid_backward", "hardswish_backward",
    "hardtanh_backward", "leaky_relu_backward", "log_sigmoid_backward", "softplus_backward",
    "softshrink_backward",
}

# Binary and ternary ops that are not elementwise, so they are not part of this check.
NOT_ELEMENTWISE = {
    "matrix products (operands are matrices or vectors, not broadcast elementwise)": [
        "_addmm_activation", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "dot", "mm",
        "mv", "vdot", "_cdist_forward", "_pdist_backward", "linalg_cross",
        "_scaled_dot_product_fused_attention_overrideable",
    ],
    "linear algebra (solves and factorizations of matrices)": [
        "_cholesky_solve_helper", "_linalg_solve_ex", "linalg_householder_product",
        "linalg_ldl_solve", "linalg_lstsq", "linalg_lu_solve", "linalg_solve_triangular",
        "lu_unpack", "ormqr", "triangular_solve",
    ],
    "losses (reduce over the batch; class-index targets)": [
        "_ctc_loss", "binary_cross_entropy", "binary_cross_entropy_backward", "huber_loss",
        "huber_loss_backward", "mse_loss", "mse_loss_backward", "multi_margin_loss",
        "multi_margin_loss_backward", "multilabel_margin_loss_forward", "nll_loss2d_forward",
        "nll_loss_forward", "smooth_l1_loss", "smooth_l1_loss_backward",
    ],
    "backward of reductions along a dimension (softmax, glu: a slice-wise op)": [
        "_log_softmax_backward_data", "_softmax_backward_data", "glu_backward",
    ],
    "fused ops of compiled graphs' rewrites (compile_patterns: rotary_half pairs element i "
    "with element i +- h of the last dim)": [
        "torch_mlx::rotary_half",
    ],
    "writes of a tensor into a region of another (compiled graphs only: slice assignment)": [
        "copy", "slice_scatter",
    ],
    "indexing, gathering and scattering (an operand holds indices or a mask to select by)": [
        "_embedding_bag", "_embedding_bag_forward_only", "bucketize.Tensor", "embedding",
        "embedding_dense_backward", "gather", "histogram.bins_tensor", "index_add", "index_copy",
        "index_fill.int_Scalar", "index_fill.int_Tensor", "index_put", "index_reduce",
        "index_select", "masked_scatter", "masked_select", "put", "scatter.reduce",
        "scatter.src", "scatter.value", "scatter.value_reduce", "scatter_add",
        "scatter_reduce.two", "searchsorted.Tensor", "take",
    ],
    "pooling, padding, convolution, sampling and normalization (windows over dimensions)": [
        "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
        "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
        "adaptive_max_pool2d_backward", "adaptive_max_pool3d_backward", "avg_pool2d_backward",
        "avg_pool3d_backward", "convolution", "convolution_backward", "fractional_max_pool2d",
        "fractional_max_pool2d_backward", "fractional_max_pool3d",
        "fractional_max_pool3d_backward", "grid_sampler_2d", "grid_sampler_2d_backward",
        "grid_sampler_3d", "grid_sampler_3d_backward", "max_pool2d_with_indices_backward",
        "max_pool3d_with_indices_backward", "max_unpool2d", "max_unpool3d",
        "native_batch_norm_backward", "reflection_pad1d_backward", "reflection_pad2d_backward",
        "reflection_pad3d_backward", "replication_pad1d_backward", "replication_pad2d_backward",
        "replication_pad3d_backward",
    ],
}

# Elementwise ops whose CPU kernel rejects a number in every operand position, with the reason
# (the test checks that the CPU does reject every such call, so an entry cannot go stale).
_SAME_DTYPE = ("the CPU kernel requires all its operands in one dtype (TensorIterator's "
               "same-dtype check) and a wrapped number is a bool, int64 or float64 tensor, so "
               "the CPU rejects every call with one; torch's meta kernel does not check this, "
               "and mlx computes the result in the promoted dtype")
CANNOT_TAKE_A_NUMBER: dict[str, str] = {
    "complex": "real and imag must be float tensors of one dtype; a wrapped number is a bool, "
               "int64 or float64 tensor, which the CPU (and mlx, by the same meta check) rejects",
    "polar": "abs and angle must be float tensors of one dtype; a wrapped number is a bool, "
             "int64 or float64 tensor, which the CPU (and mlx, by the same meta check) rejects",
    "lerp.Scalar": "end must have self's dtype; a wrapped number is a bool, int64 or float64 "
                   "tensor, which the CPU (and mlx, by the same meta check) rejects",
    "_prelu_kernel": _SAME_DTYPE,
    "_prelu_kernel_backward": _SAME_DTYPE,
    "log_sigmoid_backward": _SAME_DTYPE,
}

# (op, operand position, number type or None for any) where mlx and the CPU differ, with the
# reason: checks the meta kernel lacks, or torch's meta and CPU kernels disagreeing; none is
# about how a number reaches the lowering. The test checks that each entry still differs in at
# least one of its calls, so the list only shrinks.
DIFFERS_FROM_THE_CPU = {
    ("ldexp.Tensor", 1, bool): "the CPU has no ldexp kernel for a bool exponent; torch's meta "
                               "kernel does not check it and the lowering sees the exponent "
                               "promoted to float, so mlx computes. A bool tensor exponent does "
                               "the same (not specific to numbers)",
    ("gelu_backward", 0, None): "the CPU runs gelu_backward through oneDNN, which rejects the "
                                "wrapped number's bool/int64/float64 tensor as grad_output (a "
                                "CPU kernel artifact); mlx computes the promoted result",
    ("threshold_backward", 0, None): "torch's meta kernel (the decomposition where(self <= "
                                     "threshold, 0, grad_output)) types a number grad_output "
                                     "as a Python scalar where the CPU kernel promotes it with "
                                     "self, so the two disagree on the result dtype (an int: "
                                     "int64 against self's dtype); mlx follows the meta kernel, "
                                     "as torch.compile does",
}
if torch.torch_version.TorchVersion(torch.__version__) < (2, 13):  # the GPU device's image: 2.11
    DIFFERS_FROM_THE_CPU[("hardtanh_backward", 0, None)] = (
        "torch 2.11's meta kernel (the decomposition where(..., 0.0, grad_output), before 2.13 "
        "computed it in opmath and cast back) types a number grad_output as a Python scalar: "
        "float32 where the CPU kernel gives self's float16; mlx follows the meta kernel")


def _elementwise(name: str) -> bool:
    low = registry.TABLE[name]
    return (torch.Tag.pointwise in registry.overload(name).tags or low.promote is not None
            or name in UNTAGGED_ELEMENTWISE)


ELEMENTWISE = [n for n in BINARY_TERNARY if _elementwise(n)]

# Elementwise ops whose lowering cannot be traced into a compiled graph (checked eagerly only).
NOT_TRACEABLE = {
    name: "the recurrence's length is the largest degree in n, a value: the lowering raises "
          "NotImplementedError while a graph is traced"
    for name in ELEMENTWISE if name.startswith("special_") and "polynomial" in name
}


def test_every_binary_and_ternary_op_is_tested_or_listed():
    listed = {n for names in NOT_ELEMENTWISE.values() for n in names}
    assert sorted(set(BINARY_TERNARY) - set(ELEMENTWISE) - listed) == [], \
        "a binary/ternary lowering that is neither elementwise nor listed in NOT_ELEMENTWISE"
    assert sorted(listed - set(BINARY_TERNARY)) == [], "NOT_ELEMENTWISE names an unknown op"
    assert sorted(listed & set(ELEMENTWISE)) == [], "an elementwise op is listed as not"
    assert set(UNTAGGED_ELEMENTWISE) <= set(BINARY_TERNARY)
    assert set(CANNOT_TAKE_A_NUMBER) <= set(ELEMENTWISE)
    assert {name for name, _, _ in DIFFERS_FROM_THE_CPU} <= set(ELEMENTWISE)
    assert set(NOT_TRACEABLE) <= set(ELEMENTWISE)


# ----------------------------------------------------------------------------------------------
# The arguments each op is called with. "x": a tensor of the dtype under test (the operands a
# number replaces); "mask": a bool tensor; "w": weights in [0, 1] of the dtype under test;
# anything else is passed as is.

X = [[-1.75, 0.5, 2.0], [3.25, -0.25, 1.0]]
X_INT = [[-3, 1, 2], [5, -1, 4]]
MASK = [[True, False, True], [False, True, True]]

SIGNATURES = {  # name -> (args, kwargs); default: every Tensor operand "x", nothing else
    "where.self": (["mask", "x", "x"], {}),
    "masked_fill.Scalar": (["x", "mask", 0.5], {}),
    "masked_fill.Tensor": (["x", "mask", "x0"], {}),
    "lerp.Scalar": (["x", "x", 0.25], {}),
    "lerp.Tensor": (["x", "x", "w"], {}),
    "native_dropout_backward": (["x", "mask", 2.0], {}),
    "threshold_backward": (["x", "x", 0.5], {}),
    "hardtanh_backward": (["x", "x", -1.0, 1.0], {}),
    "hardshrink_backward": (["x", "x", 0.5], {}),
    "softshrink_backward": (["x", "x", 0.5], {}),
    "softplus_backward": (["x", "x", 1.0, 20.0], {}),
    "leaky_relu_backward": (["x", "x", 0.01, False], {}),
    "elu_backward": (["x", 1.0, 1.0, 1.0, False, "x"], {}),
    "div.Tensor_mode": (["x", "x"], {"rounding_mode": "floor"}),
    "add.Tensor": (["x", "x"], {"alpha": 2}),
    "sub.Tensor": (["x", "x"], {"alpha": 2}),
    "rsub.Tensor": (["x", "x"], {"alpha": 2}),
    "addcmul": (["x", "x", "x"], {"value": 2}),
    "addcdiv": (["x", "x", "x"], {"value": 2}),
}


def _signature(name):
    if name in SIGNATURES:
        return SIGNATURES[name]
    return ["x"] * _tensor_operands(name), {}


def _make(kind, dtype):
    if kind == "mask":
        return torch.tensor(MASK)
    if kind == "w":
        return torch.tensor([[0.0, 0.25, 1.0], [0.75, 0.5, 1.0]], dtype=dtype)
    values = X if dtype.is_floating_point else X_INT if dtype != torch.bool else MASK
    t = torch.tensor(values).to(dtype)
    return t[0, 0] if kind == "x0" else t


def _supported_dtypes(name):
    """The dtypes of DTYPES the op's CPU kernel takes for its tensor operands (its call with
    tensors only runs). Which dtypes an op supports is test_opinfo's business; here the
    numbers vary around operands the op takes."""
    op = registry.overload(name)
    kinds, kwargs = _signature(name)
    supported = []
    for dtype in DTYPES:
        try:
            op(*[_make(k, dtype) if isinstance(k, str) else k for k in kinds], **kwargs)
        except Exception:  # noqa: BLE001
            continue
        supported.append(dtype)
    return supported


def _cases(name, dtype):
    """(position, number, cpu args, mlx args, kwargs) for each number in each operand position."""
    kinds, kwargs = _signature(name)
    positions, _ = registry.operands(registry.overload(name))
    tensors = [_make(k, dtype) if isinstance(k, str) else k for k in kinds]
    for pos in positions:
        for number in NUMBERS:
            cpu = list(tensors)
            cpu[pos] = _C.wrapped_number(number)
            on_mlx = [a.to("mlx") if isinstance(a, torch.Tensor) and i != pos else a
                      for i, a in enumerate(cpu)]
            yield pos, number, cpu, on_mlx, kwargs


def _leaves(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _check(expected, got, what):
    expected, got = _leaves(expected), _leaves(got)
    assert len(expected) == len(got), what
    for e, g in zip(expected, got):
        assert g.device.type == "mlx", what
        assert g.dtype == e.dtype, f"{what}: dtype {g.dtype}, the CPU's {e.dtype}"
        torch.testing.assert_close(g.cpu(), e, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _run_compiled(op, args, kwargs, pos, expected):
    """The op as one node of an FX graph whose operand ``pos`` is the number (a constant), the
    other tensors graph inputs, run by the compiled path's MlxGraph. Its steps run as plain MLX
    calls, as they do off the main thread (registry.compile_allowed): on the CPU mx.compile
    builds every new graph's fused kernel with the C++ compiler, seconds each for the
    thousands of graphs here; the steps, and so the handling of numbers, are the same.
    test_compiled_numbers_in_tensor_positions goes through mx.compile."""
    graph = fx.Graph()
    node_args, inputs = [], []
    for i, a in enumerate(args):
        if i == pos:
            node_args.append(_number_of(a))
        elif isinstance(a, torch.Tensor):
            ph = graph.placeholder(f"x{i}")
            ph.meta["val"] = a
            node_args.append(ph)
            inputs.append(a.to("mlx"))
        else:
            node_args.append(a)
    node = graph.call_function(op, tuple(node_args), dict(kwargs))
    node.meta["val"] = expected
    graph.output(node)
    mlx_graph = MlxGraph(fx.GraphModule(torch.nn.Module(), graph))
    allowed = registry.compile_allowed
    registry.compile_allowed = lambda: False
    try:
        return mlx_graph(*inputs)
    finally:
        registry.compile_allowed = allowed


def _number_of(wrapped):
    return wrapped.item() if wrapped.dtype != torch.bool else bool(wrapped.item())


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_number_in_every_operand_position(name):
    op = registry.overload(name)
    dtypes = _supported_dtypes(name)
    assert dtypes, f"{name} takes none of {DTYPES}"
    computed = 0
    listed, differing = set(), set()
    for dtype in dtypes:
        for pos, number, cpu, on_mlx, kwargs in _cases(name, dtype):
            what = f"{name}({', '.join(_describe(a) for a in cpu)}) [{dtype}]"
            key = _differs(name, pos, number)
            if key is not None:
                listed.add(key)
                if _still_differs(op, cpu, on_mlx, kwargs):
                    differing.add(key)
                continue
            try:
                expected = op(*cpu, **kwargs)
            except Exception as cpu_error:  # noqa: BLE001
                if name not in CANNOT_TAKE_A_NUMBER:
                    with pytest.raises(type(cpu_error)):
                        op(*on_mlx, **kwargs)
                continue
            assert name not in CANNOT_TAKE_A_NUMBER, f"{what} runs on the CPU: unlist {name}"
            if any(e.dtype in (torch.float64, torch.complex128) for e in _leaves(expected)):
                # a number of higher kind than the tensors made the CPU's result 64-bit
                with pytest.raises(TypeError, match="mlx does not support dtype"):
                    op(*on_mlx, **kwargs)
                continue
            _check(expected, op(*on_mlx, **kwargs), what)
            if name not in NOT_TRACEABLE:
                _check(expected, _leaves(_run_compiled(op, cpu, kwargs, pos, expected)),
                       what + " compiled")
            computed += 1
    # an op not listed as unable to take a number computes a result with one somewhere
    assert computed > 0 or name in CANNOT_TAKE_A_NUMBER, name
    assert listed == differing, \
        f"{sorted(listed - differing, key=str)} now agree with the CPU: unlist them"


def _differs(name, pos, number):
    """The DIFFERS_FROM_THE_CPU key of a call, or None."""
    for key in ((name, pos, None), (name, pos, type(number))):
        if key in DIFFERS_FROM_THE_CPU:
            return key
    return None


def _still_differs(op, cpu, on_mlx, kwargs) -> bool:
    outcomes = []
    for args in (cpu, on_mlx):
        try:
            outcomes.append([(r.dtype, r.cpu()) for r in _leaves(op(*args, **kwargs))])
        except Exception as error:  # noqa: BLE001
            outcomes.append(type(error))
    expected, got = outcomes
    if not isinstance(expected, list) or not isinstance(got, list):
        return expected != got
    return not all(e[0] == g[0] and torch.allclose(e[1].double(), g[1].double(), equal_nan=True)
                   for e, g in zip(expected, got))


def _describe(a):
    if isinstance(a, torch.Tensor) and a.dim() == 0 and a.device.type == "cpu":
        return repr(_number_of(a))
    return f"Tensor[{a.dtype}]" if isinstance(a, torch.Tensor) else repr(a)


# ----------------------------------------------------------------------------------------------
# Type promotion of wrapped numbers


@pytest.mark.parametrize("fn, dtype, expected_dtype", [
    (lambda t: t * 3, torch.int16, torch.int16),
    (lambda t: 3 * t, torch.int16, torch.int16),
    (lambda t: torch.mul(3, t), torch.int16, torch.int16),
    (lambda t: torch.add(2.5, t), torch.int32, torch.float32),
    (lambda t: t + 2.5, torch.int32, torch.float32),
    (lambda t: torch.add(1, t), torch.bool, torch.int64),
    (lambda t: t + 1, torch.bool, torch.int64),
    (lambda t: torch.add(True, t), torch.bool, torch.bool),
    (lambda t: torch.mul(2.5, t), torch.float16, torch.float16),
    (lambda t: torch.sub(1j, t), torch.float32, torch.complex64),
    (lambda t: torch.floor_divide(7, t), torch.uint8, torch.uint8),
])
def test_wrapped_number_promotion(fn, dtype, expected_dtype):
    t = torch.tensor([[3, 1, 2], [5, 7, 4]]).to(dtype)
    expected = fn(t)
    assert expected.dtype == expected_dtype
    got = fn(t.to("mlx"))
    assert got.dtype == expected_dtype
    torch.testing.assert_close(got.cpu(), expected)


def test_zero_dim_cpu_tensors_promote_as_tensors():
    t = torch.tensor([1.5, -2.0, 3.0])
    for other in (torch.tensor(2.0, dtype=torch.float64), torch.tensor(3),
                  torch.tensor(2, dtype=torch.int16)):
        for fn in (lambda a, b: a + b, lambda a, b: b * a, lambda a, b: torch.atan2(b, a),
                   lambda a, b: torch.where(a > 0, b, a)):
            expected = fn(t, other)
            got = fn(t.to("mlx"), other)
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got.cpu(), expected)


# ----------------------------------------------------------------------------------------------
# The forms of issue 22, verbatim


FLOAT = torch.tensor([1.5, -2.0, 3.0, 0.25, -0.75])
INT = torch.tensor([1, -2, 3, 4, -5])


@pytest.mark.parametrize("fn", [
    lambda t, i: torch.add(1, t),
    lambda t, i: torch.mul(2, t),
    lambda t, i: torch.div(2.0, t, rounding_mode="floor"),
    lambda t, i: torch.div(2.0, t, rounding_mode="trunc"),
    lambda t, i: 3.0 // t,
    lambda t, i: 7 // i,
    lambda t, i: torch._refs.mul(2.0, t),
    lambda t, i: torch._refs.sigmoid(t),
    lambda t, i: torch._refs.add(1, i),
    lambda t, i: torch._refs.true_divide(1, i),
    lambda t, i: torch._refs.where(t > 0, 1.0, t),
    lambda t, i: torch.ops.prims.mul(2.0, t),
    lambda t, i: 1 - t,
    lambda t, i: 2 ** t,
    lambda t, i: 2.0 / t,
    lambda t, i: torch.sub(3, i, alpha=2),
    lambda t, i: torch.true_divide(True, t),
], ids=lambda fn: fn.__code__.co_firstlineno)
def test_issue_22_forms(fn):
    expected = fn(FLOAT, INT)
    got = fn(FLOAT.to("mlx"), INT.to("mlx"))
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.cpu(), expected)


def test_in_place_and_out_with_a_number():
    t = FLOAT.to("mlx")
    y = t.clone()
    y.mul_(3)
    torch.testing.assert_close(y.cpu(), FLOAT * 3)
    out = torch.empty(5, device="mlx")
    torch.add(1, t, out=out)
    torch.testing.assert_close(out.cpu(), FLOAT + 1)
    # in-place / out= of an op torch.ops only takes a number for as a wrapped one
    y = t.clone()
    torch.ops.aten.atan2_.default(y, _C.wrapped_number(2.0))
    torch.testing.assert_close(y.cpu(), torch.atan2(FLOAT, torch.tensor(2.0)))
    torch.ops.aten.atan2.out(_C.wrapped_number(2.0), t, out=out)
    torch.testing.assert_close(out.cpu(), torch.atan2(torch.tensor(2.0), FLOAT))


# ----------------------------------------------------------------------------------------------
# The compiled path


def test_compiled_numbers_in_tensor_positions():
    import torch_mlx.compile  # noqa: F401

    def f(t, i):
        return (torch.add(1, t), torch.mul(2, t), 3.0 // t, 7 // i,
                torch.div(2.0, t, rounding_mode="floor"), torch.where(t > 0, 1.0, t),
                torch.sigmoid(t), 2 ** t, 1 - i, torch.mul(3, i.to(torch.int16)), i + 2.5)

    expected = f(FLOAT, INT)
    got = torch.compile(f, backend="mlx")(FLOAT.to("mlx"), INT.to("mlx"))
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.cpu(), e)


def test_compiled_symbolic_size_in_a_tensor_position():
    # with dynamic shapes a size computed in the graph (a SymInt) can be a mul's operand
    import torch_mlx.compile  # noqa: F401

    def f(t):
        return torch.mul(t.shape[0], t), t.shape[0] - t

    g = torch.compile(f, backend="mlx", dynamic=True)
    for n in (3, 5):
        x = torch.arange(n, dtype=torch.int16)
        for got, expected in zip(g(x.to("mlx")), f(x)):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got.cpu(), expected)
