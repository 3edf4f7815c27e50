"""MLX implementations behind vLLM's custom ops, and the KV-cache ops.

Importing this package registers the overrides with ``CustomOp.register_oot`` (vLLM then builds
these classes wherever a model asks for the originals) and the MLX lowering of vLLM's attention
op for compiled forwards; MetalPlatform.check_and_update_config
imports it in every process that builds a model. The Mamba and gated delta-net kernels
(``mamba.install``, ``gated_delta.install``) and the sparse indexer's cache and query quantizer
(``sparse_indexer.install``) replace names inside vLLM's modules, as those modules import them
by name.
"""
from . import (activation, attention, gated_delta, layernorm, mamba, moe,  # noqa: F401
               quantized, rotary, sparse_indexer)

mamba.install()
gated_delta.install()
sparse_indexer.install()
