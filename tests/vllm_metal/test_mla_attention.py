"""The MLX MLA backend against plain multi-head attention over decompressed keys (torch, CPU).

A batch mixes decode requests with prefills that have earlier context in the latent cache
(chunked prefill / prefix-cache hits) and prefills without; blocks are scattered over the cache
in random order. The reference decompresses every position's latent row with kv_b_proj's
weight and runs causal attention per request; the backend is checked both as the compiled
forward runs it (MLXMLAImpl.attend: write, absorbed decode, decompressed prefill, W_UV) and as
vLLM's MLAAttention.forward_impl drives it eagerly (do_kv_cache_update, forward_mqa with the
absorbed query, forward_mha).
"""
import types

import numpy as np
import pytest
import torch

import torch_mlx
from vllm.v1.attention.backend import AttentionType

from vllm_metal.attention.mla import MLXMLAImpl, MLXMLAMetadata

from test_attention import BLOCK_SIZE, place_requests, reference_attention

HEADS, LORA, NOPE, ROPE, V_DIM = 4, 32, 16, 8, 24
REQUESTS = [(37, 1), (5, 1), (64, 1), (0, 23), (40, 9), (17, 30), (0, 1)]  # (context, new)
NUM_DECODES = 3


def make_impl(kv_b_proj=None):
    return MLXMLAImpl(HEADS, LORA + ROPE, (NOPE + ROPE) ** -0.5, 1, None, None, "auto", None,
                      AttentionType.DECODER, None, q_lora_rank=None, kv_lora_rank=LORA,
                      qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, qk_head_dim=NOPE + ROPE,
                      v_head_dim=V_DIM, kv_b_proj=kv_b_proj)


def make_batch(requests, gen):
    num_blocks = 64
    cache = torch.zeros(num_blocks, BLOCK_SIZE, LORA + ROPE, device="mlx")  # as vLLM binds it
    block_table, request_slots = place_requests(requests, num_blocks, gen)
    latents, pes, queries, slots = [], [], [], []
    impl = make_impl()
    for (context, new), slot in zip(requests, request_slots):
        total = context + new
        latent = torch.randn(total, LORA, generator=gen)
        pe = torch.randn(total, 1, ROPE, generator=gen)
        if context:  # written by earlier steps
            impl.do_kv_cache_update(latent[:context].to("mlx"), pe[:context].to("mlx"), cache,
                                    slot[:context].to("mlx"), "auto", None)
        latents.append(latent), pes.append(pe)
        queries.append(torch.randn(new, HEADS, NOPE + ROPE, generator=gen))
        slots.append(slot[context:])
    query_start = np.cumsum([0] + [n for _, n in requests])
    metadata = MLXMLAMetadata(
        num_actual_tokens=int(query_start[-1]), num_decodes=NUM_DECODES,
        query_start=query_start, seq_lens=np.array([c + n for c, n in requests]),
        block_table=torch_mlx.to_mlx(block_table.to("mlx")),
        slot_mapping=torch.cat(slots).to("mlx"), block_size=BLOCK_SIZE,
        num_prefills=len(requests) - NUM_DECODES, num_decode_tokens=NUM_DECODES)
    return cache, metadata, latents, pes, queries


def reference(requests, weight, latents, pes, queries, scale):
    """weight: kv_b_proj's [N * (P + V), L]."""
    outputs = []
    for (context, new), latent, pe, q in zip(requests, latents, pes, queries):
        kv = (latent @ weight.T).view(-1, HEADS, NOPE + V_DIM)
        k = torch.cat([kv[..., :NOPE], pe.expand(-1, HEADS, -1)], dim=-1)
        outputs.append(reference_attention(q, k, kv[..., NOPE:], scale, None))
    return torch.cat(outputs).reshape(-1, HEADS * V_DIM)


def weights(gen):
    weight = torch.randn(HEADS * (NOPE + V_DIM), LORA, generator=gen) * LORA ** -0.5
    w = weight.view(HEADS, NOPE + V_DIM, LORA)
    w_uk_t = w[:, :NOPE].contiguous()  # [N, P, L]
    w_uv = w[:, NOPE:].transpose(1, 2).contiguous()  # [N, L, V]
    return weight, w_uk_t, w_uv


@pytest.mark.parametrize("requests", [REQUESTS, REQUESTS[:NUM_DECODES], [(0, 12), (20, 5)]])
def test_compiled_path_matches_reference(requests):
    gen = torch.Generator().manual_seed(0)
    weight, w_uk_t, w_uv = weights(gen)
    num_decodes = sum(1 for _, n in requests[:NUM_DECODES] if n == 1 and len(requests) > 2)
    cache, md, latents, pes, queries = make_batch(requests, gen)
    md.num_decodes = md.num_decode_tokens = num_decodes
    md.num_prefills = len(requests) - num_decodes
    layer = types.SimpleNamespace(W_UK_T=w_uk_t.to("mlx"), W_UV=w_uv.to("mlx"))
    impl = make_impl()
    to = torch_mlx.to_mlx
    kv_c = to(torch.cat([x[c:] for x, (c, _) in zip(latents, requests)]).to("mlx"))
    k_pe = to(torch.cat([x[c:] for x, (c, _) in zip(pes, requests)]).to("mlx"))
    result = impl.attend(layer, to(torch.cat(queries).to("mlx")), kv_c, k_pe, cache, md)
    got = torch_mlx.from_mlx(result).cpu()
    expected = reference(requests, weight, latents, pes, queries, impl.scale)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # every new row is in the cache (the next step's decode reads it)
    rows = cache.cpu().reshape(-1, LORA + ROPE)
    slots = md.slot_mapping.cpu().long()
    torch.testing.assert_close(rows[slots, :LORA], from_torch_cpu(kv_c))
    torch.testing.assert_close(rows[slots, LORA:], from_torch_cpu(k_pe).squeeze(1))


