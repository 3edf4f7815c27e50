"""Mamba layers' kernels on "mlx": causal conv1d, the selective scan (Mamba-1), the SSD chunk
scan (Mamba-2) and the one-token state update, in MLX.

vLLM's mixers (layers/mamba/mamba_mixer*.py) run as custom ops outside the compiled graph and
call these kernels by the names they imported at module load; vLLM's own implementations are
Triton/CUDA kernels, or C++ ones that load only on its CPU platform. ``install()`` rebinds those
names in the kernel modules and in every mixer module to the functions here, which keep the
kernels' contract: varlen batches described by ``query_start_loc``, one state row per request
(``cache_indices``; ``null_block_id`` marks padding, never read or written), initial state where
``has_initial_state`` says, outputs returned or written into ``out`` in place, and the per-layer
state tensors (slices of vLLM's Mamba cache) updated in place.

State rows are read as MLX views of the cache and written back row by row (``_write_rows``):
O(rows written), never a copy of the cache. Every scan runs in float32 as vLLM's kernels do.
"""

import mlx.core as mx
import numpy as np
import torch

from torch_mlx import _C, from_mlx, to_mlx

from .library import cpu_backend, rebind

NULL_BLOCK_ID = 0  # vllm.v1.attention.backends.utils.NULL_BLOCK_ID (block 0 is the null block)
PAD_SLOT_ID = -1

# Tokens per step of the Mamba-1 prefill scan: within a chunk the recurrence is an associative
# scan (log2(chunk) MLX steps over [chunk, dim, dstate]); chunks run in sequence, carrying the
# state. Bounds the scan's memory at chunk * dim * dstate floats whatever the prompt length.
SCAN_CHUNK = 64
# Mamba-2 prefill: chunks whose [heads, chunk, chunk] products are computed together, by the
# products' element count (2^25 floats: 128 MiB per array), so a long prefill's memory stays
# bounded; the chunk-to-chunk state recurrence runs over all chunks first.
SSD_GROUP_ELEMENTS = 1 << 25


def _host(tensor: torch.Tensor | None) -> np.ndarray | None:
    """The values of a small index/flag tensor (host data from vLLM's runner), as numpy."""
    if tensor is None:
        return None
    if tensor.device.type == "mlx":
        tensor = _C.cpu_alias(tensor)
    return tensor.numpy()


def _mx(tensor: torch.Tensor | None) -> mx.array | None:
    if tensor is None:
        return None
    return to_mlx(tensor) if tensor.device.type == "mlx" else mx.array(tensor.numpy())


def _state_index(indices: torch.Tensor | None, batch: int) -> np.ndarray:
    """One state row per request: ``indices`` [batch] or [batch, 1] (no speculative slots)."""
    if indices is None:
        return np.arange(batch, dtype=np.int64)
    host = _host(indices)
    if host.ndim == 2:
        if host.shape[1] != 1:
            raise NotImplementedError("speculative decoding (several state slots per request) "
                                      "with Mamba layers is not supported on mlx")
        host = host[:, 0]
    return host[:batch].astype(np.int64)


def _write_rows(state: torch.Tensor, index: np.ndarray, rows: mx.array) -> None:
    """``state[index[i]] = rows[i]`` in place, evaluated now. ``state`` is a view into vLLM's
    Mamba cache (any strides and offset)."""
    if index.size == 0:
        return
    rows = rows.astype(_mx_dtype(state.dtype))
    if state.is_contiguous() and state.storage_offset() == 0:
        # the cache's own buffer, lent to an MLX scatter on the default device (no CPU work)
        result = _C.scatter_in_place(
            state, [mx.array(index.astype(np.int32))],
            rows.reshape(rows.shape[0], 1, *rows.shape[1:]), [0])
        if result is not None:
            mx.eval(result)
            return
    # Otherwise through the host alias of the same bytes (unified memory): the rows are
    # evaluated first, and on a GPU its queue drained, so no kernel still reads the old rows.
    rows = mx.contiguous(rows)
    mx.eval(rows)
    if not cpu_backend():
        mx.synchronize()
    _C.cpu_alias(state)[torch.from_numpy(index)] = _C.cpu_alias(from_mlx(rows))


_DTYPES = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


