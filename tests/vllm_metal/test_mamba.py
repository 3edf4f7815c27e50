"""Mamba kernels on "mlx" (vllm_metal/ops/mamba.py) against straightforward float64 recurrences:
varlen batches with and without initial state, padding rows, and decode steps continuing a
prefill. State tensors are checked to change in the rows named only, in place."""
import pytest
import torch
import torch.nn.functional as F

from vllm_metal.ops import mamba

NULL = mamba.NULL_BLOCK_ID


def mlx(t):
    return t.to("mlx")


# --- float64 references ------------------------------------------------------------------


def ref_conv(x, weight, bias, init, silu=True):
    """x [dim, L]; init [dim, width - 1] -> (out [dim, L], new state [dim, width - 1])."""
    full = torch.cat([init, x], dim=1).double()
    out = F.conv1d(full[None], weight.double()[:, None], bias.double(), groups=x.shape[0])[0]
    if silu:
        out = F.silu(out)
    return out, full[:, -(weight.shape[1] - 1):]


def ref_scan(u, delta, A, B, C, D, z, bias, h):
    """Mamba-1, token by token. u, delta, z [dim, L]; B, C [dstate, L]; h [dim, dstate]."""
    u, delta, A, B, C, D, z, h = (t.double() for t in (u, delta, A, B, C, D, z, h))
    dt = F.softplus(delta + bias.double()[:, None])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, None] * A) * h + (dt[:, t] * u[:, t])[:, None] * B[None, :, t]
        ys.append((h * C[None, :, t]).sum(1) + D * u[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y, h


# --- causal conv1d -----------------------------------------------------------------------


def test_causal_conv1d_varlen_with_and_without_initial_state():
    torch.manual_seed(0)
    dim, width, slots = 6, 4, 8
    lengths = [5, 1, 2, 9]
    has_init = [True, False, True, False]
    cache_idx = [3, 1, 6, NULL]  # the last is padding: neither read nor written
    x = torch.randn(dim, sum(lengths))
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    states = torch.randn(slots, dim, width - 1)
    qsl = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    conv_states = mlx(states)
    out = mamba.causal_conv1d_fn(mlx(x), mlx(weight), mlx(bias), conv_states, mlx(qsl),
                                 cache_indices=mlx(torch.tensor(cache_idx, dtype=torch.int32)),
                                 has_initial_state=mlx(torch.tensor(has_init)),
                                 activation="silu").cpu()
    expected_states = states.clone()
    for i, (lo, hi) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        if cache_idx[i] == NULL:
            continue
        init = states[cache_idx[i]] if has_init[i] else torch.zeros(dim, width - 1)
        ref, new = ref_conv(x[:, lo:hi], weight, bias, init)
        torch.testing.assert_close(out[:, lo:hi].double(), ref, rtol=1e-5, atol=1e-5)
        expected_states[cache_idx[i]] = new.float()
    torch.testing.assert_close(conv_states.cpu(), expected_states, rtol=1e-6, atol=1e-6)


def test_causal_conv1d_update_continues_a_prefill():
    torch.manual_seed(1)
    dim, width = 5, 4
    x = torch.randn(dim, 7)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    # the conv state lives transposed in the cache (vLLM's token-major conv layout)
    conv_states = mlx(torch.zeros(4, width - 1, dim)).transpose(1, 2)
    qsl = mlx(torch.tensor([0, 5], dtype=torch.int32))
    idx = mlx(torch.tensor([2], dtype=torch.int32))
    prefill = mamba.causal_conv1d_fn(mlx(x[:, :5]), mlx(weight), mlx(bias), conv_states, qsl,
                                     cache_indices=idx,
                                     has_initial_state=mlx(torch.tensor([False])),
                                     activation="silu").cpu()
    # decode indices come as [batch, 1] (vLLM's state_indices_tensor_d)
    decode_idx = mlx(torch.tensor([[2]], dtype=torch.int32))
    steps = [mamba.causal_conv1d_update(mlx(x[:, t][None].contiguous()), conv_states,
                                        mlx(weight), mlx(bias), "silu",
                                        conv_state_indices=decode_idx).cpu()[0]
             for t in (5, 6)]
    ref, new = ref_conv(x, weight, bias, torch.zeros(dim, width - 1))
    got = torch.cat([prefill, torch.stack(steps, 1)], 1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv_states.cpu()[2].double(), new, rtol=1e-6, atol=1e-6)
    assert conv_states.cpu()[[0, 1, 3]].abs().sum() == 0


# --- Mamba-1 selective scan ----------------------------------------------------------------


def mamba1_inputs(dim, dstate, total, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.exp(r(dim, dstate) * 0.5)
    return dict(u=r(dim, total), delta=r(dim, total) - 1, A=A, B=r(dstate, total),
                C=r(dstate, total), D=r(dim), z=r(dim, total), bias=r(dim) * 0.1)


@pytest.mark.parametrize("chunk", [4, 64])
def test_selective_scan_varlen_with_and_without_initial_state(monkeypatch, chunk):
    # chunk 4: the sequences cross several scan chunks (the carried state); 64: one chunk
    monkeypatch.setattr(mamba, "SCAN_CHUNK", chunk)
    dim, dstate, slots = 6, 4, 6
    lengths = [7, 1, 11, 3]
    has_init = [True, False, False, True]
    cache_idx = [4, 2, NULL, 1]
    p = mamba1_inputs(dim, dstate, sum(lengths), seed=2)
    states = torch.randn(slots, dim, dstate)
    qsl = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    ssm = mlx(states)
    y = mamba.selective_scan_fn(
        mlx(p["u"]), ssm, mlx(p["delta"]), mlx(p["A"]), mlx(p["B"])[None], mlx(p["C"])[None],
        mlx(p["D"]), mlx(p["z"]), mlx(p["bias"]), delta_softplus=True, query_start_loc=mlx(qsl),
        cache_indices=mlx(torch.tensor(cache_idx, dtype=torch.int32)),
        has_initial_state=mlx(torch.tensor(has_init))).cpu()
    expected = states.clone()
    for i, (lo, hi) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        h = states[cache_idx[i]] if has_init[i] and cache_idx[i] != NULL else \
            torch.zeros(dim, dstate)
        ref, h = ref_scan(*(p[k][:, lo:hi] for k in ("u", "delta")), p["A"],
                          p["B"][:, lo:hi], p["C"][:, lo:hi], p["D"], p["z"][:, lo:hi],
                          p["bias"], h)
        torch.testing.assert_close(y[:, lo:hi].double(), ref, rtol=1e-4, atol=1e-4)
        if cache_idx[i] != NULL:
            expected[cache_idx[i]] = h.float()
    torch.testing.assert_close(ssm.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_selective_state_update_continues_a_prefill():
    torch.manual_seed(3)
    dim, dstate, total = 5, 4, 9
    p = mamba1_inputs(dim, dstate, total, seed=4)
    ssm = mlx(torch.zeros(3, dim, dstate))
    y = mamba.selective_scan_fn(
        mlx(p["u"][:, :6]), ssm, mlx(p["delta"][:, :6]), mlx(p["A"]), mlx(p["B"][:, :6])[None],
        mlx(p["C"][:, :6])[None], mlx(p["D"]), mlx(p["z"][:, :6]), mlx(p["bias"]),
        delta_softplus=True, query_start_loc=mlx(torch.tensor([0, 6], dtype=torch.int32)),
        cache_indices=mlx(torch.tensor([1], dtype=torch.int32)),
        has_initial_state=mlx(torch.tensor([False]))).cpu()
    outs = [y]
    for t in range(6, total):
        out = mlx(torch.empty(2, dim))
        # two requests: the real one and a padding row (null block), whose state is not touched
        idx = mlx(torch.tensor([[1], [NULL]], dtype=torch.int32))
        col = lambda k: mlx(p[k][:, t][None].expand(2, -1).contiguous())  # noqa: E731
        mamba.selective_state_update(
            ssm, col("u"), col("delta"), mlx(p["A"]),
            mlx(p["B"][:, t][None].expand(2, -1).contiguous()),
            mlx(p["C"][:, t][None].expand(2, -1).contiguous()), mlx(p["D"]), mlx(p["bias"]),
            z=col("z"), dt_softplus=True, state_batch_indices=idx, dst_state_batch_indices=idx,
            out=out)
        outs.append(out.cpu()[0][:, None])
    ref, h = ref_scan(p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"], p["z"], p["bias"],
                      torch.zeros(dim, dstate))
    torch.testing.assert_close(torch.cat(outs, 1).double(), ref, rtol=1e-4, atol=1e-4)
    after = ssm.cpu()
    torch.testing.assert_close(after[1].double(), h, rtol=1e-4, atol=1e-5)
    assert after[[0, 2]].abs().sum() == 0


# --- Mamba-2 SSD chunk scan ----------------------------------------------------------------


def ref_ssd(x, dt, A, B, C, D, dt_bias, h):
    """Mamba-2, token by token. x [L, H, P]; dt [L, H]; A [H]; B, C [L, G, N]; D [H];
    h [H, P, N]."""
    heads, groups = x.shape[1], B.shape[1]
    x, dt, A, B, C, D, h = (t.double() for t in (x, dt, A, B, C, D, h))
    dt = F.softplus(dt + dt_bias.double())
    B = B.repeat_interleave(heads // groups, dim=1)
    C = C.repeat_interleave(heads // groups, dim=1)
    ys = []
    for t in range(x.shape[0]):
        h = torch.exp(dt[t] * A)[:, None, None] * h + \
            (dt[t][:, None] * x[t])[:, :, None] * B[t][:, None, :]
        ys.append((h * C[t][:, None, :]).sum(-1) + D[:, None] * x[t])
    return torch.stack(ys), h


def mamba2_inputs(total, heads, hdim, groups, dstate, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(total, heads, hdim), dt=r(total, heads) - 1,
                A=-torch.arange(1, heads + 1).float() * 0.5, B=r(total, groups, dstate),
                C=r(total, groups, dstate), D=r(heads), dt_bias=r(heads) * 0.1)


@pytest.mark.parametrize("group_elements", [64, 1 << 25])
def test_ssd_chunk_scan_varlen_with_and_without_initial_state(monkeypatch, group_elements):
    # 64: the outputs one chunk at a time ([4 heads, 4, 4] products); else all chunks at once
    monkeypatch.setattr(mamba, "SSD_GROUP_ELEMENTS", group_elements)
    heads, hdim, groups, dstate, chunk = 4, 3, 2, 5, 4
    lengths = [9, 1, 4, 6]  # across several chunks, exactly one chunk, shorter than one
    has_init = [True, False, True, False]
    p = mamba2_inputs(sum(lengths), heads, hdim, groups, dstate, seed=5)
    init = torch.randn(len(lengths), heads, hdim, dstate)
    init[~torch.tensor(has_init)] = 0  # as the mixer passes them (torch.where on the flags)
    qsl = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    out = mlx(torch.full((sum(lengths), heads, hdim), float("nan")))
    final = mamba.mamba_chunk_scan_combined_varlen(
        mlx(p["x"]), mlx(p["dt"]), mlx(p["A"]), mlx(p["B"]), mlx(p["C"]), chunk,
        cu_seqlens=mlx(qsl), cu_chunk_seqlens=None, last_chunk_indices=None, seq_idx=None,
        out=out, D=mlx(p["D"]), dt_bias=mlx(p["dt_bias"]), initial_states=mlx(init),
        dt_softplus=True, state_dtype=torch.float32).cpu()
    out = out.cpu()
    for i, (lo, hi) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        ref, h = ref_ssd(p["x"][lo:hi], p["dt"][lo:hi], p["A"], p["B"][lo:hi], p["C"][lo:hi],
                         p["D"], p["dt_bias"], init[i])
        torch.testing.assert_close(out[lo:hi].double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final[i].double(), h, rtol=1e-4, atol=1e-5)


def test_mamba2_state_update_continues_an_ssd_prefill():
    heads, hdim, groups, dstate, total = 4, 3, 2, 5, 8
    p = mamba2_inputs(total, heads, hdim, groups, dstate, seed=6)
    out = mlx(torch.empty(5, heads, hdim))
    final = mamba.mamba_chunk_scan_combined_varlen(
        mlx(p["x"][:5]), mlx(p["dt"][:5]), mlx(p["A"]), mlx(p["B"][:5]), mlx(p["C"][:5]), 4,
        cu_seqlens=mlx(torch.tensor([0, 5], dtype=torch.int32)), cu_chunk_seqlens=None,
        last_chunk_indices=None, seq_idx=None, out=out, D=mlx(p["D"]),
        dt_bias=mlx(p["dt_bias"]), dt_softplus=True, state_dtype=torch.float32)
    ssm = mlx(torch.zeros(3, heads, hdim, dstate))
    ssm[2] = final[0]
    outs = [out.cpu()]
    for t in range(5, total):
        step = mlx(torch.empty(1, heads, hdim))
        # the mixer's decode shapes: per-head values broadcast over the head dimension
        mamba.selective_state_update(
            ssm, mlx(p["x"][t:t + 1]), mlx(p["dt"][t:t + 1])[:, :, None].expand(-1, -1, hdim),
            mlx(p["A"])[:, None, None].expand(-1, hdim, dstate), mlx(p["B"][t:t + 1]),
            mlx(p["C"][t:t + 1]), mlx(p["D"])[:, None].expand(-1, hdim),
            mlx(p["dt_bias"])[:, None].expand(-1, hdim), dt_softplus=True,
            state_batch_indices=mlx(torch.tensor([[2]], dtype=torch.int32)),
            dst_state_batch_indices=mlx(torch.tensor([[2]], dtype=torch.int32)), out=step)
        outs.append(step.cpu())
    ref, h = ref_ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], p["D"], p["dt_bias"],
                     torch.zeros(heads, hdim, dstate))
    torch.testing.assert_close(torch.cat(outs).double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssm.cpu()[2].double(), h, rtol=1e-4, atol=1e-5)
    assert ssm.cpu()[:2].abs().sum() == 0
