"""Sparse MLA (DeepSeek-V3.2's indexer + top-k MLA) on MLX against float64 references (torch).

Batches mix decodes with prefills that have earlier context and prefills without, blocks
scattered over the caches; top-k both smaller than most contexts and larger than all of them
(rows with fewer candidates than k: all of 0..p, then -1). The indexer is checked through its
op (the key written into the cache in place, the buffer filled) over two steps: a batch of
prefills, then decodes that read the keys the first step wrote.
"""
import types

import numpy as np
import pytest
import torch

import torch_mlx
from vllm.v1.attention.backend import AttentionType

from vllm_metal.attention.sparse_mla import MLXSparseMLAImpl
from vllm_metal.attention.mla import MLXMLAMetadata
from vllm_metal.ops import sparse_indexer

from test_attention import BLOCK_SIZE, place_requests

INDEX_HEADS, INDEX_DIM = 8, 32
HEADS, LORA, NOPE, ROPE, V_DIM = 4, 32, 16, 8, 24
# (context already cached, new tokens); decodes first, as vLLM orders a batch
REQUESTS = [(37, 1), (5, 1), (64, 1), (0, 23), (40, 9), (17, 30), (0, 1)]
NUM_DECODES = 3
NUM_BLOCKS = 64


def metadata(requests, block_table, slots, num_decodes):
    query_start = np.cumsum([0] + [n for _, n in requests])
    return MLXMLAMetadata(
        num_actual_tokens=int(query_start[-1]), num_decodes=num_decodes,
        query_start=query_start, seq_lens=np.array([c + n for c, n in requests]),
        block_table=torch_mlx.to_mlx(block_table.to("mlx")),
        slot_mapping=torch.cat(slots).to("mlx"), block_size=BLOCK_SIZE,
        num_prefills=len(requests) - num_decodes, num_decode_tokens=num_decodes)


def check_topk_row(row, q, weights, keys, position, topk):
    """row: the op's [topk] positions for a query at ``position`` scoring keys[0..position].
    A top-k of the float64 scores sum_h w_h relu(q_h . k_s): ascending distinct causal
    positions, then -1, as many as min(topk, position + 1), none scoring below an unchosen
    position (beyond float32 rounding: near-ties may go either way)."""
    logits = (weights[:, None] * (q @ keys[: position + 1].T).clamp(min=0)).sum(0)
    count = min(topk, position + 1)
    chosen = row[:count]
    assert row[count:] == [-1] * (topk - count), row
    assert chosen == sorted(set(chosen)) and 0 <= chosen[0] and chosen[-1] <= position, row
    rest = sorted(set(range(position + 1)) - set(chosen))
    if rest:
        assert float(logits[chosen].min()) >= float(logits[rest].max()) - 1e-5, row


def run_indexer(requests, num_decodes, keys_by_request, queries, weights, k_cache, block_table,
                request_slots, topk, monkeypatch):
    """One step through vllm_metal::sparse_attn_indexer: writes each request's new keys,
    returns the [T, topk] buffer rows."""
    slots = [s[c:] for s, (c, _) in zip(request_slots, requests)]
    md = metadata(requests, block_table, slots, num_decodes)
    monkeypatch.setattr(sparse_indexer, "get_forward_context",
                        lambda: types.SimpleNamespace(attn_metadata={"indexer": md}))
    new_keys = torch.cat([k[c:] for k, (c, _) in zip(keys_by_request, requests)])
    num_tokens = md.num_actual_tokens
    buffer = torch.full((num_tokens + 5, topk), 7, dtype=torch.int32, device="mlx")
    q = torch.cat(queries)
    # padded past the step's tokens, as vLLM's buffers are
    pad = lambda x: torch.cat([x, torch.zeros(3, *x.shape[1:])]).float().to("mlx")  # noqa: E731
    sparse_indexer.sparse_attn_indexer_op(pad(q), pad(new_keys), pad(torch.cat(weights)),
                                          k_cache, buffer, "indexer", topk)
    got = buffer.cpu()
    assert (got[num_tokens:] == 7).all()  # rows past the step's tokens untouched
    return got[:num_tokens]


