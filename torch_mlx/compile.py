"""torch.compile backend "mlx": an FX graph becomes one compiled MLX function.

Dynamo captures the graph; AOTAutograd makes it functional aten (using torch's decompositions
only for ops that have no lowering); every node is lowered through the same table as eager mode
(``torch_mlx.ops.registry.TABLE`` -- no op is lowered twice); the resulting Python function over
``mx.array`` values is wrapped in ``mx.compile`` and called on zero-copy views of the inputs.
Nodes with no lowering are split out by torch's capability partitioner and run eagerly between
the MLX pieces.

Shapes: dynamo's symbolic sizes arrive as Python ints; ``mx.compile`` retraces for new input
shapes or constants, which is cheap next to a dynamo recompile.
"""
from __future__ import annotations

import operator
import os

import mlx.core as mx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._prims_common import Number, elementwise_dtypes
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from . import _C, compile_patterns, precision
from .ops import registry

__all__ = ["mlx_backend", "compile_fx_graph"]


# Integer arithmetic on symbolic sizes: plain Python inside the MLX function (mx.compile
# retraces when the resulting constants change).
_SIZE_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
             operator.mod, operator.neg, operator.pow, operator.eq, operator.ne, operator.lt,
             operator.le, operator.gt, operator.ge, operator.getitem}


def _size_op(target):
    if target in _SIZE_OPS:
        return target
    if target is torch.ops.aten.sym_size.int:
        return lambda a, dim: a.shape[dim]
    if target is torch.ops.aten.sym_numel.default:
        return lambda a: a.size
    return None


def _lowering_of(target) -> registry.Lowering | None:
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return registry.TABLE.get(registry._qualname(target))


_AUTO_FUNCTIONALIZED = torch.ops.higher_order.auto_functionalized


def _node_lowering(node: fx.Node) -> registry.Lowering | None:
    """The lowering of a call_function node: its op's, or for torch's functional form of an op
    that mutates its arguments (auto_functionalized(op, **kwargs)), the mutating op's."""
    if node.target is _AUTO_FUNCTIONALIZED:
        return _lowering_of(node.args[0])
    return _lowering_of(node.target)


def _meta_val(x):
    return x.meta.get("val") if isinstance(x, fx.Node) else x


_COPY_ = torch.ops.aten.copy_.default
_INDEX_COPY = torch.ops.aten.index_copy.default