def _mx_dtype(dtype: torch.dtype):
    if dtype not in _DTYPES:
        raise NotImplementedError(f"Mamba state dtype {dtype} is not supported on mlx")
    return _DTYPES[dtype]


def _silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def _softplus(x: mx.array) -> mx.array:
    return mx.logaddexp(x, mx.array(0.0, dtype=x.dtype))


def _activation(activation) -> bool:
    """Whether the conv applies SiLU (vLLM passes "silu"/"swish", True, None or False)."""
    if isinstance(activation, bool) or activation is None:
        return bool(activation)
    if activation not in ("silu", "swish"):
        raise NotImplementedError(f"causal_conv1d activation {activation!r} on mlx")
    return True


def _check_no_prefix_caching(**kwargs) -> None:
    for name, value in kwargs.items():
        if value is not None:
            raise NotImplementedError(
                f"{name}: Mamba prefix caching (mamba_cache_mode='align') is not supported on "
                "mlx; run with enable_prefix_caching=False")


# --- causal conv1d -------------------------------------------------------------------------


def causal_conv1d_fn(x, weight, bias, conv_states, query_start_loc, cache_indices=None,
                     has_initial_state=None, activation="silu", pad_slot_id=PAD_SLOT_ID,
                     null_block_id=NULL_BLOCK_ID, block_idx_first_scheduled_token=None,
                     block_idx_last_scheduled_token=None, initial_state_idx=None,
                     num_computed_tokens=None, block_size_to_align=0, metadata=None,
                     validate_data=False):
    """Depthwise causal conv over the packed prefill tokens x [dim, T] (weight [dim, width]),
    each sequence continuing from its conv state where ``has_initial_state``; each sequence's
    last width - 1 inputs become its new conv state. Returns [dim, T] in x's dtype."""
    _check_no_prefix_caching(block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                             block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                             initial_state_idx=initial_state_idx)
    silu = _activation(activation)
    dim, total = x.shape
    width = weight.shape[1]
    state_len = width - 1
    if conv_states.shape[-1] != state_len:
        raise NotImplementedError(f"conv state of length {conv_states.shape[-1]} for a conv of "
                                  f"width {width} on mlx")
    starts = _host(query_start_loc).astype(np.int64)
    batch = len(starts) - 1
    slots = _state_index(cache_indices, batch)
    valid = (slots != null_block_id) & (slots != pad_slot_id)
    has_init = np.zeros(batch, bool) if has_initial_state is None else \
        _host(has_initial_state)[:batch].astype(bool)
    has_init &= valid

    state_dtype = _mx_dtype(conv_states.dtype)
    xt = _mx(x).T.astype(state_dtype)  # [T, dim], in the state's dtype as vLLM's kernel
    # Each sequence's initial inputs (its conv state, or zeros) ahead of the tokens: one table
    # [batch * state_len + T, dim] that every window indexes into.
    init = mx.zeros((batch, state_len, dim), dtype=state_dtype)
    if has_init.any():
        rows = np.flatnonzero(has_init)
        saved = _mx(conv_states)[mx.array(slots[rows].astype(np.int32))]  # [n, dim, state_len]
        init[mx.array(rows.astype(np.int32))] = saved.swapaxes(1, 2)
    table = mx.concatenate([init.reshape(batch * state_len, dim), xt[: starts[-1]]])

    def position(token: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """Row of ``table`` holding absolute input position ``token`` of sequence ``seq``
        (positions before the sequence's start are its initial state's)."""
        back = starts[seq] - token  # > 0: inside the initial state
        return np.where(back > 0, seq * state_len + state_len - back,
                        batch * state_len + token)

    seq_of = np.repeat(np.arange(batch), np.diff(starts))
    tokens = np.arange(starts[-1])
    window = tokens[:, None] - state_len + np.arange(width)[None, :]  # [T, width]
    gathered = table[mx.array(position(window, seq_of[:, None]).astype(np.int32))]
    w = _mx(weight)
    out = (gathered.astype(w.dtype) * w.T[None]).sum(axis=1)  # [T, dim]
    if bias is not None:
        out = out + _mx(bias)
    if silu:
        out = _silu(out)
    out = out.astype(_mx_dtype(x.dtype))
    if starts[-1] < total:  # tokens past the last sequence (padding): zeros
        out = mx.concatenate([out, mx.zeros((total - starts[-1], dim), dtype=out.dtype)])

    keep = np.flatnonzero(valid & (np.diff(starts) > 0))
    if keep.size:
        last = starts[1:][keep, None] - state_len + np.arange(state_len)[None, :]
        new_state = table[mx.array(position(last, keep[:, None]).astype(np.int32))]
        _write_rows(conv_states, slots[keep], new_state.swapaxes(1, 2))
    return from_mlx(out).T


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None, num_accepted_tokens=None, query_start_loc=None,
                         max_query_len=-1, null_block_id=NULL_BLOCK_ID,
                         block_idx_last_scheduled_token=None, initial_state_idx=None,
                         validate_data=False, out=None, pad_slot_id=None):
    """One decode token per request: x [batch, dim]; conv_state[idx] [dim, width - 1] is the
    window's past, shifted left by the new input. Returns the conv output [batch, dim] (also
    written into ``out`` when given)."""
    _check_no_prefix_caching(block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                             initial_state_idx=initial_state_idx)
    if num_accepted_tokens is not None or x.dim() != 2:
        raise NotImplementedError("causal_conv1d_update with several tokens per request "
                                  "(speculative decoding) is not supported on mlx")
    if query_start_loc is not None:
        starts = _host(query_start_loc)
        if not (np.diff(starts.astype(np.int64)) <= 1).all():
            raise NotImplementedError("causal_conv1d_update with several tokens per request "
                                      "is not supported on mlx")
    silu = _activation(activation)
    batch, dim = x.shape
    width = weight.shape[1]
    if conv_state.shape[-1] != width - 1:
        raise NotImplementedError(f"conv state of length {conv_state.shape[-1]} for a conv of "
                                  f"width {width} on mlx")
    null = null_block_id if pad_slot_id is None else pad_slot_id
    slots = _state_index(conv_state_indices, batch)
    valid = slots != null
    state_dtype = _mx_dtype(conv_state.dtype)
    past = _mx(conv_state)[mx.array(np.where(valid, slots, 0).astype(np.int32))]
    window = mx.concatenate([past, _mx(x).astype(state_dtype)[:, :, None]], axis=2)
    w = _mx(weight)
    y = (window.astype(w.dtype) * w[None]).sum(axis=2)
    if bias is not None:
        y = y + _mx(bias)
    if silu:
        y = _silu(y)
    y = y.astype(_mx_dtype(x.dtype))
    keep = np.flatnonzero(valid)
    _write_rows(conv_state, slots[keep], window[mx.array(keep.astype(np.int32)), :, 1:])
    result = from_mlx(y)
    if out is not None:
        out.copy_(result)
        return out
    return result