@pytest.mark.parametrize("topk", [4, 16, 128])
def test_indexer_topk_matches_reference(topk, monkeypatch):
    gen = torch.Generator().manual_seed(topk)
    k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, INDEX_DIM, device="mlx")  # as vLLM binds it
    block_table, request_slots = place_requests(REQUESTS, NUM_BLOCKS, gen)
    keys = [torch.randn(c + n, INDEX_DIM, generator=gen, dtype=torch.float64)
            for c, n in REQUESTS]
    # step 1: every request's context as a prefill (no decodes), with the real step-2 keys
    first = [(0, c) for c, _ in REQUESTS if c]
    first_keys = [k[:c] for k, (c, _) in zip(keys, REQUESTS) if c]
    first_slots = [s[:c] for s, (c, _) in zip(request_slots, REQUESTS) if c]
    first_q = [torch.randn(n, INDEX_HEADS, INDEX_DIM, generator=gen, dtype=torch.float64)
               for _, n in first]
    first_w = [torch.randn(n, INDEX_HEADS, generator=gen, dtype=torch.float64) for _, n in first]
    table1 = block_table[[r for r, (c, _) in enumerate(REQUESTS) if c]]
    got1 = run_indexer(first, 0, first_keys, first_q, first_w, k_cache, table1, first_slots,
                       topk, monkeypatch)
    # step 2: decodes continuing the cached contexts, and prefills with and without context
    queries = [torch.randn(n, INDEX_HEADS, INDEX_DIM, generator=gen, dtype=torch.float64)
               for _, n in REQUESTS]
    weights = [torch.randn(n, INDEX_HEADS, generator=gen, dtype=torch.float64)
               for _, n in REQUESTS]
    got2 = run_indexer(REQUESTS, NUM_DECODES, keys, queries, weights, k_cache, block_table,
                       request_slots, topk, monkeypatch)

    for got, requests, q_list, w_list, k_list in (
            (got1, first, first_q, first_w, first_keys), (got2, REQUESTS, queries, weights, keys)):
        row = 0
        for (context, new), q, w, k in zip(requests, q_list, w_list, k_list):
            for i in range(new):
                check_topk_row(got[row].tolist(), q[i], w[i], k, context + i, topk)
                row += 1
    # the cache holds every key at its slot
    rows = k_cache.cpu().reshape(-1, INDEX_DIM)
    for k, s in zip(keys, request_slots):
        torch.testing.assert_close(rows[s], k.float())


def reference_sparse_mla(query, latents, pes, selected, weight, scale, sinks=None):
    """float64 decompressed MLA of each token over its selected positions. query [N, P + R]
    (not absorbed), latents [S, L], pes [S, R], selected: positions; weight kv_b_proj's; sinks
    [N]: one more logit per head in the softmax, attending to nothing (HY V4)."""
    kv = (latents @ weight.T).view(-1, HEADS, NOPE + V_DIM)
    keys = torch.cat([kv[..., :NOPE], pes[:, None].expand(-1, HEADS, -1)], dim=-1)
    pick = torch.tensor(selected)
    scores = torch.einsum("hd,khd->hk", query, keys[pick]) * scale
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None]], dim=-1)
    probs = torch.softmax(scores, dim=-1)[:, :len(selected)]
    return torch.einsum("hk,khd->hd", probs, kv[pick][..., NOPE:]).reshape(-1)