def _input_write(node: fx.Node) -> bool:
    """``copy_(input, value)``: how AOTAutograd leaves an input mutation in an inference graph
    (keep_inference_input_mutations), the graph's last use of that input."""
    return (node.op == "call_function" and node.target is _COPY_
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder")


class _Supported(OperatorSupportBase):
    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if _makes_tensor_off_mlx(node):  # a factory for the CPU (say): torch runs it eagerly
            return False
        return (_size_op(node.target) is not None or _node_lowering(node) is not None
                or _input_write(node))


def _makes_tensor_off_mlx(node: fx.Node) -> bool:
    """A node whose value torch's trace puts on another device than "mlx" (``torch.tensor(2.0)``
    on the CPU): an MLX graph would return it on "mlx"."""
    vals = node.meta.get("val")
    vals = vals if isinstance(vals, (list, tuple)) else [vals]
    return any(isinstance(v, torch.Tensor) and v.device.type != "mlx" for v in vals)


def _const_to_mx(x):
    if isinstance(x, torch.dtype):
        return registry.to_mx_dtype(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_const_to_mx(y) for y in x)
    return x


class _Step:
    """One graph node, prepared at compile time: its lowering, where its arguments come from,
    the dtype its tensor inputs are promoted to, the dtype each number in a Tensor operand
    position becomes, and the dtype(s) torch says it returns."""

    def __init__(self, node: fx.Node, low: registry.Lowering):
        self.node = node
        self.fn = low.fn
        self.compiled = low.compiled
        self.args = _const_to_mx(node.args)
        self.kwargs = {k: _const_to_mx(v) for k, v in node.kwargs.items()}
        op = node.target
        if node.target is _AUTO_FUNCTIONALIZED:  # the mutating op's arguments, all by name
            op = node.args[0]
            self.args = ()
            self.kwargs = {k: v for k, v in self.kwargs.items() if not k.startswith("_")}
        compute = None
        if low.promote is not None:
            inputs = [_meta_val(a) for a in node.args]
            inputs = [a for a in inputs if isinstance(a, (torch.Tensor, *Number))]
            dtypes = elementwise_dtypes(*inputs, type_promotion_kind=low.promote)
            compute = dtypes[0 if low.opmath else 1]
        self.compute = None if compute is None else registry.to_mx_dtype(compute)
        self.numbers = self._numbers(op, compute)
        self.out_dtypes = _out_dtypes(node.meta.get("val"))

    def _numbers(self, op, compute) -> list:
        """(position or name, mx dtype) of the Python numbers (constants, or symbolic sizes
        computed in the graph) in the op's Tensor operand positions: the lowering gets them as
        arrays, as in eager mode (registry.number_dtype)."""
        positions, names = registry.operands(op)
        where = [i for i in positions if i < len(self.args)]
        where += [k for k in self.kwargs if k in names]
        values = {w: _meta_val(self.args[w] if isinstance(w, int) else self.kwargs[w])
                  for w in where}
        operand_values = [v for v in values.values() if isinstance(v, (torch.Tensor, *Number))]
        return [(w, registry.to_mx_dtype(registry.number_dtype(v, operand_values, compute)))
                for w, v in values.items() if isinstance(v, Number)]


def _out_dtypes(val):
    if isinstance(val, torch.Tensor):
        return registry.to_mx_dtype(val.dtype)
    if isinstance(val, (list, tuple)):
        return [_out_dtypes(v) for v in val]
    return None


def _cast(result, dtypes):
    if isinstance(result, mx.array):
        return result if dtypes is None or result.dtype == dtypes else result.astype(dtypes)
    if isinstance(result, (list, tuple)) and isinstance(dtypes, list):
        return type(result)(_cast(r, d) for r, d in zip(result, dtypes))
    return result


def _value(a, env):
    if isinstance(a, fx.Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_value(x, env) for x in a)
    return a


def _execute(step, env) -> None:
    """Run one step (a lowering, or size arithmetic / getitem on a node) into ``env``."""
    if isinstance(step, fx.Node):
        env[step] = _size_op(step.target)(*_value(step.args, env))
        return
    args = [_value(a, env) for a in step.args]
    kwargs = {k: _value(v, env) for k, v in step.kwargs.items()}
    for where, dtype in step.numbers:
        values = args if isinstance(where, int) else kwargs
        values[where] = mx.array(values[where], dtype=dtype)
    if step.compute is not None:
        args = [a.astype(step.compute) if isinstance(a, mx.array)
                and a.dtype != step.compute else a for a in args]
    result = registry.call_lowering(step.fn, args, kwargs)
    env[step.node] = _cast(result, step.out_dtypes)


class _Tracing:
    """registry.tracing() is true inside: the code runs only while mx.compile traces it."""

    def __enter__(self):
        registry._tracing = True

    def __exit__(self, *exc):
        registry._tracing = False


# Experimental (off unless TORCH_MLX_PIPELINE=1): evaluate a parted graph asynchronously after
# each uncompiled step (an attention layer), so the device starts on the first layers while the
# rest of the step is still being recorded.
_PIPELINE = os.environ.get("TORCH_MLX_PIPELINE") == "1"
# TORCH_MLX_COMPILE_PATTERNS=0 lowers graphs as traced, op by op (compile_patterns: A/B checks)
_PATTERNS = os.environ.get("TORCH_MLX_COMPILE_PATTERNS", "1") != "0"


def _constant_array(t: torch.Tensor) -> mx.array:
    if t.device.type == "mlx":
        return _C.to_mlx(t)
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: through float32, exactly
        return mx.array(t.detach().float().numpy()).astype(mx.bfloat16)
    return mx.array(t.detach().numpy())


class MlxGraph(torch.nn.Module):
    """A graph whose every node has a lowering, run as MLX: one ``mx.compile``d function, or,
    where some lowerings must run outside mx.compile (``compiled=False``), compiled segments and
    those calls in one lazy MLX graph that is evaluated once.

    Input mutations (``copy_(input, value)``, AOTAutograd's form of an in-place op on an input
    of an inference graph) write into the input's storage: ``copy_(x, index_copy(x, d, i, src))``
    (transformers' static KV cache: ``keys.index_copy_(2, cache_position, k)``) as a scatter of
    ``src`` into x's own buffer, O(rows written), inside the step's one evaluation; any other
    value is written after the graph, as torch's copy_ (what AOTAutograd's epilogue would do)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.graph_module = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.steps = []
        # tensor constants the trace lifted into the module (e.g. the -inf scalar torch's
        # attention makes of a boolean mask): MLX arrays once, fed to every run
        self.constants = {}
        # input mutations: (placeholder index, value node) written after the graph, and the
        # placeholders written in place (their index_copy is a scatter into the input's buffer)
        self.write_backs: list[tuple[int, fx.Node]] = []
        self.in_place: dict[int, fx.Node] = {}  # placeholder index -> its index_copy node
        writes = {n.args[1]: n.args[0] for n in gm.graph.nodes if _input_write(n)}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and isinstance(getattr(gm, node.target, None),
                                                    torch.Tensor):
                self.constants[node] = _constant_array(getattr(gm, node.target))
            elif _is_size_node(node):
                self.steps.append(node)  # getitem of a multi-output node, or size arithmetic
            elif _input_write(node):
                index = self.placeholders.index(node.args[0])
                if index not in self.in_place:  # else its index_copy wrote it already
                    self.write_backs.append((index, node.args[1]))
            elif node.op == "call_function":
                step = _Step(node, _node_lowering(node))
                if self._writes_in_place(node, writes.get(node)):
                    # index_copy's lowering is one scatter onto x: in x's buffer when forward
                    # lends it, out of place when x is a view of an input that could not lend
                    self.in_place[self.placeholders.index(node.args[0])] = node
                self.steps.append(step)
            elif node.op in ("call_module", "call_method", "get_attr"):
                raise NotImplementedError(f"torch_mlx.compile: unexpected {node.op} node {node}")
        # an output that is a written input (copy_ returns its destination) is the value written
        outputs = fx.node.map_arg(self._graph_outputs(),
                                  lambda n: n.args[1] if _input_write(n) else n)
        # the in-place writes are results too: forward takes each lent buffer back from its write
        self.results = [*outputs, *(v for _, v in self.write_backs), *self.in_place.values()]
        if all(isinstance(s, fx.Node) or s.compiled for s in self.steps):
            self.parts = None
            self.compiled = mx.compile(self.run)
        else:
            self.parts = _split(self.steps, self.results)

    def _graph_outputs(self) -> list:
        outs = self.output.args[0]
        return list(outs) if isinstance(outs, (list, tuple)) else [outs]

    def _writes_in_place(self, node: fx.Node, written) -> bool:
        """index_copy(x, ...) whose result is written back into the input x, x used by nothing
        else: computed as a scatter into x's buffer."""
        if node.target is not _INDEX_COPY or written is None or node.args[0] is not written:
            return False
        return all(u is node or _input_write(u) for u in written.users)

    def run(self, *inputs):
        with _Tracing():
            env = {**self.constants, **dict(zip(self.placeholders, inputs))}
            for step in self.steps:
                _execute(step, env)
            return _value(self.results, env)

    def run_parts(self, *inputs):
        env = {**self.constants, **dict(zip(self.placeholders, inputs))}
        for part in self.parts:
            part(env)
            if _PIPELINE and isinstance(part, _Uncompiled):
                # start what is recorded so far: the device runs it while Python records the rest
                values = [v for v in _flatten(env.get(part.step.node)) if isinstance(v, mx.array)]
                if values:
                    mx.async_eval(values)
        return _outer_value(self.results, env)

    def forward(self, *inputs):
        precision.ensure()  # fixes MLX's float32 GEMM mode before any trace (no eval inside)
        # inputs as MLX values (csrc/module.cpp graph_inputs): a tensor on "mlx" viewed as an
        # mx.array; one written in place (index_copy) lends its buffer to the graph's scatter,
        # which MLX then computes in it (it is not viewed: a view would share the buffer and
        # forbid the loan; a buffer that cannot lend is viewed, the scatter computed out of
        # place and copied in after the graph); a CPU scalar (made outside the graph:
        # _makes_tensor_off_mlx) combines with "mlx" tensors as in eager torch
        mx_inputs, buffers, loans = _C.graph_inputs(inputs, self.in_place, _constant_array)
        try:
            if self.parts is not None:
                outs = self.run_parts(*mx_inputs)
            # Off the main thread (e.g. backward on torch's autograd thread) the same graph runs
            # as uncompiled MLX ops: see registry.compile_allowed.
            elif registry.compile_allowed():
                outs = self.compiled(*mx_inputs)
            else:
                outs = self.run(*mx_inputs)
        except BaseException:
            for i in loans:  # nothing was launched: the storages keep their buffers
                _C.finish_lend(inputs[i], mx_inputs[i])
            raise
        # the scatters must be the lent arrays' only holders when MLX launches them, for it to
        # compute them in the lent buffers
        del mx_inputs
        # launched, not waited for: each output's storage waits (TORCH_MLX_ASYNC=0, the CPU
        # backend's default) or keeps the running array until the host needs its bytes, so
        # the eager ops after a forward (vLLM's logits and sampling) queue behind it
        mx.async_eval([o for o in outs if isinstance(o, mx.array)])
        n = len(outs) - len(self.write_backs) - len(self.in_place)
        written = [i for i, _ in self.write_backs]
        if written:
            # an input mutation takes the value's buffer (MLX's idiom: state is rebound, not
            # written) where it can: writing the old buffer would wait for the graph just
            # launched, which reads it. A value that is also returned is copied (two tensors)
            returned = {_C.buffer_address(o) for o in outs[:n] if isinstance(o, mx.array)}
            for i, value in zip(written, outs[n:]):
                fresh = self._to_torch(value, buffers)
                if not isinstance(value, mx.array) or _C.buffer_address(value) in returned \
                        or not _C.adopt_storage(inputs[i], fresh):
                    inputs[i].copy_(fresh)
                else:  # modified in place as far as autograd knows, as copy_ would record
                    torch.autograd.graph.increment_version(inputs[i])
        for i, value in zip(self.in_place, outs[n + len(written):]):
            if i in loans:
                _C.finish_lend(inputs[i], value)
            elif inputs[i].numel():  # computed out of place
                inputs[i].copy_(self._to_torch(value, buffers))
        return [self._to_torch(o, buffers) for o in outs[:n]]

    @staticmethod
    def _to_torch(out, input_buffers):
        if not isinstance(out, mx.array):
            return out
        # MLX shares buffers between an op's input and output where it can (reshape, copy of a
        # contiguous array); torch treats graph outputs that are not declared aliases as fresh,
        # so wrap_result copies those.
        return _C.wrap_result(out, None, None, input_buffers, "<graph output>")


# A graph with uncompiled lowerings runs as parts: runs of compiled steps become _Segments (one
# mx.compile each) and every uncompiled step is a part of its own. Size arithmetic and getitem
# (pure Python on shapes and tuples) are not parts: each part computes the ones it needs, inside
# a segment's trace where they depend on the segment's own values, otherwise outside.

def _outer_value(a, env):
    """A value for code outside the segments: size nodes are computed on demand into env."""
    if isinstance(a, fx.Node):
        if a not in env:
            for arg in a.all_input_nodes:
                _outer_value(arg, env)
            _execute(a, env)
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_outer_value(x, env) for x in a)
    return a


