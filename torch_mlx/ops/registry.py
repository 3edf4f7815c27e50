"""The aten -> MLX lowering table and the one adapter that turns lowerings into torch kernels.

A lowering is a plain function from MLX arrays (and Python values) to MLX arrays, with the
argument names of the aten schema. Everything torch-specific happens here, once:

- argument checks, result dtype and shape: torch's own meta kernel for the op runs first, so
  errors and dtype rules are torch's (the lowering's result is cast to the meta dtype);
- elementwise type promotion: with ``promote=KIND`` tensor inputs are cast to torch's
  computation dtype before the lowering sees them;
- Python numbers in Tensor operand positions (``torch.add(1, t)``, ``3.0 // t``, ``torch._refs``
  and compiled graphs pass them) reach the lowering as ``mx.array`` values like any operand
  (``number_dtype``), so no lowering handles them itself;
- results become "mlx" tensors without copying (unless a lowering hands back an input's buffer:
  a functional op must return fresh storage);
- in-place (``op_``) and ``out=`` variants are derived from the functional kernel and write into
  the existing storage, at O(bytes written).

The compiled path (torch.compile backend "mlx") calls the same ``Lowering.fn``.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Callable

import mlx.core as mx
import torch
from torch import _prims_common as prims_utils
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND as PROMOTE
from torch._prims_common import can_safe_cast_to, elementwise_dtypes
from torch.utils._pytree import tree_flatten, tree_map

from .. import _C

__all__ = ["PROMOTE", "Lowering", "lowering", "torch_kernel", "TABLE", "TORCH_KERNELS",
           "AUTOGRAD_KERNELS", "to_mx_dtype", "to_torch_dtype", "operands", "number_dtype"]

TORCH_TO_MX = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
    torch.complex64: mx.complex64,
    torch.bool: mx.bool_,
    torch.uint8: mx.uint8,
    torch.int8: mx.int8,
    torch.int16: mx.int16,
    torch.int32: mx.int32,
    torch.int64: mx.int64,
    torch.uint16: mx.uint16,
    torch.uint32: mx.uint32,
    torch.uint64: mx.uint64,
}
MX_TO_TORCH = {v: k for k, v in TORCH_TO_MX.items()}


def to_mx_dtype(dtype: torch.dtype) -> mx.Dtype:
    try:
        return TORCH_TO_MX[dtype]
    except KeyError:
        raise TypeError(f"mlx does not support dtype {dtype}; use a 32-bit or smaller dtype "
                        f"(e.g. torch.float32)") from None


def to_torch_dtype(dtype: mx.Dtype) -> torch.dtype:
    return MX_TO_TORCH[dtype]


@dataclasses.dataclass(frozen=True)
class Lowering:
    name: str  # aten overload, e.g. "add.Tensor"
    fn: Callable
    promote: PROMOTE | None  # elementwise type promotion of the tensor/number inputs
    meta: bool  # run torch's meta kernel first (False for data-dependent output shapes)
    # False: compiled graphs only (view ops, which eager runs natively in C++). A predicate
    # ``eager(*args, **kwargs) -> bool``: eager calls where it is true run the lowering, the
    # others torch's CompositeExplicitAutograd kernel (ops whose composite is right everywhere
    # but goes through host memory, where the common case is one MLX op: see eager_kernel).
    eager: bool | Callable = True
    # True: half-precision inputs are promoted to float32 (torch's "opmath"). False: inputs are
    # cast to the result dtype, for ops whose CPU kernels round every step to half precision.
    opmath: bool = True
    # False: in a compiled graph the lowering runs between mx.compile'd segments, as plain MLX
    # calls in the same lazy graph, because it reads state that changes per call (vLLM's
    # attention reads the step's metadata and KV cache).
    compiled: bool = True
    # spec(meta_spec, *args, **kwargs) -> spec: the CPU kernel's result (shape, dtype, strides)
    # where torch's meta kernel for the op (a Python decomposition) gives another; eager only.
    spec: Callable | None = None


TABLE: dict[str, Lowering] = {}

# True while torch_mlx.compile traces a graph into an MLX function. Lowerings must then not
# evaluate arrays: value-dependent checks (index bounds, ...) run in eager mode only, as torch's
# own compiled kernels skip host-side checks; data-dependent output shapes cannot be traced.
_tracing = False


def tracing() -> bool:
    return _tracing


_MAIN_THREAD_ID = threading.main_thread().ident


def compile_allowed() -> bool:
    """Whether this thread may call ``mx.compile``d functions. MLX 0.32 keeps one compile cache
    per thread, holding Python objects, and frees a thread's cache when the thread ends; only
    the main thread's is freed before the interpreter shuts down (MLX's atexit hook). torch's
    autograd device threads ("pt_autograd_0", where backward runs) end after that, so a cache
    filled there crashes the process at exit. Other threads run the same MLX ops uncompiled."""
    return threading.get_ident() == _MAIN_THREAD_ID


def lowering(*names: str, promote: PROMOTE | None = None, meta: bool = True,
             eager: bool = True, opmath: bool = True, compiled: bool = True,
             spec: Callable | None = None):
    """Register ``fn`` as the MLX lowering of the aten overloads ``names``.

    A name may carry another namespace, ``"ns::op.overload"``: a library's custom op (defined
    with ``torch.library``, with a fake kernel for shapes and dtypes), e.g. vllm_metal's fused
    kernels. It then runs on "mlx" eagerly and inside compiled graphs like an aten op.

    ``eager=False`` keeps the lowering out of eager dispatch: view ops must alias their input's
    storage in eager mode (done natively in C++), but inside a compiled MLX graph they are
    ordinary MLX ops.

    ``compiled=False`` runs the lowering outside ``mx.compile`` in compiled graphs (see
    Lowering.compiled). A lowering of an op that mutates arguments (reached in compiled graphs
    through torch's ``auto_functionalized``) returns what auto_functionalized returns: the op's
    result, then the new value of each mutated argument.

    ``spec`` corrects the result spec of torch's meta kernel where it disagrees with the CPU
    kernel (see Lowering.spec), so eager results have the CPU's shape."""

    def register(fn):
        for name in names:
            if name in TABLE:
                raise RuntimeError(f"aten::{name} is lowered twice")
            TABLE[name] = Lowering(name, fn, promote, meta, eager, opmath, compiled, spec)
            if _registrar is not None and eager:  # a lowering added after import (a plugin's)
                _registrar.functional(name, eager_kernel(overload(name), TABLE[name]))
        return fn

    return register


# Kernels written in torch itself (composites of lowered ops, e.g. an out= overload whose
# arguments differ from its functional twin). Use sparingly: prefer an MLX lowering.
TORCH_KERNELS: dict[str, Callable] = {}
# Kernels at the autograd level (AutogradPrivateUse1) for CompositeImplicitAutograd overloads
# whose C++ composite cannot run on "mlx" as written (e.g. it allocates float64 tensors on the
# input's device): they call differentiable ops, so autograd records through them as through
# the composite, and the composite stays in charge of every other device. They are registered
# for PrivateUse1 too, which is where calls that skip autograd (inference mode) land.
AUTOGRAD_KERNELS: dict[str, Callable] = {}


def torch_kernel(*names: str, autograd: bool = False):
    """Register ``fn`` (a torch-level function) as the PrivateUse1 kernel of ``names``, or with
    ``autograd=True`` as their AutogradPrivateUse1 kernel (see AUTOGRAD_KERNELS)."""

    def register(fn):
        for name in names:
            if name in TABLE or name in TORCH_KERNELS or name in AUTOGRAD_KERNELS:
                raise RuntimeError(f"aten::{name} is lowered twice")
            (AUTOGRAD_KERNELS if autograd else TORCH_KERNELS)[name] = fn
        return fn

    return register


# ----------------------------------------------------------------------------------------------
# Argument conversion


def _is_mlx(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "mlx"


def _arg_to_mx(x, buffers: list):
    """An argument as the lowering sees it, for what _C.lowering_args does not convert itself
    ("mlx" tensors, plain scalars, sequences): CPU tensors and dtypes."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 and x.device.type == "cpu":  # CPU scalars mix with device tensors in torch
            return mx.array(x.item(), dtype=to_mx_dtype(x.dtype))
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"mlx:0 and {x.device}!")
    if isinstance(x, torch.dtype):
        return to_mx_dtype(x)
    return x


def _arg_to_meta(x):
    if isinstance(x, torch.Tensor) and x.device.type == "mlx":
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, torch.device) and x.type == "mlx":
        return torch.device("meta")
    if isinstance(x, torch.Generator):
        return None
    return x


# ----------------------------------------------------------------------------------------------
# Python numbers in Tensor operand positions. torch lets a number stand for a tensor in some
# calls (``torch.add(1, t)``, ``3.0 // t``, ``torch._refs`` / prims, FX graphs of compiled code):
# the dispatcher wraps it in a 0-d CPU tensor marked as a "wrapped number", which type promotion
# treats as a Python scalar (``int16_t * 3`` stays int16, ``int_t + 2.5`` is the default float
# dtype), and a Python kernel receives the number itself again. Lowerings never see one: in
# every Tensor argument of the schema a number (or a 0-d CPU tensor) becomes an ``mx.array``,
# of the dtype ``number_dtype`` gives; torch's meta kernel sees the number as the dispatcher
# passes it, a wrapped number (``_C.wrapped_number``), so its checks and result dtype are
# torch's.

_NUMBER_TYPES = (bool, int, float, complex)
_OPERANDS: dict = {}


def operands(op) -> tuple[tuple[int, ...], frozenset[str]]:
    """Where ``op``'s schema takes a ``Tensor`` or ``Tensor?`` operand: the positions of the
    positional ones, and the names of all of them (for arguments passed by name)."""
    found = _OPERANDS.get(op)
    if found is None:
        args = op._schema.arguments
        is_operand = [str(a.type) in ("Tensor", "Optional[Tensor]")
                      and not (a.alias_info is not None and a.alias_info.is_write and a.kwarg_only)
                      for a in args]
        found = (tuple(i for i, a in enumerate(args) if is_operand[i] and not a.kwarg_only),
                 frozenset(a.name for i, a in enumerate(args) if is_operand[i]))
        _OPERANDS[op] = found
    return found


def number_dtype(x, operand_values, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the array a number ``x`` in a Tensor operand position becomes.

    A lowering that promotes (``promote=``) gets all its operands in the computation dtype,
    numbers included. Another one gets the dtype torch's type promotion gives the wrapped number
    among ``operand_values`` (the call's values in its Tensor positions) when that is of the
    number's own kind (an int with int16 tensors is int16, a float with float16 ones float16),
    and otherwise the kind's default (bool, int64, the default float and complex dtypes): a
    bool stays a bool next to float tensors (a mask, a condition), as in torch's kernels.
    A 0-d CPU tensor is a tensor, not a number: it keeps its dtype unless the lowering
    promotes, or MLX has no such dtype (float64, complex128: then it goes as a number would)."""
    if compute_dtype is not None:
        return compute_dtype
    if isinstance(x, torch.Tensor):
        if x.dtype in TORCH_TO_MX:
            return x.dtype
        x = x.item()
    kind = prims_utils.number_type(x)
    promoted = elementwise_dtypes(*operand_values, type_promotion_kind=PROMOTE.DEFAULT)[1]
    if prims_utils.dtype_to_type(promoted) is kind and promoted in TORCH_TO_MX:
        return promoted
    return prims_utils.type_to_dtype(kind)


def _is_number_operand(x) -> bool:
    """A number, or a 0-d CPU tensor (which mixes with device tensors in torch). Runs for every
    operand of every eager op: the cheapest tests first."""
    if type(x) in _NUMBER_TYPES:
        return True
    return isinstance(x, torch.Tensor) and x.is_cpu and x.dim() == 0


def _operand_values(args, kwargs, positions, names) -> list:
    return [args[i] for i in positions if i < len(args)] + \
        [v for k, v in kwargs.items() if k in names]


def _numbers_to_mx(args: tuple, kwargs: dict, positions, names, compute_dtype):
    """args and kwargs with the numbers (and 0-d CPU tensors) in Tensor operand positions as
    mx.arrays; (args, kwargs) themselves when there are none."""
    n = len(args)
    found = [i for i in positions if i < n and _is_number_operand(args[i])]
    found_kw = [k for k, v in kwargs.items() if k in names and _is_number_operand(v)] \
        if kwargs else ()
    if not found and not found_kw:
        return args, kwargs
    values = _operand_values(args, kwargs, positions, names)

    def to_mx(x):
        dtype = number_dtype(x, values, compute_dtype)
        value = x.item() if isinstance(x, torch.Tensor) else x
        return mx.array(value, dtype=to_mx_dtype(dtype))

    args = list(args)
    for i in found:
        args[i] = to_mx(args[i])
    kwargs = dict(kwargs)
    for k in found_kw:
        kwargs[k] = to_mx(kwargs[k])
    return args, kwargs


def _has_numbers(op, args, kwargs) -> bool:
    """Whether a Python number is in one of op's Tensor operand positions."""
    positions, names = operands(op)
    return any(type(args[i]) in _NUMBER_TYPES for i in positions if i < len(args)) or \
        any(type(v) in _NUMBER_TYPES for k, v in kwargs.items() if k in names)


def _wrap_numbers(op, args, kwargs):
    """args and kwargs with each Python number in a Tensor position as the dispatcher passes it
    (a wrapped-number CPU tensor): for calling ``op`` itself (its meta kernel, the CPU, the
    functional op from an in-place or out= kernel). torch.ops accepts a plain number in a Tensor
    argument only for a few ops (add, mul, div, ...)."""
    if not _has_numbers(op, args, kwargs):
        return args, kwargs
    positions, names = operands(op)
    args = tuple(_C.wrapped_number(a) if i in positions and type(a) in _NUMBER_TYPES else a
                 for i, a in enumerate(args))
    kwargs = {k: _C.wrapped_number(v) if k in names and type(v) in _NUMBER_TYPES else v
              for k, v in kwargs.items()}
    return args, kwargs


def _number_tensors(op, margs, mkwargs, args, kwargs):
    """margs and mkwargs (meta arguments of a call with ``args``, ``kwargs``) with each number in
    a Tensor position as a 0-d meta tensor of its ``number_dtype``."""
    if not _has_numbers(op, margs, mkwargs):
        return margs, mkwargs
    positions, names = operands(op)
    values = _operand_values(args, kwargs, positions, names)

    def stand_in(x):
        return torch.zeros((), dtype=number_dtype(x, values), device="meta")

    margs = tuple(stand_in(a) if i in positions and type(a) in _NUMBER_TYPES else a
                  for i, a in enumerate(margs))
    mkwargs = {k: stand_in(v) if k in names and type(v) in _NUMBER_TYPES else v
               for k, v in mkwargs.items()}
    return margs, mkwargs


def _wrap(result, spec, low: Lowering, buffers: list):
    """MLX result(s) -> "mlx" tensor(s), cast and checked against torch's (shape, dtype,
    strides) spec."""
    if isinstance(result, (tuple, list)):
        meta_ran = isinstance(spec, tuple) and bool(spec) and isinstance(spec[0], tuple)
        specs = spec if meta_ran else [None] * len(result)
        # an output torch's meta kernel gives as a number (a SymInt in the schema) stays one
        return type(result)(
            r if meta_ran and m is None and type(r) is int else _wrap(r, m, low, buffers)
            for r, m in zip(result, specs))
    if result is None:
        return None
    if not isinstance(result, mx.array):
        result = mx.array(result)
    shape, dtype, strides = spec if spec is not None else (None, None, None)
    return _C.wrap_result(result, shape, dtype and to_mx_dtype(dtype), buffers, low.name,
                          strides)


# ----------------------------------------------------------------------------------------------
# Torch's meta kernels decide checks, result shapes and dtypes. Running one costs hundreds of
# microseconds (many are Python refs), so the outcome is cached by the arguments' metadata: meta
# kernels see no values, so equal (shape, stride, dtype) and equal non-tensor arguments give the
# same result. Errors are not cached: they are raised again by rerunning the meta kernel.

_META_CACHE: dict = {}
_META_CACHE_SIZE = 8192
_NO_META: set = set()
_UNHASHABLE = object()


def _key_of(x):
    """The meta-cache key of an argument _C.meta_key does not key itself (tensors, plain
    scalars, sequences): subclasses of the scalar types, torch's dtype/device/layout/memory
    format values, generators; _UNHASHABLE for anything else."""
    if isinstance(x, torch.Generator):
        return torch.Generator
    if x is None or isinstance(x, (bool, int, float, complex, str, torch.dtype, torch.device,
                                   torch.layout, torch.memory_format)):
        return (type(x), x)
    return _UNHASHABLE


def _spec_of(meta_out):
    if isinstance(meta_out, torch.Tensor):
        return (tuple(meta_out.shape), meta_out.dtype, meta_out.stride())
    if isinstance(meta_out, (tuple, list)):
        return tuple(_spec_of(m) for m in meta_out)
    return None


def _meta_info(op, args, kwargs, promote, opmath=True):
    """(result spec, computation dtype) for a call, from the cache or torch's meta kernel."""
    if op in _NO_META:
        return None, _compute_dtype(args, promote, opmath)
    key = _C.meta_key(args, kwargs, _key_of, _UNHASHABLE)
    if key is not None:
        key = (op, key)
        hit = _META_CACHE.get(key)
        if hit is not None:
            return hit
    try:
        margs, mkwargs = _wrap_numbers(op, *tree_map(_arg_to_meta, (args, kwargs)))
        spec = _spec_of(op(*margs, **mkwargs))
    except NotImplementedError:
        _NO_META.add(op)  # no meta kernel: the lowering's own result dtype stands
        return None, _compute_dtype(args, promote, opmath)
    except Exception as meta_error:
        spec = _as_the_cpu_would(op, args, kwargs, meta_error)
    info = (spec, _compute_dtype(args, promote, opmath))
    if key is not None:
        if len(_META_CACHE) >= _META_CACHE_SIZE:
            _META_CACHE.clear()
        _META_CACHE[key] = info
    return info


def _cpu_stand_in(x, fill=0):
    """A CPU tensor with x's shape and dtype that allocates one element (stride 0), holding
    ``fill``; a 0-dim tensor is copied (its value may be what a check is about: a fill value's
    type range)."""
    if isinstance(x, torch.Tensor) and x.device.type == "mlx":
        if x.dim() == 0:
            return x.cpu()
        return torch.full((), fill, dtype=x.dtype).expand(x.shape)
    if isinstance(x, torch.device) and x.type == "mlx":
        return torch.device("cpu")
    return x


def _as_the_cpu_would(op, args, kwargs, meta_error: Exception):
    """A meta kernel rejected the call. Some raise another exception type than the CPU kernel
    for the same mistake (RuntimeError where the CPU raises IndexError, e.g. argmax over an
    empty tensor), many another message (torch's Python meta kernels and refs word their checks
    differently: "Number of dimensions of tensors must match" for the CPU's "Tensors must have
    same number of dimensions"); users catch the CPU's types and match its messages (as
    OpInfo's error inputs do). So a functional op is tried on CPU stand-ins of the same shapes
    and dtypes, and the CPU's exception is raised when it raises one, unless it only says that
    the CPU has no kernel for the dtype where the meta kernel raised a check of the same type
    ("mlx" may have the kernel: the meta check stands). Only error paths pay for this.

    Python refs serving as meta kernels also reject a Python number where the CPU kernel takes
    the wrapped number (atan2, xlogy, ... refuse one as their first operand): when the CPU
    accepts a call with numbers in Tensor operand positions, its result's spec is returned. An
    in-place op cannot run on stand-ins; its meta kernel reruns with each number as a 0-d
    tensor of ``number_dtype`` (type promotion treats the two alike next to the op's tensors),
    and the functional op it calls next raises where the CPU would."""
    devices = {x.device.type for x in tree_flatten((args, kwargs))[0]
               if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(devices) > 1:  # the meta kernel would name "meta" instead of the user's devices
        other = sorted(devices - {"mlx"})[0]
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                           f"devices, mlx:0 and {other}!") from None
    numbers = _has_numbers(op, args, kwargs)
    if any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments):
        if not numbers:
            raise meta_error
        margs, mkwargs = _number_tensors(op, *tree_map(_arg_to_meta, (args, kwargs)),
                                         args, kwargs)
        return _spec_of(op(*margs, **mkwargs))
    # with numbers the call may be valid, so the stand-ins hold ones (integer division by the
    # usual zeros would fail)
    try:
        cargs, ckwargs = _wrap_numbers(op, *tree_map(
            lambda x: _cpu_stand_in(x, 1 if numbers else 0), (args, kwargs)))
        cpu_result = op(*cargs, **ckwargs)
    except Exception as cpu_error:  # noqa: BLE001  (re-raised as is)
        # the CPU's lack of a kernel for the dtype stands only against a meta check of its kind
        # (not against a meta kernel that cannot take a Python number: AttributeError)
        if "not implemented for" not in str(cpu_error) or type(cpu_error) is not type(meta_error):
            raise cpu_error.with_traceback(None) from None
        raise meta_error from None
    if numbers:  # the meta kernel refused a number the CPU takes: the CPU's spec stands
        return _spec_of(cpu_result)
    raise meta_error


def _compute_dtype(args, promote, opmath):
    if promote is None:
        return None
    inputs = [a for a in args if isinstance(a, (torch.Tensor, bool, int, float, complex))]
    return elementwise_dtypes(*inputs, type_promotion_kind=promote)[0 if opmath else 1]


# MLX's GPU scatter takes no 8-byte element types (int64, uint64; complex64 for sums only), on
# Metal as on CUDA, and raises while the graph is built, before anything runs. A lowering that
# hits it runs again with MLX's CPU stream, which shares the memory.
_GPU_UNSUPPORTED = ("GPU scatter does not yet support",)


def call_lowering(fn, args, kwargs):
    """``fn(*args, **kwargs)``, on MLX's CPU stream where MLX's GPU lacks the operation."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        if not any(m in str(exc) for m in _GPU_UNSUPPORTED) or mx.default_device() != mx.gpu:
            raise
    with mx.stream(mx.cpu):
        return fn(*args, **kwargs)


_HALF = (mx.float16, mx.bfloat16)


def accumulate_at(x: mx.array, key, vals: mx.array, how: str = "add") -> mx.array:
    """``x.at[key].add(vals)`` (``how="multiply"``: ``.multiply``), the one place lowerings
    accumulate into repeated positions. MLX's CPU stream accumulates in update order in the
    array's dtype, as torch's CPU kernels do. MLX's GPU scatter accumulates with atomics in no
    fixed order, so in float16/bfloat16, which round at every step, the result changed from run
    to run: there half types accumulate in float32 and round once."""
    if x.dtype in _HALF and mx.default_device() == mx.gpu:
        at, v = x.astype(mx.float32).at[key], vals.astype(mx.float32)
        return (at.add(v) if how == "add" else at.multiply(v)).astype(x.dtype)
    at = x.at[key]
    return at.add(vals) if how == "add" else at.multiply(vals)


def functional_kernel(op, low: Lowering):
    positions, names = operands(op)

    def kernel(*args, **kwargs):
        if low.meta:
            spec, compute_dtype = _meta_info(op, args, kwargs, low.promote, low.opmath)
            if low.spec is not None and spec is not None:
                spec = low.spec(spec, *args, **kwargs)
        else:
            spec, compute_dtype = None, _compute_dtype(args, low.promote, low.opmath)
        args, kwargs = _numbers_to_mx(args, kwargs, positions, names, compute_dtype)
        buffers = []
        margs = _C.lowering_args(list(args), buffers, _arg_to_mx)
        mkwargs = dict(zip(kwargs, _C.lowering_args(tuple(kwargs.values()), buffers, _arg_to_mx)))
        if compute_dtype is not None:  # the tensor arguments, cast to the computation dtype
            _C.cast_arrays(margs, to_mx_dtype(compute_dtype))
        result = call_lowering(low.fn, margs, mkwargs)
        return _wrap(result, spec, low, buffers)

    kernel.__name__ = f"mlx_{low.name.replace('.', '_')}"
    return kernel


def eager_kernel(op, low: Lowering):
    """The eager kernel of a lowering: functional_kernel, or, where ``low.eager`` is a predicate,
    that kernel for the calls it accepts and torch's composite kernel for the rest."""
    kernel = functional_kernel(op, low)
    if low.eager is True:
        return kernel
    accepts = low.eager
    composite = functools.partial(op._op_dk, torch._C.DispatchKey.CompositeExplicitAutograd)

    def guarded(*args, **kwargs):
        return (kernel if accepts(*args, **kwargs) else composite)(*args, **kwargs)

    guarded.__name__ = kernel.__name__
    return guarded


def inplace_kernel(op_inplace, functional_op):
    """``self.op_(...)``: torch's in-place checks, the functional result, then a copy into self."""

    def kernel(self, *args, **kwargs):
        _meta_info(op_inplace, (self, *args), kwargs, None)  # torch's in-place checks
        args, kwargs = _wrap_numbers(functional_op, (self, *args), kwargs)
        result = functional_op(*args, **kwargs)
        if isinstance(result, (tuple, list)):
            result = result[0]
        # torch's in-place rule, checked here too: some torch versions' meta kernels skip it
        # (2.11's div_ of an integer tensor by a float)
        if not can_safe_cast_to(cast_from=result.dtype, cast_to=self.dtype):
            raise RuntimeError(f"result type {_type_name(result.dtype)} can't be cast to the "
                               f"desired output type {_type_name(self.dtype)}")
        return self.copy_(result)

    return kernel


def out_kernel(op_out, functional_op, out_names: list[str]):
    """``op(..., out=...)``: the functional result, checked and written into the out tensors."""
    no_full_overlap = op_out.name().removeprefix("aten::") in _NO_FULL_OVERLAP

    def kernel(*args, **kwargs):
        outs = [kwargs.pop(n) for n in out_names]
        # numbers first: the CPU's out= op, which decides overlap errors, takes wrapped numbers
        args, kwargs = _wrap_numbers(functional_op, args, kwargs)
        _check_out_overlap(op_out, args, kwargs, dict(zip(out_names, outs)), no_full_overlap)
        result = functional_op(*args, **kwargs)
        results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        for out, res in zip(outs, results):
            if not can_safe_cast_to(cast_from=res.dtype, cast_to=out.dtype):
                _raise_cpu_out_error(op_out, args, kwargs, dict(zip(out_names, outs)))
                raise RuntimeError(f"result type {_type_name(res.dtype)} can't be cast to the "
                                   f"desired output type {_type_name(out.dtype)}")
            torch._refs._maybe_resize_out(out, res.shape)
            out.copy_(res)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return kernel


# An out tensor that shares memory with itself (expanded) or with an input: the CPU's out=
# kernels refuse some of these calls and not others (TensorIterator and at::assert_no_*overlap
# checks, before or after resizing the out tensor, per op). Such calls are rare (bad input), so
# the CPU decides: the call is repeated on CPU copies with the same aliasing and its error is
# raised. An out tensor that *is* an input (full overlap) is common and allowed, except by the
# kernels that call at::assert_no_overlap (e.g. index_select(x, 0, i, out=x)): those are listed.
_NO_FULL_OVERLAP = {"cat.out", "gather.out", "index_select.out", "kthvalue.values",
                    "masked_select.out", "take.out"}
_OVERLAP = ("unsupported operation: some elements of the input tensor and the written-to tensor "
            "refer to a single memory location. Please clone() the tensor before performing the "
            "operation.")


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements tile a contiguous range of memory."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _full_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """at::get_overlap_status(a, b) == Full: the same tensor, or the same dense elements."""
    if a._cdata == b._cdata:
        return True
    return (a.numel() > 0 and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset() and a.dtype == b.dtype and _dense(a)
            and a.untyped_storage()._cdata == b.untyped_storage()._cdata)


def _check_out_overlap(op_out, args, kwargs, outs: dict, no_full_overlap: bool) -> None:
    inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    aliased = False
    for out in outs.values():
        if not isinstance(out, torch.Tensor):
            continue
        if no_full_overlap and any(_full_overlap(out, x) for x in inputs):
            raise RuntimeError(_OVERLAP)
        if out.numel() > 1 and not _dense(out):
            aliased = True  # perhaps expanded: the CPU decides
        storage = out.untyped_storage()._cdata
        aliased = aliased or any(x.untyped_storage()._cdata == storage
                                 and not _full_overlap(out, x) for x in inputs)
    if aliased:
        _raise_cpu_out_error(op_out, args, kwargs, outs, keep_aliasing=True)


def _cpu_mirror(value, storages: dict):
    """An "mlx" tensor's CPU copy with the same storage extent, strides and offset; tensors
    sharing a storage share the copy's."""
    if not (isinstance(value, torch.Tensor) and value.device.type == "mlx"):
        return _cpu_stand_in(value)
    storage = value.untyped_storage()
    flat = storages.get((storage._cdata, value.dtype))
    if flat is None:
        whole = torch.empty(0, dtype=value.dtype, device=value.device).set_(
            storage, 0, (storage.nbytes() // value.element_size(),), (1,))
        flat = storages[storage._cdata, value.dtype] = whole.cpu()
    return flat.as_strided(value.shape, value.stride(), value.storage_offset())


def _raise_cpu_out_error(op_out, args, kwargs, outs: dict, keep_aliasing=False) -> None:
    """Raise the CPU's error for an out= call, if it raises one: tried on CPU stand-ins and
    fresh out tensors (an out the functional result cannot be cast to: the CPU kernels word
    their dtype checks per op), or with ``keep_aliasing`` on CPU copies that share memory as the
    "mlx" tensors do."""
    try:
        if keep_aliasing:
            storages = {}
            cargs, ckwargs, couts = tree_map(lambda x: _cpu_mirror(x, storages),
                                             (args, kwargs, outs))
        else:
            cargs, ckwargs = tree_map(_cpu_stand_in, (args, kwargs))
            couts = {name: (torch.empty(o.shape, dtype=o.dtype)
                            if isinstance(o, torch.Tensor) else o) for name, o in outs.items()}
        op_out(*cargs, **ckwargs, **couts)
    except Exception as cpu_error:  # noqa: BLE001  (re-raised as is)
        if "not implemented for" not in str(cpu_error):
            raise cpu_error.with_traceback(None) from None


def _type_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
            torch.float64: "Double"}.get(dtype, str(dtype))


# ----------------------------------------------------------------------------------------------
# Registration


def overload(name: str):
    """"add.Tensor" -> torch.ops.aten.add.Tensor; "ns::op" -> torch.ops.ns.op.default."""
    namespace, _, name = name.rpartition("::")
    base, _, ovl = name.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace or "aten"), base), ovl or "default")