@pytest.mark.parametrize("topk", [4, 128])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
def test_sparse_attention_matches_reference(topk, compiled, with_sinks):
    """MLXSparseMLAImpl as vLLM's MLAAttention drives it eagerly (write, absorbed query through
    forward_mqa for every token, W_UV) and as the compiled forward does (attend); with HY V4's
    learnable per-head sinks too."""
    gen = torch.Generator().manual_seed(10 + topk)
    sinks = torch.randn(HEADS, generator=gen, dtype=torch.float64) * 2 if with_sinks else None
    weight = torch.randn(HEADS * (NOPE + V_DIM), LORA, generator=gen, dtype=torch.float64)
    weight *= LORA ** -0.5
    w = weight.view(HEADS, NOPE + V_DIM, LORA)
    w_uk_t, w_uv = w[:, :NOPE].float(), w[:, NOPE:].transpose(1, 2).float()
    cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, LORA + ROPE, device="mlx")
    block_table, request_slots = place_requests(REQUESTS, NUM_BLOCKS, gen)
    latents = [torch.randn(c + n, LORA, generator=gen, dtype=torch.float64) for c, n in REQUESTS]
    pes = [torch.randn(c + n, ROPE, generator=gen, dtype=torch.float64) for c, n in REQUESTS]
    queries = [torch.randn(n, HEADS, NOPE + ROPE, generator=gen, dtype=torch.float64)
               for _, n in REQUESTS]
    # the indexer's selection: random positions among each token's causal candidates
    selection = []
    for context, new in REQUESTS:
        for i in range(new):
            candidates = context + i + 1
            chosen = sorted(torch.randperm(candidates, generator=gen)[:topk].tolist())
            selection.append(chosen + [-1] * (topk - len(chosen)))
    impl = MLXSparseMLAImpl(
        num_heads=HEADS, head_size=LORA + ROPE, scale=(NOPE + ROPE) ** -0.5, num_kv_heads=1,
        alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
        attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, q_lora_rank=None,
        kv_lora_rank=LORA, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
        qk_head_dim=NOPE + ROPE, v_head_dim=V_DIM, kv_b_proj=None,
        # padded past the step's tokens, as vLLM's buffer is
        topk_indices_buffer=torch.tensor(selection + [[5] * topk] * 2,
                                         dtype=torch.int32).to("mlx"),
        sinks=None if sinks is None else sinks.float().to("mlx"))
    for (context, _), latent, pe, slot in zip(REQUESTS, latents, pes, request_slots):
        if context:  # written by earlier steps
            impl.do_kv_cache_update(latent[:context].float().to("mlx"),
                                    pe[:context, None].float().to("mlx"), cache,
                                    slot[:context].to("mlx"), "auto", None)
    new = lambda xs: torch.cat([x[c:] for x, (c, _) in zip(xs, REQUESTS)]).float()  # noqa: E731
    kv_c, k_pe, q = new(latents).to("mlx"), new(pes)[:, None].to("mlx"), \
        torch.cat(queries).float().to("mlx")
    md = metadata(REQUESTS, block_table, [s[c:] for s, (c, _) in zip(request_slots, REQUESTS)],
                  NUM_DECODES)
    if compiled:
        layer = types.SimpleNamespace(W_UK_T=w_uk_t.to("mlx"), W_UV=w_uv.to("mlx"))
        to = torch_mlx.to_mlx
        got = torch_mlx.from_mlx(impl.attend(layer, to(q), to(kv_c), to(k_pe), cache, md)).cpu()
    else:
        impl.do_kv_cache_update(kv_c, k_pe, cache, md.slot_mapping, "auto", None)
        q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
        ql_nope = torch.bmm(q_nope.transpose(0, 1), w_uk_t.to("mlx")).transpose(0, 1)
        latent_out, lse = impl.forward_mqa((ql_nope, q_pe), cache, md, None)
        assert lse is None
        got = torch.bmm(latent_out.transpose(0, 1), w_uv.to("mlx")).transpose(0, 1)
        got = got.reshape(len(q), -1).cpu()
    expected, row = [], 0
    for (context, n), latent, pe, query in zip(REQUESTS, latents, pes, queries):
        for i in range(n):
            chosen = [p for p in selection[row] if p >= 0]
            expected.append(reference_sparse_mla(query[i], latent, pe, chosen, weight,
                                                 impl.scale, sinks))
            row += 1
    torch.testing.assert_close(got, torch.stack(expected).float(), atol=2e-5, rtol=1e-4)


def test_platform_picks_the_sparse_mla_backend():
    from vllm_metal.platform import MetalPlatform

    sparse = types.SimpleNamespace(use_mla=True, use_sparse=True)
    assert MetalPlatform.get_attn_backend_cls(None, sparse) == \
        "vllm_metal.attention.sparse_mla.MLXSparseMLABackend"
    from vllm_metal.attention.sparse_mla import MLXSparseMLABackend

    assert MLXSparseMLABackend.supports_sink()  # HY V4 binds it for its learnable sinks
    with pytest.raises(NotImplementedError, match="without MLA"):
        MetalPlatform.get_attn_backend_cls(None, types.SimpleNamespace(use_mla=False,
                                                                       use_sparse=True))