def _is_size_node(n: fx.Node) -> bool:
    return n.op == "call_function" and _size_op(n.target) is not None


def _leaves(nodes) -> set:
    """The non-size nodes that computing ``nodes`` outside a segment needs."""
    found, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if _is_size_node(n):
            stack.extend(n.all_input_nodes)
        else:
            found.add(n)
    return found


class _Uncompiled:
    """One ``compiled=False`` lowering, called on the lazy values of the graph."""

    def __init__(self, step: _Step):
        self.step = step
        self.needs = _leaves(step.node.all_input_nodes)

    def __call__(self, env):
        for n in self.step.node.all_input_nodes:
            _outer_value(n, env)
        _execute(self.step, env)


class _Segment:
    """Consecutive compiled steps as one ``mx.compile``d function of the values it needs."""

    def __init__(self, steps: list, position: dict):
        defined = {s.node for s in steps}
        # size nodes the steps need that depend on the segment's own values are traced inside
        inside, seen = set(), set()

        def visit(n):
            if n in seen or n in defined or not _is_size_node(n):
                return
            seen.add(n)
            for arg in n.all_input_nodes:
                visit(arg)
            if any(a in defined or a in inside for a in n.all_input_nodes):
                inside.add(n)

        for s in steps:
            for n in s.node.all_input_nodes:
                visit(n)
        # graph order is a topological order for steps and size nodes alike
        self.order = sorted([*steps, *inside], key=lambda s: position[_step_node(s)])
        used = dict.fromkeys(a for s in self.order for a in _step_node(s).all_input_nodes)
        self.inputs = [n for n in used if n not in defined and n not in inside]
        self.steps = steps
        self.defined = defined
        self.outputs: list[fx.Node] = []  # set by _split once the later parts are known
        self.fn = mx.compile(self._trace)

    def _trace(self, *values):
        with _Tracing():
            env = dict(zip(self.inputs, values))
            for step in self.order:
                _execute(step, env)
            return [leaf for n in self.outputs for leaf in _flatten(env[n])]

    def __call__(self, env):
        values = [_outer_value(n, env) for n in self.inputs]
        flat = (self.fn if registry.compile_allowed() else self._trace)(*values)
        it = iter(flat)
        for n in self.outputs:
            env[n] = _unflatten(n.meta.get("val"), it)


