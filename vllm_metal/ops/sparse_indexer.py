"""DeepSeek-V3.2's lightning indexer (vLLM's ``SparseAttnIndexer`` custom op) on MLX.

vLLM's Indexer module computes the indexer's query, key and per-head weights with ordinary
layers, quantizes the query to fp8 (``per_token_group_quant_fp8``, folding the scale into the
weights) and calls ``SparseAttnIndexer``, whose native forward exists for CUDA/ROCm/XPU/CPU
kernels only. On mlx:

- the query stays in the model dtype: ``install()`` rebinds the quantizer the model modules
  (DeepSeek-V3.2's, HY V4's) imported to one that returns the query unchanged with scale 1
  (MLX has no fp8 arithmetic; transformers' reference scores unquantized queries and keys);
- ``install()`` also rebinds the model modules' ``DeepseekV32IndexerCache`` to
  ``MLXIndexerCache``: keys stored in the model dtype, [blocks, block_size, index_head_dim],
  not vLLM's CUDA layout (fp8 values plus a float32 scale per 128, as uint8), and the MLX
  attention backend's metadata (block table, sequence lengths, slots) for the op;
- ``MLXSparseAttnIndexer.forward_oot`` calls ``vllm_metal::sparse_attn_indexer``, which writes
  this step's keys into the indexer cache in place and the top-k positions into vLLM's shared
  buffer (``attention.sparse_mla.indexer_topk``). The platform makes that op a splitting op, so
  in a compiled forward it runs eagerly between the pieces, and the MLA attention lowered in the
  next piece reads the buffer it filled.
"""
import mlx.core as mx
import torch
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
from vllm.model_executor.models.deepseek_v2 import DeepseekV32IndexerCache
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.kv_cache_interface import MLAAttentionSpec, SparseCacheRole

from torch_mlx import from_mlx, to_mlx

from ..attention.backend import MLXAttentionBackend, MLXAttentionMetadataBuilder
from .cache import write_kv_rows
from .library import LIB, define

sparse_attn_indexer_op = define(
    "sparse_attn_indexer(Tensor q, Tensor k, Tensor weights, Tensor(a!) k_cache, "
    "Tensor(b!) topk_indices, str layer_name, int topk) -> ()",
    lambda q, k, weights, k_cache, topk_indices, layer_name, topk: None)


def _sparse_attn_indexer(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                         k_cache: torch.Tensor, topk_indices: torch.Tensor, layer_name: str,
                         topk: int) -> None:
    """q [T, H, D], k [T, D], weights [T, H] (tokens may be padded past the step's);
    k_cache [blocks, block_size, D]; topk_indices: vLLM's [max tokens, topk] int32 buffer."""
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or k_cache.numel() == 0:
        return  # profiling run: no metadata, no cache
    md = metadata[layer_name]
    num_tokens = md.num_actual_tokens
    head_dim = k_cache.shape[-1]
    keys = to_mlx(k)[:num_tokens].reshape(num_tokens, 1, head_dim)
    storage = k_cache.unsqueeze(1)  # [blocks, 1, block_size, D]: a one-head cache
    # write_kv_rows stores a (key, value) pair per row: the key's two halves
    half = head_dim // 2
    cache = write_kv_rows(to_mlx(storage), keys[..., :half], keys[..., half:], md.slots,
                          storage)[:, 0]
    from ..attention.sparse_mla import indexer_topk  # here: attention imports ops (a cycle)

    selected = indexer_topk(to_mlx(q)[:num_tokens], to_mlx(weights)[:num_tokens], cache, md,
                            topk)
    mx.eval(selected, cache)
    topk_indices[:num_tokens, :topk].copy_(from_mlx(selected))


LIB.impl("sparse_attn_indexer", _sparse_attn_indexer, "PrivateUse1")


@SparseAttnIndexer.register_oot
class MLXSparseAttnIndexer(SparseAttnIndexer):
    def forward_oot(self, hidden_states: torch.Tensor, q_quant, k: torch.Tensor | None,
                    weights: torch.Tensor) -> torch.Tensor:
        if isinstance(q_quant, tuple) or k is None or self.skip_k_cache_insert:
            raise NotImplementedError("the sparse indexer on mlx supports the DeepSeek-V3.2 "
                                      "form only (no fp4 cache, keys inserted by the indexer)")
        if self.candidate_blocks is not None or self.dcp_world_size > 1 or self.use_pcp:
            raise NotImplementedError("two-level candidate selection and context parallelism "
                                      "of the sparse indexer are not supported on mlx")
        sparse_attn_indexer_op(q_quant, k, weights, self.k_cache.kv_cache,
                               self.topk_indices_buffer, self.k_cache.prefix, self.topk_tokens)
        return self.topk_indices_buffer


class MLXIndexerBackend(AttentionBackend):
    """Backend of the indexer's key cache: only its metadata is used (the indexer op reads the
    cache itself); that is the MLX attention backend's."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_builder_cls():
        return MLXAttentionMetadataBuilder

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the indexer cache has no attention of its own")

    @classmethod
    def is_mla(cls) -> bool:
        return True  # one row per token, as MLA caches

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return MLXAttentionBackend.get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def supported_kv_cache_layouts(cls):
        return MLXAttentionBackend.supported_kv_cache_layouts()


class MLXIndexerCache(DeepseekV32IndexerCache):
    """The indexer's key cache as mlx stores it: [blocks, block_size, index_head_dim] in the
    model dtype, in place of vLLM's fp8 bytes plus scales (the model passes that packed width
    and uint8, which are ignored)."""

    def __init__(self, head_dim: int, dtype: torch.dtype, prefix: str, cache_config) -> None:
        model_config = get_current_vllm_config().model_config
        super().__init__(model_config.hf_text_config.index_head_dim, model_config.dtype, prefix,
                         cache_config)

    def get_kv_cache_spec(self, vllm_config) -> MLAAttentionSpec:
        return MLAAttentionSpec(block_size=self.cache_config.block_size, num_kv_heads=1,
                                max_tp_shards=1, head_size=self.head_dim, dtype=self.dtype,
                                cache_role=SparseCacheRole.INDEXER)

    def get_attn_backend(self) -> type[AttentionBackend]:
        return MLXIndexerBackend


def _unquantized_query(x: torch.Tensor, group_size: int, *args, **kwargs):
    """Stands in for per_token_group_quant_fp8 in the indexer: the query unchanged, scale 1
    (one per row: the indexer views the scales as [tokens, heads])."""
    return x, torch.ones(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)


# modules whose indexer builds the cache and quantizes the query through these names, imported
# by name: DeepSeek-V3.2's (shared by GLM-MoE-DSA) and HY V4's
_MODULES = ("vllm.model_executor.models.deepseek_v2", "vllm.models.hy_v4.nvidia.attention")


def install() -> None:
    import importlib

    for name in _MODULES:
        module = importlib.import_module(name)
        module.DeepseekV32IndexerCache = MLXIndexerCache
        module.per_token_group_quant_fp8 = _unquantized_query