def _arg_signature(schema, drop_out: bool):
    return [(a.name, str(a.type)) for a in schema.arguments
            if not (drop_out and a.kwarg_only and a.alias_info is not None and a.alias_info.is_write)]


def out_names(schema) -> list[str]:
    return [a.name for a in schema.arguments
            if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write]


def out_variant(op):
    """The ``out=`` overload of a functional overload: same packet, same non-out arguments."""
    if op.namespace != "aten":
        return None
    packet = getattr(torch.ops.aten, op._schema.name.split("::")[1])
    want = _arg_signature(op._schema, drop_out=False)
    for name in packet.overloads():
        cand = getattr(packet, name)
        if out_names(cand._schema) and _arg_signature(cand._schema, drop_out=True) == want:
            return cand
    return None


def inplace_variant(op):
    """The in-place overload of a functional overload: same arguments (names and types), in the
    ``op_`` packet; the same overload name first (pow.Tensor_Scalar's twin is pow_.Scalar)."""
    base = op._schema.name.split("::")[1]
    packet = getattr(torch.ops.aten, base + "_", None) if op.namespace == "aten" else None
    if packet is None:
        return None
    want = _arg_signature(op._schema, drop_out=False)
    names = sorted(packet.overloads(), key=lambda n: n != op._overloadname)
    for name in names:
        cand = getattr(packet, name)
        if _arg_signature(cand._schema, drop_out=False) == want:
            return cand
    return None


