"""Gated delta-net (linear attention) kernels on "mlx": the chunked gated delta rule for packed
prefills, the recurrent step for decode, and the gating / split helpers around them, in MLX.

vLLM's gated delta-net layers (layers/mamba/gdn/*: Qwen3-Next, OLMo-Hybrid) call flash-linear-
attention's Triton kernels (``vllm.third_party.flash_linear_attention.ops``) by the names they
imported; ``install()`` rebinds those names, and the causal conv1d names, to the functions here
(the conv kernels are ops/mamba.py's). Each keeps its kernel's contract: argument names, shapes
(q, k [B, T, H, K]; v [B, T, HV, V]; HV a multiple of H), the state layout [N, HV, V, K], the
in-place state rows, the null state index (<= 0: neither read nor written).

The recurrence, per sequence and value head, state S [V, K]:
    S <- S * exp(g_t)                 (g scalar per head; or per key channel, [K]: Kimi's KDA)
    S <- S + beta_t (v_t - S k_t) k_t^T
    o_t = S q_t * scale
Prefill runs it in chunks of CHUNK tokens within each sequence (the WY/UT form): inside a chunk
the delta updates are the solution of one unit lower-triangular system, so a chunk is a few
batched products over every chunk and head at once; only the state passed from chunk to chunk is
sequential (one step per chunk rank, all sequences together). All in float32.
"""

import mlx.core as mx
import numpy as np
import torch

from torch_mlx import from_mlx

from .library import rebind
from .mamba import (_chunks, _host, _mx, _mx_dtype, _state_index, _write_rows,
                    causal_conv1d_fn, causal_conv1d_update)

CHUNK = 64  # tokens per chunk (FLA_CHUNK_SIZE); a power of two (_unit_lower_inverse)
# Chunks whose pairwise products ([heads, chunk, chunk], x key channels for a per-channel gate)
# are made together, by element count, so a long prefill's memory stays bounded.
GROUP_ELEMENTS = 1 << 25

F32 = mx.float32


# --- elementwise helpers -------------------------------------------------------------------


def _softplus(x: mx.array, beta: float = 1.0, threshold: float = 20.0) -> mx.array:
    """torch's softplus (the kernels' form): linear where beta * x > threshold."""
    soft = mx.logaddexp(beta * x, mx.array(0.0, dtype=x.dtype)) / beta
    return mx.where(beta * x <= threshold, soft, x)


def _l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """x / sqrt(sum(x^2) + eps) over the last axis (FLA's l2norm)."""
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def _gate(A_log, a: mx.array, dt_bias, beta: float = 1.0,
          threshold: float = 20.0) -> mx.array:
    """Log decay g = -exp(A_log) * softplus(a + dt_bias), float32."""
    x = a.astype(F32) + _mx(dt_bias).astype(F32)
    return -mx.exp(_mx(A_log).astype(F32)) * _softplus(x, beta, threshold)


