"""torch.compile(backend="mlx"): compiled results equal eager results on "mlx"."""
import mlx.core as mx
import pytest
import torch

import torch_mlx.compile  # noqa: F401  (also reachable through the entry point)
from torch_mlx.ops.registry import lowering


def _same(compiled, eager):
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c.cpu(), e.cpu())


def test_backend_is_registered():
    assert "mlx" in torch._dynamo.list_backends(exclude_tags=())


def test_elementwise_and_views_with_changing_shapes():
    def f(x, y):
        z = torch.exp(x) * y + 1
        return (z.t() - x.t()).reshape(-1), torch.sin(z)

    g = torch.compile(f, backend="mlx")
    for n in (4, 6, 7):  # the later sizes go through dynamo's dynamic shapes
        x, y = torch.randn(n, 5).to("mlx"), torch.randn(n, 5).to("mlx")
        _same(g(x, y), f(x, y))


def test_inductor_modes_are_accepted_and_others_refused():
    f = torch.compile(lambda x: x * 2 + 1, backend="mlx", mode="reduce-overhead")
    x = torch.randn(3).to("mlx")
    torch.testing.assert_close(f(x).cpu(), x.cpu() * 2 + 1)
    with pytest.raises(Exception, match="Unrecognized mode=fastest"):
        torch.compile(lambda x: x + 1, backend="mlx", mode="fastest")(x)
    with pytest.raises(Exception, match="takes no options"):
        torch.compile(lambda x: x + 1, backend="mlx", options={"max_autotune": True})(x)


def test_graph_returning_a_bare_tensor_or_a_dict():
    # dynamo's graphs return tuples; graphs handed over by other callers (vLLM's piecewise
    # backend) may return one tensor or another pytree, which AOTAutograd refuses as it is
    from torch_mlx.compile import mlx_backend

    def one(x):
        return torch.exp(x) + 1

    def nested(x):
        return {"a": x * 2, "b": [torch.sin(x), x.sum()]}

    x = torch.randn(3, 4).to("mlx")
    for f in (one, nested):
        expected = torch.fx.symbolic_trace(f)(x)  # the structure the graph itself returns
        out = mlx_backend(torch.fx.symbolic_trace(f), [x])(x)
        assert type(out) is type(expected)
        torch.testing.assert_close(torch.utils._pytree.tree_map(lambda t: t.cpu(), out),
                                   torch.utils._pytree.tree_map(lambda t: t.cpu(), expected))


def test_outputs_never_share_an_input_buffer():
    # MLX may return an input's own buffer for clone / a no-op reshape; torch callers own
    # these outputs and may write to them.
    def f(x):
        return x.clone(), x.reshape(-1) * 1

    x = torch.randn(3, 4).to("mlx")
    before = x.cpu().clone()
    a, b = torch.compile(f, backend="mlx")(x)
    a.add_(1)
    b.add_(1)
    torch.testing.assert_close(x.cpu(), before)
    torch.testing.assert_close(a.cpu(), before + 1)


def test_mlp_forward_and_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    model.to("mlx")
    x = torch.randn(5, 8).to("mlx")
    compiled = torch.compile(model, backend="mlx")
    _same([compiled(x)], [model(x)])
    compiled(x).square().sum().backward()
    grads = [p.grad.cpu().clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    _same(grads, [p.grad for p in model.parameters()])


def test_llama_block_matches_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval().to("mlx")
    ids = torch.randint(0, 128, (2, 9)).to("mlx")
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="mlx")(ids).logits
    torch.testing.assert_close(compiled.cpu(), eager.cpu())


def test_backward_on_the_autograd_thread_exits_cleanly():
    # Backward runs on torch's autograd device thread, which outlives the interpreter. MLX
    # compiled functions used there would leave a per-thread compile cache that crashes the
    # process at exit (registry.compile_allowed), so there the same graphs run uncompiled.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, torch_mlx.compile
        x = torch.randn(64, requires_grad=True)
        xm = x.detach().to("mlx").requires_grad_()
        torch.logsumexp(xm, 0).backward()  # its backward calls exp: eager, on that thread
        f = torch.compile(lambda t: (torch.exp(t) * t).sum(), backend="mlx")
        ym = xm.detach().requires_grad_()
        f(ym).backward()  # the compiled backward graph, on that thread
        y = x.detach().requires_grad_()
        (torch.exp(y) * y).sum().backward()
        torch.testing.assert_close(xm.grad.cpu(), torch.softmax(x.detach(), 0))
        torch.testing.assert_close(ym.grad.cpu(), y.grad)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# An op that mutates an argument and whose lowering must run outside mx.compile (as vLLM's
# attention does: it reads per-call state). It reaches the graph as auto_functionalized.
_LIB = torch.library.Library("torch_mlx_test", "DEF")
_LIB.define("scale_into(Tensor x, Tensor(a!) out, float k) -> ()")