def _flatten(value):
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _flatten(v)]
    return [] if value is None else [value]


def _unflatten(meta, it):
    if isinstance(meta, (list, tuple)):
        return type(meta)(_unflatten(m, it) for m in meta)
    return None if meta is None else next(it)


def _step_node(step) -> fx.Node:
    return step if isinstance(step, fx.Node) else step.node


def _split(steps, results: list) -> list:
    position = {_step_node(s): i for i, s in enumerate(steps)}
    parts, run = [], []
    for step in steps:
        if isinstance(step, fx.Node):
            continue  # size arithmetic: computed where needed
        if step.compiled:
            run.append(step)
            continue
        if run:
            parts.append(_Segment(run, position))
            run = []
        parts.append(_Uncompiled(step))
    if run:
        parts.append(_Segment(run, position))
    # what each part needs from the earlier ones decides what a segment returns
    needs_after: set = _leaves(_nodes_in(results))
    for part in reversed(parts):
        if isinstance(part, _Segment):
            part.outputs = [s.node for s in part.steps if s.node in needs_after]
            for n in part.outputs:
                if not _returns_arrays(n.meta.get("val")):
                    raise NotImplementedError(
                        f"torch_mlx.compile: {n} leaves a compiled segment as a non-tensor "
                        f"value ({type(n.meta.get('val')).__name__})")
            needs_after = (needs_after - part.defined) | _leaves(part.inputs)
        else:
            needs_after = (needs_after - {part.step.node}) | part.needs
    return parts