def _heads(x: mx.array, heads: int) -> mx.array:
    """[..., H, K] -> [..., heads, K]: value head h reads key head h // (heads // H)."""
    if x.shape[-2] == heads:
        return x
    return mx.repeat(x, heads // x.shape[-2], axis=-2)


# --- the chunked gated delta rule ----------------------------------------------------------


def _diagonal_blocks(m: mx.array, size: int) -> mx.array:
    """[..., L, L] -> its L / size diagonal blocks [..., L / size, size, size]."""
    n = m.shape[-1] // size
    tiles = m.reshape(*m.shape[:-2], n, size, n, size).swapaxes(-3, -2)  # [..., n, n, s, s]
    return mx.moveaxis(mx.diagonal(tiles, axis1=-4, axis2=-3), -1, -3)


def _unit_lower_inverse(a: mx.array) -> mx.array:
    """(I + a)^-1 for a strictly lower-triangular [..., L, L] (L a power of two), by blocks:
    the inverses of the diagonal blocks are merged pairwise, size 1, 2, 4, ..., with
    [[X, 0], [C, Y]]^-1 = [[X^-1, 0], [-Y^-1 C X^-1, Y^-1]]. log2(L) batched steps, every
    intermediate an entry of a true inverse (no powers of a, which can grow without bound)."""
    length = a.shape[-1]
    lead = a.shape[:-2]
    inverse = mx.ones((*lead, length, 1, 1), dtype=a.dtype)  # the 1 x 1 diagonal blocks
    size = 1
    while size < length:
        pairs = inverse.reshape(*lead, length // (2 * size), 2, size, size)
        x_inv, y_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        below = _diagonal_blocks(a, 2 * size)[..., size:, :size]
        lower = -(y_inv @ below @ x_inv)
        top = mx.concatenate([x_inv, mx.zeros_like(x_inv)], axis=-1)
        inverse = mx.concatenate([top, mx.concatenate([lower, y_inv], axis=-1)], axis=-2)
        size *= 2
    return inverse.reshape(*lead, length, length)


def _chunk_terms(q, k, v, g, beta, causal, strict):
    """Per-chunk quantities that do not depend on the state entering the chunk.
    q, k [n, H, L, K]; v [n, H, L, V]; g (cumulative log decay from the chunk's start)
    [n, H, L] or per channel [n, H, L, K]; beta [n, H, L]. Returns
    (u, w, qk, qg, kd, last): the state-free part of the delta updates u [n, H, L, V] and the
    keys w [n, H, L, K] that read the entering state (updates = u - w S^T), the masked decayed
    q.k products [n, H, L, L], the decayed queries qg and keys kd (decayed to the chunk's end)
    [n, H, L, K], and the chunk's total decay last [n, H, 1 or K]."""
    per_channel = g.ndim == 4
    if per_channel:
        # exp(G_i - G_j) per key channel, i >= j (never a positive exponent)
        gap = g[:, :, :, None, :] - g[:, :, None, :, :]  # [n, H, i, j, K]
        decay = mx.exp(mx.where(causal[:, :, None], gap, -mx.inf))
        qk = (q[:, :, :, None, :] * k[:, :, None, :, :] * decay).sum(axis=-1)
        kk = (k[:, :, :, None, :] * k[:, :, None, :, :] * decay).sum(axis=-1)
        g_all, last = mx.exp(g), g[:, :, -1:, :]
    else:
        gap = g[..., :, None] - g[..., None, :]  # [n, H, i, j]
        decay = mx.exp(mx.where(causal, gap, -mx.inf))
        qk = (q @ k.swapaxes(-1, -2)) * decay
        kk = (k @ k.swapaxes(-1, -2)) * decay
        g_all, last = mx.exp(g)[..., None], g[..., -1:, None]
    b = beta[..., None]
    system = mx.where(strict, kk * b, 0.0)  # beta_i exp(G_i - G_j) k_i.k_j, i > j
    solve = _unit_lower_inverse(system)
    u = solve @ (v * b)
    w = solve @ (k * b * g_all)
    kd = k * mx.exp(last - g) if per_channel else k * mx.exp(last - g[..., None])
    return u, w, qk, q * g_all, kd, mx.exp(last)


def _gated_delta_prefill(q, k, v, g, beta, h0, starts, scale):
    """The rule over packed sequences (boundaries ``starts``): q, k [T, H, K], v [T, HV, V],
    g [T, HV] or [T, HV, K] (log decay), beta [T, HV]; h0 [N, HV, V, K]. Returns
    (o [starts[-1], HV, V], final states [N, HV, V, K]), float32."""
    heads = v.shape[1]
    q = _heads(q, heads) * scale
    k = _heads(k, heads)
    index, seq_of, rank = _chunks(starts, CHUNK)
    num_chunks = index.shape[0]
    h = h0
    if num_chunks == 0:
        return mx.zeros((0, heads, v.shape[2]), dtype=F32), h
    idx = mx.array(index)

    def chunked(m: mx.array) -> mx.array:
        """[T, HV, ...] -> [nc, HV, L, ...]; padding rows zero (no decay, no update)."""
        m = mx.concatenate([m[: starts[-1]], mx.zeros((1, *m.shape[1:]), dtype=m.dtype)])
        return mx.moveaxis(m[idx], 1, 2)

    qc, kc, vc, bc = chunked(q), chunked(k), chunked(v), chunked(beta)
    gc = mx.cumsum(chunked(g), axis=2)
    causal = mx.array(np.tril(np.ones((CHUNK, CHUNK), bool)))
    strict = mx.array(np.tril(np.ones((CHUNK, CHUNK), bool), -1))
    pair = heads * CHUNK * CHUNK * (k.shape[-1] if g.ndim == 3 else 1)
    per_group = max(1, GROUP_ELEMENTS // pair)
    terms = []
    for lo in range(0, num_chunks, per_group):
        part = slice(lo, min(lo + per_group, num_chunks))
        group = _chunk_terms(qc[part], kc[part], vc[part], gc[part], bc[part], causal, strict)
        mx.eval(*group)
        terms.append(group)
    u, w, qk, qg, kd, last = (mx.concatenate(t) for t in zip(*terms))

    # the state through each sequence's chunks: the k-th chunks of all sequences at once
    outputs = [None] * num_chunks
    for r in range(int(rank.max()) + 1):
        ids = np.flatnonzero(rank == r)
        cid = mx.array(ids.astype(np.int32))
        seqs = mx.array(seq_of[ids].astype(np.int32))
        entering = h[seqs]  # [n, HV, V, K]
        updates = u[cid] - w[cid] @ entering.swapaxes(-1, -2)  # [n, HV, L, V]
        out = qg[cid] @ entering.swapaxes(-1, -2) + qk[cid] @ updates
        h[seqs] = entering * last[cid] + updates.swapaxes(-1, -2) @ kd[cid]
        mx.eval(out, h)
        for i, chunk in enumerate(ids):
            outputs[chunk] = out[i]
    o = mx.stack(outputs)  # [nc, HV, L, V]
    o = o.swapaxes(1, 2).reshape(num_chunks * CHUNK, heads, -1)
    return o[mx.array(np.flatnonzero(index.reshape(-1) < starts[-1]).astype(np.int32))], h


def _varlen(x: torch.Tensor, cu_seqlens) -> tuple[mx.array, np.ndarray]:
    """[B, T, ...] -> packed [B * T, ...] and the sequence boundaries (cu_seqlens if given,
    else B sequences of T tokens)."""
    m = _mx(x)
    batch, length = m.shape[:2]
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"batch size {batch} with cu_seqlens: expected 1 (packed)")
        return m[0], _host(cu_seqlens).astype(np.int64)
    return m.reshape(batch * length, *m.shape[2:]), np.arange(batch + 1) * length


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None, chunk_indices=None,
                           chunk_offsets=None, use_qk_l2norm_in_kernel=False,
                           core_attn_out=None):
    """FLA's chunk_gated_delta_rule: q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] (log
    decay); beta [B, T, HV]; initial_state [N, HV, V, K] or None. Returns (o [B, T, HV, V] in
    q's dtype, also written into ``core_attn_out`` when given; final state [N, HV, V, K]
    float32, or None)."""
    qm, starts = _varlen(q, cu_seqlens)
    km, _ = _varlen(k, cu_seqlens)
    vm, _ = _varlen(v, cu_seqlens)
    gm, _ = _varlen(g, cu_seqlens)
    bm, _ = _varlen(beta, cu_seqlens)
    qm, km = qm.astype(F32), km.astype(F32)
    if use_qk_l2norm_in_kernel:
        qm, km = _l2norm(qm), _l2norm(km)
    if scale is None:
        scale = k.shape[-1] ** -0.5
    num_seqs = len(starts) - 1
    heads, vdim, kdim = v.shape[2], v.shape[3], k.shape[3]
    h0 = mx.zeros((num_seqs, heads, vdim, kdim), dtype=F32) if initial_state is None else \
        _mx(initial_state).astype(F32)
    o, final = _gated_delta_prefill(qm, km, vm.astype(F32), gm.astype(F32), bm.astype(F32),
                                    h0, starts, scale)
    total = qm.shape[0]
    if o.shape[0] < total:  # tokens past the last sequence
        o = mx.concatenate([o, mx.zeros((total - o.shape[0], heads, vdim), dtype=F32)])
    o = from_mlx(o.astype(_mx_dtype(q.dtype)).reshape(v.shape))
    if core_attn_out is not None:
        core_attn_out.view(-1)[: o.numel()].copy_(o.reshape(-1))
    return o, (from_mlx(final) if output_final_state else None)


# --- the recurrent step (decode) -----------------------------------------------------------


def _one_token_each(cu_seqlens, batch: int, length: int) -> np.ndarray:
    """The token of each sequence (-1: none): decode has at most one token per request."""
    if cu_seqlens is None:
        if length != 1:
            raise NotImplementedError("the recurrent gated delta rule over several tokens per "
                                      "sequence (speculative decoding) is not supported on mlx")
        return np.arange(batch)
    starts = _host(cu_seqlens).astype(np.int64)
    counts = np.diff(starts)
    if (counts > 1).any():
        raise NotImplementedError("the recurrent gated delta rule over several tokens per "
                                  "sequence (speculative decoding) is not supported on mlx")
    return np.where(counts == 1, starts[:-1], -1)


def _recurrent_step(q, k, v, g, beta, h, scale, l2norm):
    """One step for n sequences: q, k [n, H, K]; v [n, HV, V]; g [n, HV] or [n, HV, K];
    beta [n, HV]; h [n, HV, V, K]. Returns (o [n, HV, V], new h), float32."""
    heads = v.shape[1]
    q, k = _heads(q.astype(F32), heads), _heads(k.astype(F32), heads)
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    decay = mx.exp(g)[..., None, None] if g.ndim == 2 else mx.exp(g)[..., None, :]
    h = h * decay
    delta = (v.astype(F32) - (h @ k[..., None])[..., 0]) * beta[..., None]
    h = h + delta[..., :, None] * k[..., None, :]
    return (h @ (q * scale)[..., None])[..., 0], h


def _decode(q, k, v, g, beta, scale, initial_state, inplace_final_state, cu_seqlens,
            ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel):
    """The shared body of the recurrent kernels, g and beta already computed ([T, HV])."""
    if num_accepted_tokens is not None:
        raise NotImplementedError("speculative decoding (num_accepted_tokens) with gated "
                                  "delta-net layers is not supported on mlx")
    batch, length = q.shape[:2]
    token = _one_token_each(cu_seqlens, batch, length)
    num_seqs = len(token)
    heads, vdim, kdim = v.shape[2], v.shape[3], k.shape[3]
    if scale is None:
        scale = kdim ** -0.5
    if ssm_state_indices is not None:
        slots = _state_index(ssm_state_indices, num_seqs)
    else:
        slots = np.arange(num_seqs)
    live = np.flatnonzero((token >= 0) & (slots > 0 if ssm_state_indices is not None
                                          else True))
    flat = lambda x: _mx(x).reshape(batch * length, *x.shape[2:])  # noqa: E731
    rows = mx.array(token[live].astype(np.int32))
    h = mx.zeros((len(live), heads, vdim, kdim), dtype=F32)
    if initial_state is not None and live.size:
        h = _mx(initial_state)[mx.array(slots[live].astype(np.int32))].astype(F32)
    o, h = _recurrent_step(flat(q)[rows], flat(k)[rows], flat(v)[rows], g[rows], beta[rows],
                           h, scale, use_qk_l2norm_in_kernel)
    out = mx.zeros((batch * length, heads, vdim), dtype=F32)
    if live.size:
        out[rows] = o
    out = from_mlx(out.astype(_mx_dtype(q.dtype)).reshape(batch, length, heads, vdim))
    if inplace_final_state:
        _write_rows(initial_state, slots[live], h)
        return out, initial_state
    final = mx.zeros((batch * length, heads, vdim, kdim), dtype=F32)
    if live.size:
        final[rows] = h
    return out, from_mlx(final.astype(_mx_dtype(initial_state.dtype)))


def fused_recurrent_gated_delta_rule(q, k, v, g, beta=None, scale=None, initial_state=None,
                                     inplace_final_state=True, cu_seqlens=None,
                                     ssm_state_indices=None, num_accepted_tokens=None,
                                     use_qk_l2norm_in_kernel=False):
    """FLA's fused_recurrent_gated_delta_rule for decode (one token per sequence): g, beta
    [B, T, HV]. The state rows at ssm_state_indices (<= 0: skipped, output zeros) are read and,
    with inplace_final_state, written back in place. Returns (o [B, T, HV, V], state)."""
    gm = _mx(g).reshape(-1, *g.shape[2:]).astype(F32)
    bm = mx.ones(gm.shape[:2], dtype=F32) if beta is None else \
        _mx(beta).reshape(-1, beta.shape[2]).astype(F32)
    return _decode(q, k, v, gm, bm, scale, initial_state, inplace_final_state, cu_seqlens,
                   ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel)


def fused_sigmoid_gating_delta_rule_update(A_log, a, b, dt_bias, q, k, v, beta=1.0,
                                           threshold=20.0, scale=None, initial_state=None,
                                           inplace_final_state=True, cu_seqlens=None,
                                           ssm_state_indices=None, num_accepted_tokens=None,
                                           use_qk_l2norm_in_kernel=False, is_kda=False):
    """The recurrent step with the gating fused in: g = -exp(A_log) softplus(a + dt_bias),
    beta = sigmoid(b); a, b [T, HV] (one row per token)."""
    if is_kda:
        raise NotImplementedError("fused_sigmoid_gating_delta_rule_update(is_kda=True) on mlx")
    heads = v.shape[2]
    g = _gate(A_log, _mx(a).reshape(-1, heads), dt_bias, beta, threshold)
    gate = mx.sigmoid(_mx(b).reshape(-1, heads).astype(F32))
    return _decode(q, k, v, g, gate, scale, initial_state, inplace_final_state, cu_seqlens,
                   ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel)


def _split_qkv(mixed: mx.array, key_heads: int, head_k: int, value_heads: int, head_v: int):
    """[L, 2 H K + HV V] -> q, k [L, H, K], v [L, HV, V] (the conv output's packing)."""
    length = mixed.shape[0]
    qk = key_heads * head_k
    q = mixed[:, :qk].reshape(length, key_heads, head_k)
    k = mixed[:, qk: 2 * qk].reshape(length, key_heads, head_k)
    v = mixed[:, 2 * qk:].reshape(length, value_heads, head_v)
    return q, k, v


def fused_recurrent_gated_delta_rule_packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale,
                                                   initial_state, out, ssm_state_indices,
                                                   use_qk_l2norm_in_kernel=False):
    """Decode straight from the conv output: mixed_qkv [B, 2 H K + HV V], a, b [B, HV];
    state rows at ssm_state_indices [B] updated in place; o written into out [B, 1, HV, V]
    (zeros for null rows). Returns (out, initial_state)."""
    heads, vdim, kdim = initial_state.shape[-3:]
    batch = mixed_qkv.shape[0]
    key_heads = (mixed_qkv.shape[1] - heads * vdim) // (2 * kdim)
    q, k, v = _split_qkv(_mx(mixed_qkv), key_heads, kdim, heads, vdim)
    g = _gate(A_log, _mx(a), dt_bias)
    gate = mx.sigmoid(_mx(b).astype(F32))
    slots = _state_index(ssm_state_indices, batch)
    live = np.flatnonzero(slots > 0)
    rows = mx.array(live.astype(np.int32))
    h = _mx(initial_state)[mx.array(slots[live].astype(np.int32))].astype(F32)
    o, h = _recurrent_step(q[rows], k[rows], v[rows], g[rows], gate[rows], h, scale,
                           use_qk_l2norm_in_kernel)
    result = mx.zeros((batch, heads, vdim), dtype=F32)
    if live.size:
        result[rows] = o
    _write_rows(initial_state, slots[live], h)
    out.copy_(from_mlx(result.astype(_mx_dtype(out.dtype)).reshape(out.shape)))
    return out, initial_state