@torch.library.impl(_LIB, "scale_into", "CompositeExplicitAutograd")
def _scale_into_reference(x, out, k):
    out.copy_(x * k)


torch.library.register_fake("torch_mlx_test::scale_into", lambda x, out, k: None, lib=_LIB)
_UNCOMPILED_CALLS = []


@lowering("torch_mlx_test::scale_into", eager=False, compiled=False)
def _scale_into(x, out, k):
    _UNCOMPILED_CALLS.append(type(x))  # lazy mx.arrays, not tracers of mx.compile
    return None, x * k  # the op's result, then the new value of `out`


@pytest.mark.parametrize("pipeline", [False, True], ids=["one_eval", "pipelined"])
def test_uncompiled_lowering_runs_between_compiled_segments_in_one_graph(pipeline, monkeypatch):
    # pipelined: TORCH_MLX_PIPELINE=1, the graph evaluated asynchronously after each uncompiled
    # step; the result must not change
    from torch_mlx import compile as mlx_compile

    monkeypatch.setattr(mlx_compile, "_PIPELINE", pipeline)

    def f(a, b):
        h = torch.relu(a @ b) + 1
        out = torch.empty_like(h)
        torch.ops.torch_mlx_test.scale_into(h, out, 3.0)
        rows = out.shape[0]
        return (out.view(rows, -1) * 2).sum(0), h.shape[0] + 1

    compiled = torch.compile(f, backend="mlx", dynamic=True)
    for rows in (5, 7, 5):
        a, b = torch.randn(rows, 4), torch.randn(4, 3)
        expected = f(a, b)
        calls = len(_UNCOMPILED_CALLS)
        got = compiled(a.to("mlx"), b.to("mlx"))
        assert len(_UNCOMPILED_CALLS) == calls + 1  # called on every run, not traced once
        torch.testing.assert_close(got[0].cpu(), expected[0])
        assert got[1] == expected[1]
    assert _UNCOMPILED_CALLS[-1] is mx.array


def _record_graph_nodes(monkeypatch):
    """compile_fx_graph spied on: the call_function targets of every graph the backend gets,
    and those it cannot lower (each splits the graph into MLX partitions and eager ops)."""
    from torch_mlx import compile as mlx_compile

    calls, unsupported = [], []
    original = mlx_compile.compile_fx_graph

    def spy(gm, example_inputs):
        support = mlx_compile._Supported()
        for n in gm.graph.nodes:
            if n.op == "call_function":
                calls.append(str(n.target))
                if not support.is_node_supported({}, n):
                    unsupported.append(str(n.target))
        return original(gm, example_inputs)

    monkeypatch.setattr(mlx_compile, "compile_fx_graph", spy)
    return calls, unsupported


def test_assignment_into_a_slice_is_lowered(monkeypatch):
    """``q[..., n:] = rope(q[..., n:])`` (DeepSeek's MLA attention) reaches the graph as
    aten.copy + aten.slice_scatter: both lowered, so the graph stays one MLX function."""
    def f(q, pe, every_other):
        q = q * 2
        q[..., 4:] = q[..., 4:] * pe
        q[:, ::2] = every_other
        return q + 1

    _, unsupported = _record_graph_nodes(monkeypatch)
    torch._dynamo.reset()
    g = torch.compile(f, backend="mlx")
    for n in (3, 5, 1):
        q, pe = torch.randn(n, 4, 12), torch.randn(n, 4, 8)
        every_other = torch.randn(n, 2, 12)
        expected = f(q.clone(), pe, every_other)
        got = g(q.to("mlx"), pe.to("mlx"), every_other.to("mlx"))
        torch.testing.assert_close(got.cpu(), expected)
    assert unsupported == []


def test_where_with_numbers_stays_one_graph(monkeypatch):
    """``where(mask, 0.0, -inf)`` (transformers' sdpa mask, twice a layer) decomposes into
    aten.scalar_tensor, lowered for graphs: no split around eager scalars every call."""
    def f(x, mask):
        bias = torch.where(mask, 0.0, float("-inf")).to(x.dtype)
        return torch.softmax(x + bias, -1), torch.where(mask, x, -1.5)

    calls, unsupported = _record_graph_nodes(monkeypatch)
    torch._dynamo.reset()
    g = torch.compile(f, backend="mlx")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 8, dtype=dtype)
        mask = torch.rand(3, 8) > 0.3
        mask[:, 0] = True
        got = g(x.to("mlx"), mask.to("mlx"))
        for a, b in zip(got, f(x, mask)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.cpu(), b)
    assert "aten.scalar_tensor.default" in calls  # the decomposition this test is about
    assert unsupported == []


