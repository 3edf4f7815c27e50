"""MLX affine group-wise quantized matmul and embedding lookup as torch ops on "mlx".

The format is MLX's (``mx.quantize``, what ``mlx_lm.convert -q`` writes): a weight [N, K] is
stored as ``weight`` [N, K * bits / 32] uint32 (each row's values packed little-end first, a value
may straddle two words at 3, 5 and 6 bits), ``scales`` and ``biases`` [N, K / group_size], and
element k of row n is ``scales[n, k // g] * q[n, k] + biases[n, k // g]``.

``quantized_matmul(x, weight, scales, biases, group_size, bits)`` is ``x @ dequantized.T``, run on
the packed weights: the weights are never unpacked in memory. On the GPU that is
``mx.quantized_matmul``. MLX's CPU kernel for it unpacks one value at a time on one thread
(0.1-0.9 GB/s of packed weights here, and M times slower again for M rows of x), so on MLX's CPU
backend the product is torch_mlx's kernel (``csrc/quantized_cpu.cpp``: AVX-512 at 4 and 8 bits,
multi-threaded) for up to ``DEQUANTIZE_ABOVE_ROWS`` rows of x, the decode steps; longer prefills
dequantize the matrix once (same kernel file) and multiply with BLAS, which outpaces any fused
kernel once the product is compute-bound.
``quantized_embedding`` dequantizes only the rows of the looked-up tokens. Both lowerings sit in
torch_mlx's table, so they run eagerly and inside compiled forwards alike.
"""
import inspect
import math

import mlx.core as mx
import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from torch_mlx import _C
from torch_mlx.ops.registry import lowering

from ..quantization.mlx_affine import MLXQuantConfig
from .library import cpu_backend, define

DEQUANTIZE_ABOVE_ROWS = 64
# MLX CUDA 0.32.4's quantized GEMM for float32 activations (qmm_naive: tiles of 64 rows past 32
# rows, tile depth max(64, group size)) asks 4 * 2 * 64 * 128 = 64 KiB of shared memory at group
# size 128, over the 48 KiB a kernel gets without opting in, and fails to launch
# ("cuGraphAddKernelNode: invalid argument"; tools/gpu_quantized_probe.py on the H100, every
# bits, 2026-12-06). Those products dequantize the weights and run a float32 GEMM instead.
_CUDA_QMM_SMEM_LIMIT = 48 * 1024 if mx.cuda.is_available() else None


def _cuda_qmm_cannot_launch(x: mx.array, group_size: int) -> bool:
    if _CUDA_QMM_SMEM_LIMIT is None or x.dtype != mx.float32 or math.prod(x.shape[:-1]) <= 32:
        return False
    return x.itemsize * 2 * 64 * max(64, group_size) > _CUDA_QMM_SMEM_LIMIT


def _matmul_fake(x, weight, scales, biases, group_size, bits):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _embedding_fake(ids, weight, scales, biases, group_size, bits):
    return scales.new_empty((*ids.shape, weight.shape[1] * 32 // bits))


quantized_matmul_op = define(
    "quantized_matmul(Tensor x, Tensor weight, Tensor scales, Tensor biases, int group_size, "
    "int bits) -> Tensor", _matmul_fake)
quantized_embedding_op = define(
    "quantized_embedding(Tensor ids, Tensor weight, Tensor scales, Tensor biases, "
    "int group_size, int bits) -> Tensor", _embedding_fake)


@lowering("vllm_metal::quantized_matmul")
def quantized_matmul(x, weight, scales, biases, group_size, bits):
    if not cpu_backend():  # MLX's GPU kernels take weights with contiguous rows only
        weight, scales, biases = (mx.contiguous(a) for a in (weight, scales, biases))
        if _cuda_qmm_cannot_launch(x, group_size):
            dense = mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                                  group_size=group_size, bits=bits)
            return mx.matmul(x, dense.T)
        return mx.quantized_matmul(x, weight, scales, biases, transpose=True,
                                   group_size=group_size, bits=bits)
    if math.prod(x.shape[:-1]) <= DEQUANTIZE_ABOVE_ROWS:
        return _C.affine_quantized_matmul(x, weight, scales, biases, group_size, bits)
    dense = _C.affine_dequantize(weight, scales, biases, group_size, bits)  # float32 [N, K]
    return mx.matmul(x.astype(mx.float32), dense.T)


@lowering("vllm_metal::quantized_embedding")
def quantized_embedding(ids, weight, scales, biases, group_size, bits):
    flat = ids.flatten()
    rows = mx.dequantize(mx.take(weight, flat, axis=0), mx.take(scales, flat, axis=0),
                         mx.take(biases, flat, axis=0), group_size=group_size, bits=bits)
    return rows.reshape(*ids.shape, rows.shape[-1])


# ---- layers vLLM builds unquantized that mlx_lm quantizes


def _quantized_if_checkpoint_is(base: type, module_of=lambda config, prefix: prefix) -> type:
    """An out-of-tree ``base`` that is given the "mlx" quantization config when the checkpoint
    stores the layer quantized. mlx_lm quantizes every Linear and Embedding; some vLLM models
    build a layer with no quantization config (Mixtral: its input embedding and its MoE router
    gates), whose float parameters could not hold the packed tensors. ``module_of(config,
    prefix)``: the layer's checkpoint module."""
    signature = inspect.signature(base.__init__)

    class Override(base):
        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            vllm_config = get_current_vllm_config_or_none()
            config = getattr(vllm_config, "quant_config", None)
            if bound.arguments.get("quant_config") is None and isinstance(config, MLXQuantConfig) \
                    and config.quantizes(module_of(config, bound.arguments.get("prefix", ""))):
                bound.arguments["quant_config"] = config
            base.__init__(*bound.args, **bound.kwargs)

    Override.__name__ = Override.__qualname__ = f"MLX{base.__name__}"
    base.register_oot(Override)
    return Override


MLXGateLinear = _quantized_if_checkpoint_is(GateLinear)
MLXVocabParallelEmbedding = _quantized_if_checkpoint_is(
    VocabParallelEmbedding, lambda config, prefix: config._embedding_module(prefix))