# --- gating and split helpers --------------------------------------------------------------


def fused_post_conv_prep(conv_output, a, b, A_log, dt_bias, num_k_heads, head_k_dim,
                         head_v_dim, apply_l2norm=True, output_g_exp=False):
    """Split the conv output [L, 2 H K + HV V] into q, k [L, H, K] (l2-normalised if asked) and
    v [L, HV, V] in its dtype, and compute g (exp(g) if output_g_exp) and beta = sigmoid(b),
    [L, HV] float32."""
    heads = A_log.shape[0]
    q, k, v = _split_qkv(_mx(conv_output), num_k_heads, head_k_dim, heads, head_v_dim)
    dtype = q.dtype
    if apply_l2norm:
        q = _l2norm(q.astype(F32)).astype(dtype)
        k = _l2norm(k.astype(F32)).astype(dtype)
    g = _gate(A_log, _mx(a), dt_bias)
    if output_g_exp:
        g = mx.exp(g)
    beta = mx.sigmoid(_mx(b).astype(F32))
    return tuple(from_mlx(mx.contiguous(x)) for x in (q, k, v, g, beta))


def fused_olmo_hybrid_gdn_gating(A_log, a, b, dt_bias, allow_neg_eigval=False, beta=1.0,
                                 threshold=20.0):
    """OLMo-Hybrid's gating: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) (x 2
    with allow_neg_eigval); a, b [T, HV] -> [1, T, HV] float32 each."""
    g = _gate(A_log, _mx(a), dt_bias, beta, threshold)
    gate = mx.sigmoid(_mx(b).astype(F32))
    if allow_neg_eigval:
        gate = gate * 2.0
    return from_mlx(g[None]), from_mlx(gate[None])