def test_tensors_made_for_the_cpu_stay_on_the_cpu():
    """A factory for another device inside a graph (``torch.tensor(2.5)`` is a CPU scalar) runs
    as torch runs it; the CPU scalar still combines with "mlx" tensors in the MLX graph."""
    def f(x):
        s = torch.ops.aten.scalar_tensor.default(2.5)
        return x * s, s, torch.ops.aten.scalar_tensor.default(3.0, device=x.device)

    torch._dynamo.reset()
    got = torch.compile(f, backend="mlx")(torch.arange(3.0, device="mlx"))
    assert [o.device.type for o in got] == ["mlx", "cpu", "mlx"]
    torch.testing.assert_close(got[0].cpu(), torch.tensor([0.0, 2.5, 5.0]))
    assert got[1].item() == 2.5 and got[2].item() == 3.0


class _ScatterSpy:
    """torch_mlx._C with the loans of input buffers to a graph's in-place write counted: lent
    (each taken back, in place, by finish_lend) or refused (None)."""

    def __init__(self, c):
        self._c, self.lent, self.refused, self.finished = c, 0, 0, 0

    def __getattr__(self, name):
        return getattr(self._c, name)

    def graph_inputs(self, inputs, lend, cpu_scalar):
        values, buffers, loans = self._c.graph_inputs(inputs, lend, cpu_scalar)
        self.lent += len(loans)
        self.refused += sum(1 for i in lend if inputs[i].numel() and i not in loans)
        return values, buffers, loans

    def finish_lend(self, *args):
        self._c.finish_lend(*args)  # raises if the write was not made in the lent buffer
        self.finished += 1


