"""The MLX attention backend: vLLM's AttentionBackend, its per-step metadata and their builder.

The metadata is built once per step and shared by every layer of a KV-cache group. It holds
host copies of the few per-request integers the Python side needs (query offsets, sequence
lengths) and zero-copy MLX views of the device tables; masks are built on first use and reused
by the remaining layers.

Encoder-only layers (BERT-style embedding models) get the same metadata from the same builder;
vLLM gives them a group of their own with no cache (zero block table and slot mapping, unused).
Their sequences are packed into runs of at most ENCODER_PACK_TOKENS tokens, each run one fused
attention call with a block-diagonal mask: one call for a batch of short sequences, and no
quadratic cost across a long batch (a longer sequence is a run of its own, with no mask).
"""
import functools
from dataclasses import dataclass, field
from typing import ClassVar

import mlx.core as mx
import numpy as np
import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import EncoderOnlyAttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from torch_mlx import to_mlx

from ..kernel_overrides import host_view
from .paged import decode_mask, encoder_mask

ENCODER_PACK_TOKENS = 1024


class MLXAttentionBackend(AttentionBackend):
    # The attention call writes this step's keys/values itself (MLXAttentionImpl.attend): in a
    # compiled forward the write is a node of the same MLX graph as the attention reading it.
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry's slot for out-of-tree backends

    @staticmethod
    def get_impl_cls():
        from .impl import MLXAttentionImpl

        return MLXAttentionImpl

    @staticmethod
    def get_builder_cls():
        return MLXAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]  # blocks are gathered, any size works

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Token-major blocks first: one token's keys and values for all heads are one
        # contiguous run, so writing new tokens touches the fewest cache lines. Any layout is
        # correct: the code reads the logical [blocks, heads, tokens, K|V] view.
        return (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True  # gpt-oss's per-head sinks (MLXAttentionImpl, paged.py)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        # encoder-only: bidirectional over each sequence, no cache (MLXAttentionImpl)
        return attn_type in (AttentionType.DECODER, AttentionType.ENCODER_ONLY)


@dataclass
class MLXAttentionMetadata:
    num_actual_tokens: int
    num_decodes: int  # leading requests with exactly one query token
    query_start: np.ndarray  # [num_reqs + 1], host
    seq_lens: np.ndarray  # [num_reqs], host: tokens in the cache after this step's write
    block_table: mx.array  # [num_reqs, width], zero-copy view of the runner's block table
    slot_mapping: torch.Tensor  # [num_tokens] on "mlx": cache slot of each new token
    block_size: int
    # the same table as a torch tensor, where the builder has it (read on the host on demand)
    block_table_tensor: torch.Tensor | None = None
    _decode_masks: dict = field(default_factory=dict)
    _encoder_runs: dict = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @functools.cached_property
    def slots(self) -> mx.array:
        """Cache slot of each new token, [num_actual_tokens] (zero-copy)."""
        return to_mlx(self.slot_mapping)[: self.num_actual_tokens]

    @functools.cached_property
    def decode_block_table(self) -> mx.array:
        """The decode requests' rows of the block table (shared by all layers)."""
        if self.num_decodes == self.num_reqs:
            return self.block_table
        return self.block_table[: self.num_decodes]

    @functools.cached_property
    def decode_seq_lens(self) -> mx.array:
        """The decode requests' sequence lengths, [num_decodes] int32."""
        return mx.array(self.seq_lens[: self.num_decodes].astype(np.int32))

    @functools.cached_property
    def decode_blocks(self) -> int:
        """Block-table columns that cover the longest decode request."""
        longest = int(self.seq_lens[: self.num_decodes].max())
        return -(-longest // self.block_size)

    @functools.cached_property
    def uniform_decode_len(self) -> int | None:
        """The decode requests' common sequence length, or None when their lengths differ
        (a lone request; a batch decoding in lockstep from prompts of one length): equal
        lengths need no mask, so attention can take MLX's fused kernel."""
        lengths = self.seq_lens[: self.num_decodes]
        return int(lengths[0]) if self.num_decodes and bool((lengths == lengths[0]).all()) \
            else None

    @functools.cached_property
    def decode_block_columns(self) -> mx.array:
        """[num_decodes, decode_blocks]: the decode requests' rows, cut to the columns their
        longest covers (the MLX attention paths' table, shared by all layers)."""
        return self.block_table[: self.num_decodes, : self.decode_blocks]

    @functools.cached_property
    def decode_run_start(self) -> int | None:
        """One decode request whose blocks are consecutive (b, b + 1, ...: as vLLM's block pool
        hands out free blocks in order, the usual case): b, so attention reads them as one slice
        of the cache instead of gathering (copying) them in every layer; else None."""
        if self.num_decodes != 1 or self.block_table_tensor is None:
            return None
        # read only: host-written, never by a kernel, so launched readers need no wait
        blocks = host_view(self.block_table_tensor, writes=False)[0, : self.decode_blocks]
        return int(blocks[0]) if bool((np.diff(blocks) == 1).all()) else None

    def decode_mask(self, window: int | None) -> mx.array:
        """Shared by all layers with the same window."""
        if window not in self._decode_masks:
            num_keys = self.decode_blocks * self.block_size
            lengths = mx.array(self.seq_lens[: self.num_decodes])
            self._decode_masks[window] = decode_mask(lengths, num_keys, window)
        return self._decode_masks[window]

    def encoder_runs(self, window: int | None) -> list[tuple[int, int, mx.array | None]]:
        """Encoder-only attention: [(start, end, mask)], consecutive whole sequences packed into
        runs of at most ENCODER_PACK_TOKENS tokens (or one longer sequence), with each run's
        mask from paged.encoder_mask. Shared by all layers with the same window."""
        if window not in self._encoder_runs:
            query_lens = np.diff(self.query_start)
            partial = np.flatnonzero(query_lens != self.seq_lens)
            if len(partial):
                r = int(partial[0])
                raise NotImplementedError(
                    f"encoder-only attention on mlx needs each sequence whole in one step; "
                    f"request {r} has {query_lens[r]} of {self.seq_lens[r]} tokens (chunked "
                    f"prefill or prefix caching)")
            runs, start, lengths = [], int(self.query_start[0]), []
            for n in (int(n) for n in query_lens if n):
                if lengths and sum(lengths) + n > ENCODER_PACK_TOKENS:
                    runs.append((start, start + sum(lengths), encoder_mask(lengths, window)))
                    start, lengths = start + sum(lengths), []
                lengths.append(n)
            if lengths:
                runs.append((start, start + sum(lengths), encoder_mask(lengths, window)))
            self._encoder_runs[window] = runs
        return self._encoder_runs[window]


class MLXAttentionMetadataBuilder(AttentionMetadataBuilder[MLXAttentionMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first: they run as one batched attention call.
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MLXAttentionMetadata:
        common = common_attn_metadata
        non_causal = isinstance(common.causal, torch.Tensor) or not common.causal
        if non_causal and not isinstance(self.kv_cache_spec, EncoderOnlyAttentionSpec):
            # DiffusionGemma's per-request flags, say: decoder layers here are always causal
            raise NotImplementedError("non-causal decoder attention is not supported on mlx")
        num_reqs = common.num_reqs
        query_start = common.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        seq_lens = host_view(common.seq_lens[:num_reqs], writes=False).astype(np.int64)  # a copy
        query_lens = np.diff(query_start)
        block_table = common.block_table_tensor[:num_reqs]
        not_decode = np.flatnonzero(query_lens != 1)
        num_decodes = int(not_decode[0]) if len(not_decode) else num_reqs
        return MLXAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens,
            num_decodes=num_decodes,
            query_start=query_start,
            seq_lens=seq_lens,
            block_table=to_mlx(block_table),
            block_table_tensor=block_table,
            slot_mapping=common.slot_mapping,
            block_size=self.kv_cache_spec.block_size,
        )