def l2norm_fwd(x, eps=1e-6, output_dtype=None):
    """FLA's l2norm over the last axis."""
    y = _l2norm(_mx(x).astype(F32), eps)
    return from_mlx(y.astype(_mx_dtype(output_dtype or x.dtype)))


# --- installation -------------------------------------------------------------------------


def set_triton_allocator(device) -> None:
    """OLMo-Hybrid's layer gives Triton a scratch allocator at construction; no Triton kernel
    runs on mlx (and without Triton vLLM's placeholder module has no set_allocator)."""

_FLA = "vllm.third_party.flash_linear_attention.ops"
_KERNELS = {
    "chunk_gated_delta_rule": chunk_gated_delta_rule,
    "fla_chunk_gated_delta_rule": chunk_gated_delta_rule,  # Qwen's alias
    "fused_recurrent_gated_delta_rule": fused_recurrent_gated_delta_rule,
    "fused_recurrent_gated_delta_rule_packed_decode":
        fused_recurrent_gated_delta_rule_packed_decode,
    "fused_sigmoid_gating_delta_rule_update": fused_sigmoid_gating_delta_rule_update,
    "fused_post_conv_prep": fused_post_conv_prep,
    "fused_olmo_hybrid_gdn_gating": fused_olmo_hybrid_gdn_gating,
    "l2norm_fwd": l2norm_fwd,
    "causal_conv1d_fn": causal_conv1d_fn,
    "causal_conv1d_update": causal_conv1d_update,
    "set_triton_allocator": set_triton_allocator,
}

# modules that hold (by import) the kernels' names; rebinding there is what the layers see
_MODULES = (
    _FLA,
    f"{_FLA}.chunk",
    f"{_FLA}.fused_recurrent",
    f"{_FLA}.fused_sigmoid_gating",
    f"{_FLA}.fused_gdn_prefill_post_conv",
    "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn",
    "vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn",
)


def install() -> None:
    rebind(_MODULES, _KERNELS)