def _qualname(op) -> str:
    """The table's name of an overload: "add.Tensor" for aten, "ns::op" for other namespaces."""
    namespace, base = op._schema.name.split("::")
    name = base if op._overloadname == "default" else f"{base}.{op._overloadname}"
    return name if namespace == "aten" else f"{namespace}::{name}"


class Registrar:
    """Registers kernels for PrivateUse1 and remembers which overloads it covered."""

    def __init__(self):
        self.libs: dict[str, torch.library.Library] = {}
        self.covered: set[str] = set()

    def impl(self, name: str, kernel, key: str = "PrivateUse1") -> None:
        namespace, _, op_name = name.rpartition("::")
        namespace = namespace or "aten"
        if namespace not in self.libs:
            self.libs[namespace] = torch.library.Library(namespace, "IMPL")
        self.libs[namespace].impl(op_name, kernel, key)
        if key == "PrivateUse1":
            self.covered.add(name)

    def functional(self, name: str, kernel) -> None:
        """Register a functional kernel plus the in-place and out= variants derived from it."""
        op = overload(name)
        self.impl(name, kernel)
        inplace = inplace_variant(op)
        if inplace is not None and not self._taken(_qualname(inplace)):
            self.impl(_qualname(inplace), inplace_kernel(inplace, op))
        out = out_variant(op)
        if out is not None and not self._taken(_qualname(out)):
            self.impl(_qualname(out), out_kernel(out, op, out_names(out._schema)))

    def _taken(self, name: str) -> bool:
        return name in self.covered or name in TABLE or name in TORCH_KERNELS

    def register_all(self) -> None:
        global _registrar
        for name, fn in TORCH_KERNELS.items():
            self.impl(name, fn)
        for name, fn in AUTOGRAD_KERNELS.items():
            self.impl(name, fn, "AutogradPrivateUse1")
            self.impl(name, fn)
        for name, low in TABLE.items():
            if low.eager:
                self.functional(name, eager_kernel(overload(name), low))
        _registrar = self  # lowerings registered from now on (plugins) are bound at once


_registrar: Registrar | None = None
