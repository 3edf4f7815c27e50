"""vLLM's FusedMoE on "mlx": the routing and expert ops against torch references, the routing
each vLLM router computes, and a compiled forward holding the MoE ops.

Greedy generation of the tiny Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints against transformers
is in test_generation.py (their architectures are in tools/make_tiny_model.py), and the
MLX-quantized Mixtral against mlx-lm in test_quantized.py.
"""
import gc
import types

import mlx.core as mx
import pytest
import torch
import torch.nn.functional as F
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.fused_moe.router import cpu_router
from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

import torch_mlx
from vllm_metal.ops.moe import (
    SORT_FROM_PAIRS,
    Routing,
    moe_experts_op,
    moe_route_op,
    quantized_moe_experts_op,
)


@pytest.fixture(autouse=True)
def vllm_config():
    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.fixture(params=["torch_mlx", "mlx"])
def kernels(request, monkeypatch):
    """The experts' products on MLX's CPU backend: torch_mlx's grouped kernels (the default),
    or MLX's gather_mm / gather_qmm (what the GPU runs)."""
    import vllm_metal.ops.moe as moe

    monkeypatch.setattr(moe, "CPU_KERNELS", request.param == "torch_mlx")
    return request.param


# ---- torch references: vLLM's semantics written out


def reference_route(logits, top_k, renormalize):
    """vLLM's fused_topk (topk_softmax): softmax in float32, top-k, optionally renormalized."""
    scores = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def reference_experts(x, weights, ids, w13, w2, w13_bias=None, w2_bias=None, act="silu"):
    """sum_j weights[t, j] * w2[e] @ act(w13[e] @ x[t]), e = ids[t, j], one pair at a time."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    activate = {"silu": F.silu, "gelu": F.gelu}[act]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].float() @ x[t].float()
            if w13_bias is not None:
                h = h + w13_bias[e].float()
            d = h.shape[0] // 2
            y = w2[e].float() @ (activate(h[:d]) * h[d:])
            if w2_bias is not None:
                y = y + w2_bias[e].float()
            out[t] += weights[t, j].float() * y
    return out.to(x.dtype)


def by_expert(weights, ids):
    """Rows of (ids, weights) in expert order: the ops return the top-k unordered."""
    ids = ids.cpu().long()
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.cpu().gather(1, order)


def mlx(t):
    return t.to("mlx")


def random_experts(num_experts, hidden, inter, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    return w13, w2


# ---- routing


@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_softmax_topk(tokens, top_k, renormalize):
    logits = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(tokens)) * 2
    weights, ids = moe_route_op(mlx(logits), top_k, "softmax", renormalize, 1, 1, 1.0, None)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (tokens, top_k)
    want_weights, want_ids = reference_route(logits, top_k, renormalize)
    got_ids, got_weights = by_expert(weights, ids)
    want_ids, want_weights = by_expert(want_weights, want_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_weights, want_weights, rtol=1e-6, atol=1e-7)
    # vLLM's CPU router computes the same routing another way (top-k of the logits first)
    cpu_weights, cpu_ids = cpu_router._softmax_topk(logits, top_k, renormalize)
    torch.testing.assert_close(by_expert(cpu_weights, cpu_ids)[1], got_weights)


# (scoring, groups, kept groups, correction bias, routed scaling factor): DeepSeek-V2's grouped
# softmax, V3's grouped sigmoid with a correction bias, and ungrouped sigmoid with a bias
VARIANTS = [("softmax", 4, 2, False, 1.0), ("sigmoid", 4, 2, True, 2.5),
            ("sigmoid", 1, 1, True, 1.0), ("sigmoid", 8, 3, False, 1.0)]


@pytest.mark.parametrize("scoring,groups,kept,bias,scale", VARIANTS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_grouped_and_biased(scoring, groups, kept, bias, scale, renormalize):
    g = torch.Generator().manual_seed(groups * 10 + kept)
    logits = torch.randn(33, 32, generator=g)
    correction = torch.randn(32, generator=g) * 0.5 if bias else None
    weights, ids = moe_route_op(mlx(logits), 4, scoring, renormalize, groups, kept, scale,
                                None if correction is None else mlx(correction))
    # vLLM's torch implementation of grouped top-k (its CPU router's)
    want_weights, want_ids = cpu_router._grouped_topk(logits, 4, renormalize, groups, kept,
                                                      scoring, scale, correction)
    got_ids, got_weights = by_expert(weights, ids)
    want_ids, want_weights = by_expert(want_weights, want_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_weights, want_weights, rtol=1e-6, atol=1e-6)


def _runner(router, num_experts=32):
    return types.SimpleNamespace(router=router,
                                 moe_config=types.SimpleNamespace(num_experts=num_experts))


def test_routing_follows_the_router_vllm_built():
    make = lambda **kw: Routing.of(_runner(create_fused_moe_router(
        top_k=2, global_num_experts=32, **kw)), "layer")
    # a plain top-k router: vLLM drops routed_scaling_factor there, so must we
    plain = make(renormalize=False, routed_scaling_factor=2.0)
    assert (plain.scoring_func, plain.renormalize, plain.routed_scaling_factor,
            plain.num_expert_group) == ("softmax", False, 1.0, 1)
    grouped = make(use_grouped_topk=True, num_expert_group=4, topk_group=2,
                   scoring_func="sigmoid", routed_scaling_factor=2.5)
    assert (grouped.scoring_func, grouped.num_expert_group, grouped.topk_group,
            grouped.routed_scaling_factor) == ("sigmoid", 4, 2, 2.5)
    bias = torch.zeros(32)
    biased = make(scoring_func="sigmoid", e_score_correction_bias=bias)
    assert biased.correction_bias is bias and biased.num_expert_group == 1

    def custom(hidden_states, gating_output, topk, renormalize):
        return torch.topk(torch.sigmoid(gating_output.float()), topk, dim=-1)

    own = make(custom_routing_function=custom)
    assert own.custom_function is custom
    logits = torch.randn(3, 32)
    weights, ids = own(torch.zeros(3, 8), logits)
    assert ids.dtype == torch.int32 and torch.equal(ids, logits.topk(2, dim=-1).indices.int())


def test_unsupported_routing_says_which():
    zero = create_fused_moe_router(top_k=2, global_num_experts=32, zero_expert_type="identity",
                                   num_logical_experts=30,
                                   e_score_correction_bias=torch.zeros(32))
    with pytest.raises(NotImplementedError,
                       match="layer: routing by vLLM's ZeroExpertRouter is not supported on mlx"):
        Routing.of(_runner(zero), "layer")


# ---- experts


@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("renormalize", [True, False])
def test_experts_match_torch(tokens, top_k, renormalize, kernels):
    torch.manual_seed(tokens * 10 + top_k)
    w13, w2 = random_experts(8, 64, 32)
    x = torch.randn(tokens, 64)
    logits = torch.randn(tokens, 8) * 2
    weights, ids = moe_route_op(mlx(logits), top_k, "softmax", renormalize, 1, 1, 1.0, None)
    got = moe_experts_op(mlx(x), weights, ids, mlx(w13), mlx(w2), None, None, "silu", None,
                         False)
    assert got.shape == x.shape and got.dtype == x.dtype
    # whole path against the reference (routing included)
    want_weights, want_ids = reference_route(logits, top_k, renormalize)
    want = reference_experts(x, want_weights, want_ids, w13, w2)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_with_biases_and_gelu(tokens, dtype, kernels):
    torch.manual_seed(tokens)
    w13, w2 = random_experts(4, 64, 48, dtype)
    b13, b2 = torch.randn(4, 96).to(dtype), torch.randn(4, 64).to(dtype)
    x = torch.randn(tokens, 64).to(dtype)
    ids = torch.randint(0, 4, (tokens, 2), dtype=torch.int32)
    ids[:, 1] = (ids[:, 0] + 1) % 4  # two distinct experts per token
    weights = torch.rand(tokens, 2)
    got = moe_experts_op(mlx(x), mlx(weights), mlx(ids), mlx(w13), mlx(w2), mlx(b13), mlx(b2),
                         "gelu", None, False)
    want = reference_experts(x, weights, ids, w13, w2, b13, b2, act="gelu")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens", [1, 33])
def test_ungated_relu2_experts(tokens, kernels):
    # NemotronH's experts: w13 holds only the up projection (is_act_and_mul=False), relu^2
    torch.manual_seed(tokens)
    w13, w2 = random_experts(4, 64, 48)
    w13 = w13[:, :48].contiguous()
    x = torch.randn(tokens, 64)
    ids = torch.randint(0, 4, (tokens, 2), dtype=torch.int32)
    ids[:, 1] = (ids[:, 0] + 1) % 4
    weights = torch.rand(tokens, 2)
    got = moe_experts_op(mlx(x), mlx(weights), mlx(ids), mlx(w13), mlx(w2), None, None,
                         "relu2_no_mul", None, False)
    want = torch.zeros(tokens, 64)
    for t in range(tokens):
        for j in range(2):
            e = int(ids[t, j])
            want[t] += weights[t, j] * (w2[e] @ torch.relu(w13[e] @ x[t]) ** 2)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_sorted_and_direct_paths_agree(kernels):
    # the same pairs computed together (sorted by expert) and a token at a time
    torch.manual_seed(1)
    w13, w2 = random_experts(8, 64, 32)
    x = torch.randn(SORT_FROM_PAIRS // 2 + 1, 64)  # k=2: just past the threshold
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(x.shape[0])]).int()
    weights = torch.rand(x.shape[0], 2)
    args = (mlx(w13), mlx(w2), None, None, "silu", None, False)
    both = moe_experts_op(mlx(x), mlx(weights), mlx(ids), *args).cpu()
    one_by_one = torch.cat([moe_experts_op(mlx(x[i:i + 1]), mlx(weights[i:i + 1]),
                                           mlx(ids[i:i + 1]), *args).cpu()
                            for i in range(x.shape[0])])
    torch.testing.assert_close(both, one_by_one, rtol=1e-5, atol=1e-6)


def test_compiled_and_eager_share_the_lowering(kernels):
    torch.manual_seed(2)
    w13, w2 = mlx(random_experts(8, 64, 32)[0]), mlx(random_experts(8, 64, 32)[1])

    def moe(x, logits):
        weights, ids = moe_route_op(logits, 2, "softmax", True, 1, 1, 1.0, None)
        return moe_experts_op(x, weights, ids, w13, w2, None, None, "silu", None, False)

    compiled = torch.compile(moe, backend="mlx", dynamic=True)
    for tokens in (1, 5, 40):
        x, logits = mlx(torch.randn(tokens, 64)), mlx(torch.randn(tokens, 8))
        torch.testing.assert_close(compiled(x, logits).cpu(), moe(x, logits).cpu(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (3, 64), (6, 32)])
@pytest.mark.parametrize("tokens", [1, 33])
def test_quantized_experts_match_dequantized(bits, group_size, tokens, kernels):
    torch.manual_seed(bits + tokens)
    w13, w2 = random_experts(4, 128, 64)
    packed = {}
    for name, w in (("w13", w13), ("w2", w2)):
        q, scales, biases = mx.quantize(mx.array(w.numpy()), group_size=group_size, bits=bits)
        dense = mx.dequantize(q, scales, biases, group_size=group_size, bits=bits)
        packed[name] = [torch_mlx.from_mlx(a) for a in (q, scales, biases)]
        packed[name + "_dense"] = torch.from_numpy(__import__("numpy").array(dense))
    x = torch.randn(tokens, 128)
    logits = torch.randn(tokens, 4)
    weights, ids = moe_route_op(mlx(logits), 2, "softmax", True, 1, 1, 1.0, None)
    got = quantized_moe_experts_op(mlx(x), weights, ids, *packed["w13"], group_size, bits,
                                   *packed["w2"], group_size, bits, "silu", None, False)
    want = reference_experts(x, weights.cpu(), ids.cpu(), packed["w13_dense"],
                             packed["w2_dense"])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_long_runs_of_one_expert(quantized, kernels):
    # a prefill: hundreds of rows per expert (BLAS's GEMM; quantized: the expert dequantized)
    torch.manual_seed(3)
    w13, w2 = random_experts(4, 128, 64)
    x = torch.randn(300, 128)
    weights, ids = moe_route_op(mlx(torch.randn(300, 4)), 2, "softmax", True, 1, 1, 1.0, None)
    if quantized:
        packed, dense = [], []
        for w in (w13, w2):
            q, scales, biases = mx.quantize(mx.array(w.numpy()), group_size=64, bits=4)
            packed += [torch_mlx.from_mlx(a) for a in (q, scales, biases)] + [64, 4]
            dense.append(torch.from_numpy(__import__("numpy").array(
                mx.dequantize(q, scales, biases, group_size=64, bits=4))))
        got = quantized_moe_experts_op(mlx(x), weights, ids, *packed, "silu", None, False)
        w13, w2 = dense
    else:
        got = moe_experts_op(mlx(x), weights, ids, mlx(w13), mlx(w2), None, None, "silu", None,
                             False)
    want = reference_experts(x, weights.cpu(), ids.cpu(), w13, w2)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_unsupported_activation_names_itself():
    w13, w2 = random_experts(2, 64, 32)
    with pytest.raises(NotImplementedError, match="'swiglustep' is not supported on mlx"):
        moe_experts_op(mlx(torch.randn(1, 64)), mlx(torch.ones(1, 1)),
                       mlx(torch.zeros(1, 1, dtype=torch.int32)), mlx(w13), mlx(w2), None, None,
                       "swiglustep", None, False)


# ---- a compiled forward holds the MoE ops


@pytest.mark.usefixtures("in_process_engine")
def test_compiled_forward_is_one_mlx_graph_with_the_moe_ops(model_dir, monkeypatch):
    import vllm
    from vllm import SamplingParams

    import reference
    import torch_mlx.compile as mlx_compile
    from vllm_metal.compiler import MlxCompiler

    seen = []
    lower = mlx_compile.compile_fx_graph

    def spy(gm, example_inputs=None):
        support = mlx_compile._Supported()
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        seen.append(({str(n.target) for n in calls},
                     [str(n.target) for n in calls if not support.is_node_supported({}, n)]))
        return lower(gm, example_inputs)

    monkeypatch.setattr(mlx_compile, "compile_fx_graph", spy)
    path = model_dir("Qwen2MoeForCausalLM")  # shared expert with its gate, plus routed experts
    before = MlxCompiler.pieces_compiled
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=256, max_num_seqs=4, seed=0)
    assert MlxCompiler.pieces_compiled - before == 1
    (ops, unsupported), = seen  # one graph, every node lowered: no eager pieces
    assert unsupported == []
    assert {"vllm_metal.moe_route.default", "vllm_metal.moe_experts.default"} <= ops
    assert not any("moe_forward" in op for op in ops)
    prompt = "Hello, how are you today?"
    out = llm.generate([prompt], SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0))
    expected, _ = reference.greedy(path, reference.tokenize(path, prompt), 8)
    assert list(out[0].outputs[0].token_ids) == expected
    del llm
    gc.collect()