def test_input_mutations_are_written_into_the_inputs(monkeypatch):
    # transformers' static KV cache: keys.index_copy_(2, positions, k) on a graph input, then
    # attention over the whole cache. Under no_grad AOTAutograd keeps the mutation in the graph;
    # the index_copy becomes a scatter into the cache's own buffer (O(rows written)), a counter
    # incremented in place is written after the graph as torch's copy_ would
    spy = _ScatterSpy(torch_mlx.compile._C)
    monkeypatch.setattr(torch_mlx.compile, "_C", spy)

    def step(cache, counter, positions, new):
        cache.index_copy_(2, positions, new)
        counter.add_(positions.numel())
        return (cache * 2).sum(dim=-1)

    g = torch.compile(step, backend="mlx")
    torch.manual_seed(0)
    cache_cpu, counter_cpu = torch.zeros(1, 2, 16, 8), torch.zeros((), dtype=torch.long)
    cache, counter = cache_cpu.to("mlx"), counter_cpu.to("mlx")
    address = cache.data_ptr()
    with torch.no_grad():
        for start, n in ((0, 5), (5, 1), (6, 1), (7, 3)):
            positions = torch.arange(start, start + n)
            new = torch.randn(1, 2, n, 8)
            expected = step(cache_cpu, counter_cpu, positions, new)
            out = g(cache, counter, positions.to("mlx"), new.to("mlx"))
            torch.testing.assert_close(out.cpu(), expected)
            torch.testing.assert_close(cache.cpu(), cache_cpu)
            assert counter.item() == counter_cpu.item()
    assert cache.data_ptr() == address
    assert spy.lent == spy.finished == 4 and spy.refused == 0

    # a graph that returns the mutated input itself
    def step_returning_cache(cache, positions, new):
        cache.index_copy_(2, positions, new)
        return cache, cache.sum()

    h = torch.compile(step_returning_cache, backend="mlx")
    with torch.no_grad():
        positions, new = torch.arange(10, 12), torch.randn(1, 2, 2, 8)
        expected = step_returning_cache(cache_cpu, positions, new)
        out = h(cache, positions.to("mlx"), new.to("mlx"))
    torch.testing.assert_close(out[0].cpu(), expected[0])
    torch.testing.assert_close(out[1].cpu(), expected[1])
    torch.testing.assert_close(cache.cpu(), cache_cpu)

    # a cache that cannot lend its buffer (a view into a larger storage): the same values,
    # written after the graph
    base = torch.zeros(2, 2, 16, 8).to("mlx")
    view, view_cpu = base[1:], torch.zeros(1, 2, 16, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        positions, new = torch.arange(3, 6), torch.randn(1, 2, 3, 8)
        expected = step(view_cpu, counter_cpu.clone(), positions, new)
        out = g(view, counter.clone(), positions.to("mlx"), new.to("mlx"))
    torch.testing.assert_close(out.cpu(), expected)
    torch.testing.assert_close(view.cpu(), view_cpu)
    assert not base[0].cpu().any()
    assert spy.refused == 1


def test_input_mutations_rebind_the_storage_to_the_value():
    # an input written by a graph (not in place: counter.add_, fill_, a copy) takes the value's
    # buffer instead of waiting for the graph to write the old one (csrc/bridge.h
    # adopt_storage): views of it follow, the values are torch's; a value the graph also
    # returns, a from_mlx storage and a view into a larger storage are written as copies
    import mlx.core as mx
    from torch_mlx import _C

    def step(counter, flags, x):
        counter.add_(x.shape[0])
        flags.fill_(True)
        return x * counter

    g = torch.compile(step, backend="mlx")
    counter, flags = torch.zeros((), dtype=torch.long).to("mlx"), torch.zeros(3, dtype=torch.bool)
    flags = flags.to("mlx")
    view = counter.view(1)
    addresses, version = [counter.data_ptr()], counter._version
    _C.device_write_count(True)
    with torch.no_grad():
        for n in (1, 2, 3):
            out = g(counter, flags, torch.ones(n, device="mlx"))
            addresses.append(counter.data_ptr())
    assert counter.item() == 6 and view.item() == 6 and flags.cpu().all()
    torch.testing.assert_close(out.cpu(), torch.full((3,), 6.0))
    # rebound at each call (MLX's allocator may hand an address out again later)
    assert all(a != b for a, b in zip(addresses, addresses[1:]))
    assert view.data_ptr() == counter.data_ptr() and counter._version >= version + 3
    assert _C.device_write_count(True) == 0  # no copy into the old buffers
    with torch.no_grad():  # the old buffers are freed: memory stays flat over many steps
        for i in range(400):
            g(counter, flags, torch.ones(1, device="mlx"))
            if i == 50:
                torch.mlx.synchronize()
                memory = mx.get_active_memory()
    torch.mlx.synchronize()
    assert mx.get_active_memory() <= memory and counter.item() == 406

    def returns_it(c):
        c.add_(1)
        return c
    h = torch.compile(returns_it, backend="mlx")
    with torch.no_grad():
        r = h(counter)
    r.add_(10)  # the returned tensor is counter itself (AOTAutograd's alias): both see it
    assert counter.item() == 417 and r.item() == 417

    held = mx.zeros((4,)) + 1
    shared = torch_mlx.from_mlx(held)  # its buffer is the user's array's: written, not rebound
    base = torch.zeros(8).to("mlx")  # a view into a larger storage: written, not rebound
    k = torch.compile(lambda a, b: (a.mul_(3), b.add_(2)), backend="mlx")
    with torch.no_grad():
        k(shared, base[2:6])
    assert held.tolist() == [3.0] * 4 and shared.cpu().tolist() == [3.0] * 4
    assert base.cpu().tolist() == [0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]


def test_attention_under_dynamic_shapes():
    # torch asks the device which attention backend to use with fake tensors whose sizes are
    # symbolic (dynamic=True, or dynamo's automatic dynamic shapes once a length changes: a
    # growing KV cache); the answer must come from symbolic sizes, not fail on them
    import torch.nn.functional as F

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    g = torch.compile(attend, backend="mlx", dynamic=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for length in (5, 9, 12):
            q = torch.randn(1, 4, 1, 16)
            k, v = torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16)
            mask = torch.rand(1, 1, 1, length) > 0.3
            mask[..., 0] = True
            got = g(*(t.to("mlx") for t in (q, k, v, mask)))
            torch.testing.assert_close(got.cpu(), attend(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_a_graph_that_fails_gives_its_loans_back(monkeypatch):
    """An input lent to the graph's in-place write keeps its buffer and values when the graph
    raises before anything is launched."""
    def step(cache, positions, new):
        cache.index_copy_(2, positions, new)
        return cache.sum(dim=-1)

    cache = torch.arange(32.0).reshape(1, 2, 4, 4).to("mlx")
    g = torch.compile(step, backend="mlx")
    with torch.no_grad():
        g(cache, torch.tensor([0]).to("mlx"), torch.zeros(1, 2, 1, 4).to("mlx"))  # compiled
    expected = cache.cpu()

    def failing_scatter(*args):
        raise RuntimeError("scatter failed")

    spy = _ScatterSpy(torch_mlx.compile._C)
    monkeypatch.setattr(torch_mlx.compile, "_C", spy)
    failing = _ScatterSpy(torch_mlx.ops.indexing._C)  # index_copy's lowering: the scatter
    failing.scatter = failing_scatter
    monkeypatch.setattr(torch_mlx.ops.indexing, "_C", failing)
    monkeypatch.setattr(torch_mlx.compile.registry, "compile_allowed", lambda: False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="scatter failed"):
        g(cache, torch.tensor([1]).to("mlx"), torch.ones(1, 2, 1, 4).to("mlx"))
    assert spy.lent == 1
    torch.testing.assert_close(cache.cpu(), expected)
    cache.add_(1)  # the storage holds its buffer again
    torch.testing.assert_close(cache.cpu(), expected + 1)