def _nodes_in(value) -> list:
    found = []
    fx.node.map_arg(value, found.append)
    return found


def _returns_arrays(meta) -> bool:
    if isinstance(meta, (list, tuple)):
        return all(_returns_arrays(m) for m in meta)
    return meta is None or isinstance(meta, torch.Tensor)


def compile_fx_graph(gm: fx.GraphModule, example_inputs=None):
    """Lower an aten-level FX graph: one MLX function if every node has a lowering, otherwise
    MLX functions for the supported partitions with the rest left to eager dispatch."""
    if _PATTERNS:
        compile_patterns.rewrite(gm)  # written-out RMSNorm, rotary, repeated KV: fewer kernels
    support = _Supported()
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    if all(support.is_node_supported({}, n) for n in calls):  # the common case: one function
        return make_boxed_func(MlxGraph(gm))
    partitioner = CapabilityBasedPartitioner(gm, support, allows_single_node_partition=True)
    fused = partitioner.fuse_partitions(partitioner.propose_partitions())
    for name, sub in list(fused.named_children()):
        if name.startswith("fused_"):
            setattr(fused, name, _TupleOut(MlxGraph(sub)))
    return make_boxed_func(fused)


class _TupleOut(torch.nn.Module):
    """Fused partitions return a tuple when they have several outputs, the value when one."""

    def __init__(self, graph: MlxGraph):
        super().__init__()
        self.graph = graph
        out = graph.output.args[0]
        self.single = not isinstance(out, (list, tuple))

    def forward(self, *inputs):
        outs = self.graph(*inputs)
        return outs[0] if self.single else tuple(outs)