def from_torch_cpu(a):
    return torch_mlx.from_mlx(a).cpu()


def test_eager_path_matches_reference():
    """As vLLM's MLAAttention.forward_impl drives the impl: the write, then forward_mha on the
    prefill tokens, forward_mqa on the decodes' absorbed query and W_UV on its result."""
    gen = torch.Generator().manual_seed(1)
    weight, w_uk_t, w_uv = weights(gen)
    cache, md, latents, pes, queries = make_batch(REQUESTS, gen)
    weight_mlx = weight.to("mlx")
    impl = make_impl(kv_b_proj=lambda x: (x @ weight_mlx.T, None))
    kv_c = torch.cat([x[c:] for x, (c, _) in zip(latents, REQUESTS)]).to("mlx")
    k_pe = torch.cat([x[c:] for x, (c, _) in zip(pes, REQUESTS)]).to("mlx")
    q = torch.cat(queries).to("mlx")
    impl.do_kv_cache_update(kv_c, k_pe, cache, md.slot_mapping, "auto", None)
    output = torch.zeros(len(q), HEADS * V_DIM, device="mlx")
    impl.forward_mha(q[NUM_DECODES:], kv_c[NUM_DECODES:], k_pe[NUM_DECODES:], cache, md, None,
                     output[NUM_DECODES:])
    q_nope, q_pe = q[:NUM_DECODES].split([NOPE, ROPE], dim=-1)
    ql_nope = torch.bmm(q_nope.transpose(0, 1), w_uk_t.to("mlx")).transpose(0, 1)
    latent_out, lse = impl.forward_mqa((ql_nope, q_pe), cache, md, None)
    assert lse is None
    output[:NUM_DECODES] = torch.bmm(latent_out.transpose(0, 1),
                                     w_uv.to("mlx")).transpose(0, 1).reshape(NUM_DECODES, -1)
    expected = reference(REQUESTS, weight, latents, pes, queries, impl.scale)
    torch.testing.assert_close(output.cpu(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("option,message", [
    (dict(indexer=object()), "sparse MLA"),
    (dict(sliding_window=8), "sliding-window MLA"),
    (dict(kv_cache_dtype="fp8"), "KV cache dtype"),
    (dict(kv_sharing_target_layer_name="x"), "KV sharing"),
])
def test_unsupported_mla_options_are_refused(option, message):
    args = dict(num_heads=HEADS, head_size=LORA + ROPE, scale=1.0, num_kv_heads=1,
                alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto",
                logits_soft_cap=None, attn_type=AttentionType.DECODER,
                kv_sharing_target_layer_name=None, q_lora_rank=None, kv_lora_rank=LORA,
                qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, qk_head_dim=NOPE + ROPE,
                v_head_dim=V_DIM, kv_b_proj=None)
    args.update(option)
    with pytest.raises(NotImplementedError, match=message):
        MLXMLAImpl(**args)


def test_platform_picks_the_mla_backend():
    from vllm_metal.attention.mla import MLXMLAPrefillBackend
    from vllm_metal.platform import MetalPlatform

    dense = types.SimpleNamespace(use_mla=True, use_sparse=False)
    assert MetalPlatform.get_attn_backend_cls(None, dense) == \
        "vllm_metal.attention.mla.MLXMLABackend"  # sparse MLA: test_sparse_mla.py
    assert MetalPlatform.get_mla_prefill_backend_cls(None) is MLXMLAPrefillBackend


def test_prefill_backend_runs_causal_attention_per_request():
    from vllm_metal.attention.mla import MLXMLAPrefillBackend

    gen = torch.Generator().manual_seed(2)
    lengths = [5, 17, 1]
    scale = (NOPE + ROPE) ** -0.5
    backend = MLXMLAPrefillBackend(HEADS, scale, LORA, NOPE, ROPE, V_DIM, vllm_config=None)
    backend.prepare_metadata(types.SimpleNamespace(
        query_start_loc=torch.tensor(np.cumsum([0] + lengths))))
    total = sum(lengths)
    q = torch.randn(total, HEADS, NOPE + ROPE, generator=gen)
    k = torch.randn(total, HEADS, NOPE + ROPE, generator=gen)
    v = torch.randn(total, HEADS, V_DIM, generator=gen)
    got = backend.run_prefill_new_tokens(q.to("mlx"), k.to("mlx"), v.to("mlx"), False).cpu()
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        torch.testing.assert_close(got[s], reference_attention(q[s], k[s], v[s], scale, None),
                                   atol=2e-5, rtol=1e-4)
        start += n
    with pytest.raises(NotImplementedError, match="LSE"):
        backend.run_prefill_new_tokens(q.to("mlx"), k.to("mlx"), v.to("mlx"), True)