# --- Mamba-1 selective scan ----------------------------------------------------------------


def _associative_scan(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """Inclusive scan of h_t = a_t * h_{t-1} + b_t along axis 0 from h_{-1} = 0: returns
    (prod_{s<=t} a_s, h_t). Hillis-Steele: log2(len) steps, each combining every element with
    the one 2^k before it."""
    k = 1
    n = a.shape[0]
    while k < n:
        pad_a = mx.ones((k, *a.shape[1:]), dtype=a.dtype)
        pad_b = mx.zeros((k, *b.shape[1:]), dtype=b.dtype)
        b = a * mx.concatenate([pad_b, b[:-k]]) + b
        a = a * mx.concatenate([pad_a, a[:-k]])
        k *= 2
    return a, b


def selective_scan_fn(u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, query_start_loc=None, cache_indices=None,
                      has_initial_state=None, null_block_id=NULL_BLOCK_ID, block_size=1024,
                      block_idx_first_scheduled_token=None, block_idx_last_scheduled_token=None,
                      initial_state_idx=None, cu_chunk_seqlen=None, last_chunk_indices=None):
    """Mamba-1's selective scan over packed prefill tokens (varlen: u, delta, z [dim, T];
    B, C [ngroups, dstate, T] or [dstate, T]; A [dim, dstate]):
        h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   y_t = C_t h_t + D u_t,
    y *= silu(z). Each sequence starts from ssm_states[cache_indices[i]] where
    has_initial_state[i] (else zeros) and its final state is stored there. Returns y [dim, T]
    in z's (else delta's) dtype, as vLLM's kernel, which writes it into z or delta."""
    _check_no_prefix_caching(block_idx_first_scheduled_token=block_idx_first_scheduled_token,
                             block_idx_last_scheduled_token=block_idx_last_scheduled_token,
                             initial_state_idx=initial_state_idx)
    if query_start_loc is None or u.dim() != 2:
        raise NotImplementedError("selective_scan_fn on mlx takes varlen (2-D) inputs with "
                                  "query_start_loc")
    dim, total = u.shape
    dstate = A.shape[-1]
    starts = _host(query_start_loc).astype(np.int64)
    batch = len(starts) - 1
    slots = _state_index(cache_indices, batch)
    valid = slots != null_block_id
    has_init = np.zeros(batch, bool) if has_initial_state is None else \
        _host(has_initial_state)[:batch].astype(bool)
    has_init &= valid

    f32 = mx.float32
    ut = _mx(u).T.astype(f32)  # [T, dim]
    dt = _mx(delta).T.astype(f32)
    if delta_bias is not None:
        dt = dt + _mx(delta_bias).astype(f32)
    if delta_softplus:
        dt = _softplus(dt)
    a_log = _mx(A).astype(f32)  # [dim, dstate]
    groups = 1 if B.dim() == 2 else B.shape[0]
    # [T, groups, dstate] -> per channel [T, dim, dstate] by broadcasting groups
    Bt = _mx(B).reshape(groups, dstate, total).transpose(2, 0, 1).astype(f32)
    Ct = _mx(C).reshape(groups, dstate, total).transpose(2, 0, 1).astype(f32)

    def per_channel(m: mx.array) -> mx.array:  # [L, groups, dstate] -> [L, dim|1, dstate]
        if groups == 1:
            return m
        return mx.repeat(m, dim // groups, axis=1)

    h0 = None
    if has_init.any():
        rows = np.flatnonzero(has_init)
        h0 = _mx(ssm_states)[mx.array(slots[rows].astype(np.int32))].astype(f32)
        h0 = h0.reshape(len(rows), dim, dstate)
        init_pos = starts[rows]
    nonempty = np.flatnonzero(np.diff(starts) > 0)
    last_pos = starts[1:][nonempty] - 1
    is_start = np.zeros(total, bool)
    is_start[starts[:-1][np.diff(starts) > 0]] = True

    ys, finals, final_seq = [], [], []
    carry = mx.zeros((dim, dstate), dtype=f32)
    for lo in range(0, int(starts[-1]), SCAN_CHUNK):
        hi = min(lo + SCAN_CHUNK, int(starts[-1]))
        a = mx.exp(dt[lo:hi, :, None] * a_log)  # [L, dim, dstate]
        b = (dt[lo:hi] * ut[lo:hi])[:, :, None] * per_channel(Bt[lo:hi])
        if h0 is not None:
            inside = np.flatnonzero((init_pos >= lo) & (init_pos < hi))
            if inside.size:  # a sequence continuing its saved state: b_s += a_s h0
                local = mx.array((init_pos[inside] - lo).astype(np.int32))
                b = b.at[local].add(a[local] * h0[mx.array(inside.astype(np.int32))])
        starts_here = is_start[lo:hi]
        if starts_here.any():  # nothing flows into a sequence's first token from before it
            a = a * mx.array((~starts_here).astype(np.float32))[:, None, None]
        prefix, h = _associative_scan(a, b)
        h = h + prefix * carry
        carry = h[-1]
        ys.append((h * per_channel(Ct[lo:hi])).sum(axis=2))
        ending = np.flatnonzero((last_pos >= lo) & (last_pos < hi) & valid[nonempty])
        if ending.size:
            finals.append(h[mx.array((last_pos[ending] - lo).astype(np.int32))])
            final_seq.extend(nonempty[ending].tolist())
    y = mx.concatenate(ys) if ys else mx.zeros((0, dim), dtype=f32)
    if D is not None:
        y = y + _mx(D).astype(f32) * ut[: y.shape[0]]
    if z is not None:
        y = y * _silu(_mx(z).T[: y.shape[0]].astype(f32))
    out_dtype = (z if z is not None else delta).dtype
    y = y.astype(_mx_dtype(out_dtype))
    if y.shape[0] < total:
        y = mx.concatenate([y, mx.zeros((total - y.shape[0], dim), dtype=y.dtype)])
    if finals:
        _write_rows(ssm_states, slots[np.array(final_seq)],
                    mx.concatenate(finals).reshape(len(final_seq), *ssm_states.shape[1:]))
    return from_mlx(y).T


# --- Mamba-2 SSD chunk scan ---------------------------------------------------------------


def _chunks(starts: np.ndarray, chunk_size: int):
    """Chunks of at most chunk_size tokens that never cross a sequence: (token index [nc, L],
    padding pointing at row T; sequence of each chunk; chunk's position in its sequence)."""
    rows, seq_of, rank = [], [], []
    pad = int(starts[-1])
    for seq in range(len(starts) - 1):
        for k, lo in enumerate(range(int(starts[seq]), int(starts[seq + 1]), chunk_size)):
            hi = min(lo + chunk_size, int(starts[seq + 1]))
            rows.append(np.concatenate([np.arange(lo, hi),
                                        np.full(chunk_size - (hi - lo), pad)]))
            seq_of.append(seq)
            rank.append(k)
    return (np.stack(rows).astype(np.int32) if rows else np.zeros((0, chunk_size), np.int32),
            np.array(seq_of, np.int64), np.array(rank, np.int64))


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, out, D=None, z=None, dt_bias=None,
                              initial_states=None, return_intermediate_states=False,
                              seq_idx=None, cu_seqlens=None, cu_chunk_seqlens=None,
                              last_chunk_indices=None, dt_softplus=False,
                              dt_limit=(0.0, float("inf")), state_dtype=None):
    """Mamba-2's selective scan (scalar decay per head) over packed prefill tokens, the SSD way:
    within a chunk the output is a masked, decayed attention-like product (C_t B_s) e^(cum_t -
    cum_s) dt_s x_s, whose exponents are never positive; across chunks the states are carried
    one chunk step at a time (all sequences together). x [T, H, P]; dt [T, H]; A [H];
    B, C [T, G, N]; D [H] or [H, P]; z like x; initial_states [batch, H, P, N] or None.
    Writes y into ``out`` [T, H, P] in place; returns each sequence's final state
    [batch, H, P, N] in ``state_dtype`` (else C's dtype)."""
    if return_intermediate_states:
        raise NotImplementedError("return_intermediate_states (Mamba prefill checkpoints for "
                                  "prefix caching) is not supported on mlx")
    total, heads, hdim = x.shape
    groups, dstate = B.shape[1], B.shape[2]
    starts = _host(cu_seqlens).astype(np.int64)
    batch = len(starts) - 1
    f32 = mx.float32

    dtm = _mx(dt).astype(f32)
    if dt_bias is not None:
        dtm = dtm + _mx(dt_bias).astype(f32)
    if dt_softplus:
        dtm = _softplus(dtm)
    if dt_limit[0] > 0.0 or dt_limit[1] < float("inf"):
        dtm = mx.clip(dtm, dt_limit[0], dt_limit[1])

    index, seq_of, rank = _chunks(starts, chunk_size)
    nc, L = index.shape
    idx = mx.array(index)

    def chunked(m: mx.array) -> mx.array:  # [T, ...] -> [nc, L, ...], padding rows zero
        m = mx.concatenate([m[: starts[-1]], mx.zeros((1, *m.shape[1:]), dtype=m.dtype)])
        return m[idx]

    xc = chunked(_mx(x).astype(f32))  # [nc, L, H, P]
    dtc = chunked(dtm)  # [nc, L, H]; 0 on padding: neither decay nor input there
    Bc = chunked(_mx(B).astype(f32))  # [nc, L, G, N]
    Cc = chunked(_mx(C).astype(f32))
    if groups != heads:
        Bc = mx.repeat(Bc, heads // groups, axis=2)
        Cc = mx.repeat(Cc, heads // groups, axis=2)
    Bh = Bc.transpose(0, 2, 1, 3)  # [nc, H, L, N]
    Ch = Cc.transpose(0, 2, 1, 3)
    xh = xc.transpose(0, 2, 1, 3)  # [nc, H, L, P]
    cum = mx.cumsum(dtc * _mx(A).astype(f32), axis=1).transpose(0, 2, 1)  # [nc, H, L]
    dth = dtc.transpose(0, 2, 1)  # [nc, H, L]

    # each chunk's own contribution to the state at its end, then the states entering chunks
    to_end = mx.exp(cum[:, :, -1:] - cum) * dth  # [nc, H, L]
    local = (xh * to_end[..., None]).swapaxes(2, 3) @ Bh  # [nc, H, P, N]
    chunk_decay = mx.exp(cum[:, :, -1])  # [nc, H]
    h = mx.zeros((batch, heads, hdim, dstate), dtype=f32)
    if initial_states is not None:
        h = _mx(initial_states).astype(f32).reshape(batch, heads, hdim, dstate)
    order, entering = [], []  # chunk ids by (rank, sequence), and the states entering them
    for k in range(int(rank.max()) + 1 if nc else 0):
        ids = np.flatnonzero(rank == k)  # the k-th chunk of every sequence that has one
        seqs = mx.array(seq_of[ids].astype(np.int32))
        cid = mx.array(ids.astype(np.int32))
        h_in = h[seqs]
        entering.append(h_in)
        order.append(ids)
        h[seqs] = chunk_decay[cid][:, :, None, None] * h_in + local[cid]
    if nc:
        back = mx.array(np.argsort(np.concatenate(order)).astype(np.int32))
        h_in = mx.concatenate(entering)[back]  # [nc, H, P, N], in chunk order

    # Outputs, a few chunks at a time (the [H, L, L] products dominate the memory):
    # y_t = sum_{s <= t} (C_t . B_s) e^(cum_t - cum_s) dt_s x_s + C_t . e^(cum_t) h_in
    causal = mx.array(np.tril(np.ones((L, L), bool)))
    per_group = max(1, SSD_GROUP_ELEMENTS // (heads * L * L))
    ys = []
    for lo in range(0, nc, per_group):
        part = slice(lo, min(lo + per_group, nc))
        c = cum[part]
        gap = c[:, :, :, None] - c[:, :, None, :]  # [g, H, t, s]
        decay = mx.exp(mx.where(causal, gap, -mx.inf))
        scores = (Ch[part] @ Bh[part].swapaxes(2, 3)) * decay * dth[part][:, :, None, :]
        y_part = scores @ xh[part] + (Ch[part] @ h_in[part].swapaxes(2, 3)) * mx.exp(c)[..., None]
        mx.eval(y_part)
        ys.append(y_part)
    y = mx.concatenate(ys) if ys else mx.zeros((0, heads, L, hdim), dtype=f32)
    y = y.transpose(0, 2, 1, 3).reshape(nc * L, heads, hdim)  # back to token order
    y = y[mx.array(np.flatnonzero(index.reshape(-1) < starts[-1]).astype(np.int32))]
    xt = _mx(x).astype(f32)[: starts[-1]]
    if D is not None:
        d = _mx(D).astype(f32)
        y = y + (d[:, None] if d.ndim == 1 else d) * xt
    if z is not None:
        y = y * _silu(_mx(z).astype(f32)[: starts[-1]])
    y = y.astype(_mx_dtype(out.dtype))
    if starts[-1] < total:
        out[: starts[-1]].copy_(from_mlx(y))
    else:
        out.copy_(from_mlx(y))
    final_dtype = state_dtype if state_dtype is not None else C.dtype
    return from_mlx(h.astype(_mx_dtype(final_dtype)))


def mamba_chunk_scan_combined_varlen(x, dt, A, B, C, chunk_size, cu_seqlens, cu_chunk_seqlens,
                                     last_chunk_indices, seq_idx, out, D=None, z=None,
                                     dt_bias=None, initial_states=None, dt_softplus=False,
                                     dt_limit=(0.0, float("inf")),
                                     return_intermediate_states=False, state_dtype=None):
    """vLLM's varlen entry point (ssd_combined.mamba_chunk_scan_combined_varlen)."""
    return mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, out, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, return_intermediate_states=return_intermediate_states,
        seq_idx=seq_idx, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
        last_chunk_indices=last_chunk_indices, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_dtype=state_dtype)


# --- one-token state update (Mamba-1 and Mamba-2 decode) ------------------------------------


def selective_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, z=None,
                           dt_softplus=False, state_batch_indices=None,
                           dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID, out=None,
                           num_accepted_tokens=None, cu_seqlens=None, is_blackwell=False,
                           enable_stochastic_rounding=False, cache_philox_rounds=0):
    """One recurrence step per request, in place: state [slots, dim, dstate] or
    [slots, nheads, headdim, dstate]; x, dt, z [batch, (nheads,) dim]; A [(nheads,) dim,
    dstate]; B, C [batch, (ngroups,) dstate]; D, dt_bias [(nheads,) dim]. Writes y into ``out``
    and the new state at dst_state_batch_indices (else the source rows)."""
    if num_accepted_tokens is not None or (
            cu_seqlens is not None
            and not (np.diff(_host(cu_seqlens).astype(np.int64)) <= 1).all()):
        raise NotImplementedError("selective_state_update with several tokens per request "
                                  "(speculative decoding) is not supported on mlx")
    if enable_stochastic_rounding:
        raise NotImplementedError("enable_stochastic_rounding (Mamba state) on mlx")
    if out is None:
        raise NotImplementedError("selective_state_update without a preallocated out on mlx")
    f32 = mx.float32
    heads_form = state.dim() == 4
    batch = x.shape[0]
    dstate = state.shape[-1]

    def as4(t, n):  # add the heads axis Mamba-1 lacks
        m = _mx(t)
        return m if heads_form else m.reshape(*m.shape[:n], 1, *m.shape[n:])

    xs = as4(x, 1).astype(f32)  # [b, H, P]
    dts = as4(dt, 1).astype(f32)
    if dt_bias is not None:
        dts = dts + as4(dt_bias, 0).astype(f32)
    if dt_softplus:
        dts = _softplus(dts)
    a_log = as4(A, 0).astype(f32)  # [H, P, N]
    heads = xs.shape[1]
    Bs = _mx(B).reshape(batch, -1, dstate).astype(f32)  # [b, G, N]
    Cs = _mx(C).reshape(batch, -1, dstate).astype(f32)
    if Bs.shape[1] != heads:
        Bs = mx.repeat(Bs, heads // Bs.shape[1], axis=1)
        Cs = mx.repeat(Cs, heads // Cs.shape[1], axis=1)

    src = _state_index(state_batch_indices, batch)
    dst = src if dst_state_batch_indices is None else \
        _state_index(dst_state_batch_indices, batch)
    valid = src != null_block_id
    h = _mx(state)[mx.array(np.where(valid, src, 0).astype(np.int32))].astype(f32)
    h = h.reshape(batch, heads, -1, dstate)
    h = mx.exp(dts[..., None] * a_log) * h + (dts * xs)[..., None] * Bs[:, :, None, :]
    y = (h * Cs[:, :, None, :]).sum(axis=3)  # [b, H, P]
    if D is not None:
        y = y + as4(D, 0).astype(f32) * xs
    if z is not None:
        y = y * _silu(as4(z, 1).astype(f32))
    y = y.astype(_mx_dtype(out.dtype)).reshape(out.shape)
    keep = np.flatnonzero(valid & (dst != null_block_id))
    _write_rows(state, dst[keep], h[mx.array(keep.astype(np.int32))].reshape(
        len(keep), *state.shape[1:]))
    out.copy_(from_mlx(y))
    return out


# --- installation -------------------------------------------------------------------------

_KERNELS = {
    "causal_conv1d_fn": causal_conv1d_fn,
    "causal_conv1d_update": causal_conv1d_update,
    "selective_scan_fn": selective_scan_fn,
    "selective_state_update": selective_state_update,
    "mamba_chunk_scan_combined_varlen": mamba_chunk_scan_combined_varlen,
    "_mamba_chunk_scan_combined_fwd": mamba_chunk_scan_combined,
}

# modules that hold (by import) the kernels' names; rebinding there is what the mixers see
_MODULES = (
    "vllm.model_executor.layers.mamba.ops.causal_conv1d",
    "vllm.model_executor.layers.mamba.ops.mamba_ssm",
    "vllm.model_executor.layers.mamba.ops.ssu_dispatch",
    "vllm.model_executor.layers.mamba.ops.ssd_combined",
    "vllm.model_executor.layers.mamba.mamba_mixer",
    "vllm.model_executor.layers.mamba.mamba_mixer2",
)


def install() -> None:
    rebind(_MODULES, _KERNELS)
