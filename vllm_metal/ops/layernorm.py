"""RMSNorm and GemmaRMSNorm as one MLX kernel each.

vLLM's reference (forward_native, vllm.ir's rms_norm): normalise in float32, multiply by the
weight, cast back. The fused-residual form adds the residual first and returns (normed, new
residual), like vLLM's fused_add_rms_norm. Gemma scales by (1 + weight): ``weight_offset`` 1.
On the GPU, mx.fast.rms_norm accumulates in float32 and applies the weight in one kernel; MLX's
CPU backend has no such kernel (its fallback is several graph nodes), so there torch_mlx's
(csrc/fast_cpu.cpp) does the whole step, rounding where vLLM's reference rounds.
"""
import mlx.core as mx
import torch
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm

from torch_mlx import _C
from torch_mlx.ops.registry import lowering

from .library import cpu_backend, define

rms_norm_op = define("rms_norm(Tensor x, Tensor? weight, float eps, float weight_offset) -> Tensor",
                     lambda x, weight, eps, weight_offset: torch.empty_like(x))
fused_add_rms_norm_op = define(
    "fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps, "
    "float weight_offset) -> (Tensor, Tensor)",
    lambda x, residual, weight, eps, weight_offset: (torch.empty_like(x), torch.empty_like(x)))


def _normalise(a: mx.array, weight: mx.array | None, eps: float,
               weight_offset: float) -> mx.array:
    if weight is not None and weight_offset:
        weight = weight.astype(mx.float32) + weight_offset
    if weight is None or weight.dtype == a.dtype:
        out = mx.fast.rms_norm(a, weight, eps)  # one kernel, float32 accumulation
    else:  # vLLM's order: normalise in float32, round to the weight's dtype, scale
        out = mx.fast.rms_norm(a.astype(mx.float32), None, eps).astype(weight.dtype) * weight
    return out  # rounded to x's dtype (the fake kernel's) by torch_mlx's adapter


@lowering("vllm_metal::rms_norm")
def rms_norm(x, weight, eps, weight_offset):
    if cpu_backend():
        return _C.rms_norm(x, weight, eps, weight_offset)[0]
    return _normalise(x, weight, eps, weight_offset)


@lowering("vllm_metal::fused_add_rms_norm")
def fused_add_rms_norm(x, residual, weight, eps, weight_offset):
    if cpu_backend() and residual.dtype == x.dtype:
        return tuple(_C.rms_norm(x, weight, eps, weight_offset, residual))
    # normalise the float32 sum; the new residual is that sum (both rounded to x's dtype by
    # the adapter)
    total = x.astype(mx.float32) + residual.astype(mx.float32)
    return _normalise(total, weight, eps, weight_offset), total


def _forward(x, residual, weight, eps, weight_offset):
    if residual is None:
        return rms_norm_op(x, weight, eps, weight_offset)
    return fused_add_rms_norm_op(x, residual, weight, eps, weight_offset)


@RMSNorm.register_oot
class MLXRMSNorm(RMSNorm):
    def forward_oot(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.variance_size_override is not None:
            return self.forward_native(x, residual)  # norm over a prefix: no fast kernel
        weight = self.weight if self.has_weight else None
        return _forward(x, residual, weight, self.variance_epsilon, 0.0)


@GemmaRMSNorm.register_oot
class MLXGemmaRMSNorm(GemmaRMSNorm):
    def forward_oot(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return _forward(x, residual, self.weight, self.variance_epsilon, 1.0)
