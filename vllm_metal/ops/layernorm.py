"""RMSNorm and GemmaRMSNorm with mx.fast.rms_norm.

vLLM's reference (forward_native, vllm.ir's rms_norm): normalise in float32, multiply by the
weight, cast back. mx.fast.rms_norm accumulates in float32 and applies the weight in one kernel.
The fused-residual form adds the residual first and returns (normed, new residual), like
vLLM's fused_add_rms_norm.
"""
import mlx.core as mx
import torch
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm

from torch_mlx import from_mlx, to_mlx


def rms_norm(x: torch.Tensor, weight: mx.array | None, eps: float,
             residual: torch.Tensor | None):
    a = to_mlx(x)
    if residual is not None:  # normalise the float32 sum; the new residual is it, rounded
        a = a.astype(mx.float32) + to_mlx(residual).astype(mx.float32)
        residual = from_mlx(a.astype(x_dtype(x)))
    if weight is None or weight.dtype == a.dtype:
        out = mx.fast.rms_norm(a, weight, eps)  # one kernel, float32 accumulation
    else:  # vLLM's order: normalise in float32, round to the weight's dtype, scale
        out = mx.fast.rms_norm(a.astype(mx.float32), None, eps).astype(weight.dtype) * weight
    out = from_mlx(out.astype(x_dtype(x)))
    return out if residual is None else (out, residual)


def x_dtype(x: torch.Tensor) -> mx.Dtype:
    return to_mlx(x[:0]).dtype


@RMSNorm.register_oot
class MLXRMSNorm(RMSNorm):
    def forward_oot(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.variance_size_override is not None:
            return self.forward_native(x, residual)  # norm over a prefix: no fast kernel
        weight = to_mlx(self.weight.data) if self.has_weight else None
        return rms_norm(x, weight, self.variance_epsilon, residual)


@GemmaRMSNorm.register_oot
class MLXGemmaRMSNorm(GemmaRMSNorm):
    def forward_oot(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        weight = to_mlx(self.weight.data).astype(mx.float32) + 1.0  # Gemma scales by (1 + w)
        return rms_norm(x, weight, self.variance_epsilon, residual)