def _decompositions():
    """torch's core-aten decompositions, except for ops the table lowers directly."""
    from torch._decomp import core_aten_decompositions

    table = core_aten_decompositions()
    return {op: fn for op, fn in table.items()
            if not (isinstance(op, torch._ops.OpOverload) and _lowering_of(op) is not None)}


def _with_tuple_output(gm: fx.GraphModule, example_inputs):
    """AOTAutograd takes graphs that return a tuple. Dynamo's do; a graph handed over by other
    means may not (vLLM's on torch 2.11 returned a bare tensor): compile it returning the
    flattened outputs, and rebuild the original structure around each call."""
    def plain(value):  # fx keeps a graph's structures immutable; its code returns plain ones
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat, spec = pytree.tree_flatten(plain(output.args[0]))
    output.args = (tuple(flat),)
    gm.recompile()
    compiled = mlx_backend(gm, example_inputs)

    def call(*args):
        return pytree.tree_unflatten(list(compiled(*args)), spec)
    return call


# torch.compile's modes tune inductor; an MLX graph is one mx.compile function either way (and
# MLX's CUDA backend already launches its kernels as CUDA graphs, what "reduce-overhead" asks
# for). Accepted, so code written for inductor (transformers' CompileConfig defaults to
# "reduce-overhead") runs unchanged; any other mode is an error, as in inductor.
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def mlx_backend(gm: fx.GraphModule, example_inputs, mode=None, options=None):
    """The ``torch.compile(backend="mlx")`` entry point."""
    if mode not in _MODES:
        raise RuntimeError(f"Unrecognized mode={mode}, should be one of: "
                           f"{', '.join(m for m in _MODES if m)}")
    if options:
        raise RuntimeError(f"torch.compile(backend='mlx') takes no options (inductor's config "
                           f"keys); got {sorted(options)}")
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if not isinstance(output.args[0], (tuple, list)):
        return _with_tuple_output(gm, example_inputs)
    # AOTAutograd's on-disk cache stores inductor output code only; MLX graphs are rebuilt.
    # Ops that mutate arguments become auto_functionalized(op, **kwargs) (v1: mutated arguments
    # are passed as they are; v2 passes their bases and view metadata). An inference graph
    # keeps its input mutations as trailing copy_(input, value) nodes, which MlxGraph writes
    # in place (a KV cache's index_copy_ as a scatter into its buffer) instead of AOTAutograd
    # copying each mutated input whole after the graph.
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(enable_auto_functionalized_v2=False):
        return aot_autograd(fw_compiler=compile_fx_graph, bw_compiler=compile_fx_graph,
                            decompositions=_decompositions(),
                            keep_inference_input_mutations=True)(gm, example_inputs)


# Also reachable lazily through the `torch_dynamo_backends` entry point (setup.py), so
# torch.compile(backend="mlx") works without importing this module.
if "mlx" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(mlx_backend, name="mlx")
