"""Gated delta-net kernels on "mlx" (vllm_metal/ops/gated_delta.py) against a float64 token-by-token
recurrence: packed varlen prefills with initial states (chunked form), decode steps continuing
them through each recurrent kernel vLLM's layers call, and the gating / split helpers. State
rows are checked to change in the rows named only, in place. (End to end, against transformers:
test_generation.py's Qwen3NextForCausalLM and OlmoHybridForCausalLM cases.)"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vllm_metal.ops import gated_delta as gd


def mlx(t):
    return t.to("mlx")


def cu(lengths):
    return torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)


# --- float64 reference --------------------------------------------------------------------


def l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def ref_rule(q, k, v, g, beta, h, l2norm=True):
    """One sequence, token by token. q, k [L, H, K]; v [L, HV, V]; g [L, HV] (or [L, HV, K]:
    a decay per key channel); beta [L, HV]; h [HV, V, K]. Returns (o [L, HV, V], h)."""
    q, k, v, g, beta, h = (t.double() for t in (q, k, v, g, beta, h))
    groups = v.shape[1] // q.shape[1]
    q, k = q.repeat_interleave(groups, 1), k.repeat_interleave(groups, 1)
    if l2norm:
        q, k = l2(q), l2(k)
    q = q * q.shape[-1] ** -0.5
    outs = []
    for t in range(q.shape[0]):
        decay = torch.exp(g[t])
        h = h * (decay[:, None, None] if g.dim() == 2 else decay[:, None, :])
        delta = (v[t] - torch.einsum("hvk,hk->hv", h, k[t])) * beta[t][:, None]
        h = h + delta[:, :, None] * k[t][:, None, :]
        outs.append(torch.einsum("hvk,hk->hv", h, q[t]))
    return torch.stack(outs), h


def ref_gate(A_log, a, dt_bias):
    return -torch.exp(A_log.double()) * F.softplus(a.double() + dt_bias.double())


def inputs(lengths, heads=2, value_heads=4, kdim=16, vdim=8, per_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    total = sum(lengths)
    decay = -torch.rand(total, value_heads, *((kdim,) if per_channel else ()), generator=g)
    return dict(q=r(total, heads, kdim), k=r(total, heads, kdim), v=r(total, value_heads, vdim),
                g=decay * 0.3, beta=torch.rand(total, value_heads, generator=g))


# --- chunked prefill -----------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True], ids=["head-gate", "channel-gate"])
@pytest.mark.parametrize("group", [1, 1 << 25], ids=["chunk-by-chunk", "all-chunks"])
def test_chunk_rule_varlen_with_initial_states(monkeypatch, per_channel, group):
    # 130 tokens: three chunks of 64; 64: exactly one; 1 and 5: shorter than a chunk.
    # group 1: the per-chunk products one chunk at a time (GROUP_ELEMENTS' bound)
    monkeypatch.setattr(gd, "GROUP_ELEMENTS", group)
    lengths = [130, 1, 64, 5]
    p = inputs(lengths, per_channel=per_channel, seed=1)
    h0 = torch.randn(len(lengths), 4, 8, 16)
    h0[1] = 0  # a sequence without a saved state (the layers zero those rows)
    qsl = cu(lengths)
    o, final = gd.chunk_gated_delta_rule(
        *(mlx(p[n])[None] for n in ("q", "k", "v", "g", "beta")), initial_state=mlx(h0),
        output_final_state=True, cu_seqlens=mlx(qsl), use_qk_l2norm_in_kernel=True)
    o, final = o.cpu()[0], final.cpu()
    assert final.dtype == torch.float32 and final.shape == h0.shape
    for i, (lo, hi) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        ref_o, ref_h = ref_rule(*(p[n][lo:hi] for n in ("q", "k", "v", "g", "beta")), h0[i])
        torch.testing.assert_close(o[lo:hi].double(), ref_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[i].double(), ref_h, rtol=1e-5, atol=1e-5)


def test_chunk_rule_equal_lengths_without_cu_seqlens_into_core_attn_out():
    # [B, T] batches (no cu_seqlens), no initial state, no in-kernel l2norm, an explicit scale
    p = inputs([70, 70], heads=4, seed=2)
    q, k = l2(p["q"]), l2(p["k"])
    shaped = lambda t: mlx(t.reshape(2, 70, *t.shape[1:]))  # noqa: E731
    out = mlx(torch.full((2 * 70 * 4 * 8 + 3,), float("nan")))
    o, final = gd.chunk_gated_delta_rule(shaped(q), shaped(k), shaped(p["v"]), shaped(p["g"]),
                                         shaped(p["beta"]), scale=16 ** -0.5,
                                         core_attn_out=out)
    assert final is None
    o = o.cpu()
    for b in range(2):
        rows = slice(70 * b, 70 * (b + 1))
        ref_o, _ = ref_rule(q[rows], k[rows], p["v"][rows], p["g"][rows], p["beta"][rows],
                            torch.zeros(4, 8, 16), l2norm=False)
        torch.testing.assert_close(o[b].double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu()[: o.numel()], o.reshape(-1))


def test_unit_lower_inverse_keeps_to_the_true_inverse():
    # I + a with a = beta * (all ones, strictly lower): the powers of a grow like binomial
    # coefficients (~1e17 at 64), the inverse stays within [-1, 1]
    length = 64
    a = torch.tril(torch.full((length, length), 0.9), -1)
    a = torch.stack([a, torch.randn(length, length).tril(-1) * 0.3])
    got = torch.from_numpy(np.array(gd._unit_lower_inverse(gd.mx.array(a.numpy()))))
    expected = torch.linalg.inv(torch.eye(length, dtype=torch.float64) + a.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# --- decode continuing a prefill -----------------------------------------------------------


def gating_inputs(total, value_heads=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(a=torch.randn(total, value_heads, generator=g),
                b=torch.randn(total, value_heads, generator=g),
                A_log=torch.rand(value_heads, generator=g) * 2,
                dt_bias=torch.randn(value_heads, generator=g) * 0.5)


def prefill_then_state(p, lengths, slots, states):
    """The layers' prefill: the chunked rule from zero states, final states scattered into
    their rows of ``states`` (as qwen_gdn_linear_attn does with the returned states)."""
    qsl = cu(lengths)
    _, final = gd.chunk_gated_delta_rule(
        *(mlx(p[n][: qsl[-1]])[None] for n in ("q", "k", "v", "g", "beta")),
        initial_state=mlx(torch.zeros(len(lengths), 4, 8, 16)), output_final_state=True,
        cu_seqlens=mlx(qsl), use_qk_l2norm_in_kernel=True)
    states[mlx(torch.tensor(slots))] = final
    return qsl


@pytest.mark.parametrize("kernel", ["sigmoid_gating", "recurrent", "packed"])
def test_decode_steps_continue_the_prefill(kernel):
    lengths, steps, slots = [9, 70], 3, [3, 1]
    total = sum(lengths) + steps * len(lengths)
    p = inputs([total], seed=4)
    gates = gating_inputs(total)
    p["g"] = ref_gate(gates["A_log"], gates["a"], gates["dt_bias"]).float()
    p["beta"] = torch.sigmoid(gates["b"])
    # each sequence's tokens: its prefill, then one token per step (taken after all prefills)
    order = [list(range(lo, hi)) for lo, hi in zip(cu(lengths)[:-1], cu(lengths)[1:])]
    for s in range(steps):
        for i in range(len(lengths)):
            order[i].append(sum(lengths) + s * len(lengths) + i)
    states = mlx(torch.zeros(5, 4, 8, 16))
    prefill_then_state(p, lengths, slots, states)
    outs = [[] for _ in lengths]
    for s in range(steps):
        # a batch of the two requests and a padding row (null state index 0): never touched
        rows = [order[i][lengths[i] + s] for i in range(2)] + [0]
        idx = mlx(torch.tensor(slots + [0], dtype=torch.int32))
        pick = lambda n: mlx(p[n][rows].contiguous())  # noqa: E731
        gpick = lambda n: mlx(gates[n][rows].contiguous())  # noqa: E731
        if kernel == "sigmoid_gating":  # Qwen3-Next's decode (packed decode off)
            o, _ = gd.fused_sigmoid_gating_delta_rule_update(
                mlx(gates["A_log"]), gpick("a"), gpick("b"), mlx(gates["dt_bias"]),
                pick("q")[None], pick("k")[None], pick("v")[None], initial_state=states,
                inplace_final_state=True, cu_seqlens=mlx(cu([1, 1, 1])),
                ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)
            o = o.cpu()[0]
        elif kernel == "recurrent":  # OLMo-Hybrid's decode, gated by its own helper
            g, beta = gd.fused_olmo_hybrid_gdn_gating(mlx(gates["A_log"]), gpick("a"),
                                                      gpick("b"), mlx(gates["dt_bias"]))
            o, _ = gd.fused_recurrent_gated_delta_rule(
                pick("q")[None], pick("k")[None], pick("v")[None], g, beta,
                initial_state=states, inplace_final_state=True, cu_seqlens=mlx(cu([1, 1, 1])),
                ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)
            o = o.cpu()[0]
        else:  # Qwen3-Next's default decode, straight from the conv output
            mixed = torch.cat([p["q"][rows].flatten(1), p["k"][rows].flatten(1),
                               p["v"][rows].flatten(1)], 1)
            out = mlx(torch.full((3, 1, 4, 8), float("nan")))
            gd.fused_recurrent_gated_delta_rule_packed_decode(
                mlx(mixed), gpick("a"), gpick("b"), mlx(gates["A_log"]), mlx(gates["dt_bias"]),
                16 ** -0.5, states, out, idx, use_qk_l2norm_in_kernel=True)
            o = out.cpu()[:, 0]
        assert o[2].abs().sum() == 0  # the padding row's output
        for i in range(2):
            outs[i].append(o[i])
    after = states.cpu()
    for i in range(2):
        ref_o, ref_h = ref_rule(*(p[n][order[i]] for n in ("q", "k", "v", "g", "beta")),
                                torch.zeros(4, 8, 16))
        torch.testing.assert_close(torch.stack(outs[i]).double(), ref_o[lengths[i]:],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after[slots[i]].double(), ref_h, rtol=1e-5, atol=1e-5)
    assert after[[0, 2, 4]].abs().sum() == 0


def test_recurrent_rule_without_in_place_state_returns_it():
    p = inputs([2], seed=5)
    h0 = torch.randn(2, 4, 8, 16)
    o, final = gd.fused_recurrent_gated_delta_rule(
        *(mlx(p[n])[:, None] for n in ("q", "k", "v", "g", "beta")), initial_state=mlx(h0),
        inplace_final_state=False, use_qk_l2norm_in_kernel=True)
    for i in range(2):
        ref_o, ref_h = ref_rule(*(p[n][i:i + 1] for n in ("q", "k", "v", "g", "beta")), h0[i])
        torch.testing.assert_close(o.cpu()[i].double(), ref_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final.cpu()[i].double(), ref_h, rtol=1e-5, atol=1e-5)


def test_several_tokens_per_sequence_in_decode_is_refused():
    p = inputs([3], seed=6)
    with pytest.raises(NotImplementedError, match="speculative"):
        gd.fused_recurrent_gated_delta_rule(
            *(mlx(p[n])[None] for n in ("q", "k", "v", "g", "beta")),
            initial_state=mlx(torch.zeros(2, 4, 8, 16)), cu_seqlens=mlx(cu([2, 1])),
            ssm_state_indices=mlx(torch.tensor([1, 2], dtype=torch.int32)))


# --- gating and split helpers --------------------------------------------------------------


@pytest.mark.parametrize("l2norm", [True, False])
def test_post_conv_prep_splits_normalises_and_gates(l2norm):
    gates = gating_inputs(6)
    heads, kdim, value_heads, vdim = 2, 16, 4, 8
    conv = torch.randn(6, 2 * heads * kdim + value_heads * vdim)
    q, k, v, g, beta = (t.cpu() for t in gd.fused_post_conv_prep(
        mlx(conv), mlx(gates["a"]), mlx(gates["b"]), mlx(gates["A_log"]),
        mlx(gates["dt_bias"]), heads, kdim, vdim, apply_l2norm=l2norm))
    ref_q = conv[:, : heads * kdim].reshape(6, heads, kdim).double()
    ref_k = conv[:, heads * kdim: 2 * heads * kdim].reshape(6, heads, kdim).double()
    if l2norm:
        ref_q, ref_k = l2(ref_q), l2(ref_k)
    torch.testing.assert_close(q.double(), ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k.double(), ref_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, conv[:, 2 * heads * kdim:].reshape(6, value_heads, vdim))
    assert g.dtype == beta.dtype == torch.float32 and g.shape == (6, value_heads)
    torch.testing.assert_close(g.double(), ref_gate(gates["A_log"], gates["a"],
                                                    gates["dt_bias"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(beta, torch.sigmoid(gates["b"]))


def test_olmo_gating_doubles_beta_with_negative_eigenvalues():
    gates = gating_inputs(5)
    g, beta = gd.fused_olmo_hybrid_gdn_gating(mlx(gates["A_log"]), mlx(gates["a"]),
                                              mlx(gates["b"]), mlx(gates["dt_bias"]),
                                              allow_neg_eigval=True)
    assert g.shape == beta.shape == (1, 5, 4)
    torch.testing.assert_close(g.cpu()[0].double(), ref_gate(gates["A_log"], gates["a"],
                                                             gates["dt_bias"]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(beta.cpu()[0], 2 * torch.sigmoid(gates["b"]))


def test_install_rebinds_the_layers_kernel_names():
    from vllm.model_executor.layers.mamba.gdn import olmo_gdn_linear_attn, qwen_gdn_linear_attn

    from vllm_metal.ops import mamba

    assert qwen_gdn_linear_attn.fla_chunk_gated_delta_rule is gd.chunk_gated_delta_rule
    assert qwen_gdn_linear_attn.fused_post_conv_prep is gd.fused_post_conv_prep
    assert qwen_gdn_linear_attn.fused_recurrent_gated_delta_rule_packed_decode is \
        gd.fused_recurrent_gated_delta_rule_packed_decode
    assert qwen_gdn_linear_attn.causal_conv1d_fn is mamba.causal_conv1d_fn
    assert olmo_gdn_linear_attn.chunk_gated_delta_rule is gd.chunk_gated_delta_rule
    assert olmo_gdn_linear_attn.fused_olmo_hybrid_gdn_gating is gd.fused_olmo_hybrid_gdn_gating
    assert olmo_gdn_linear_attn.causal_conv1d_update is mamba.causal_conv1d_update
