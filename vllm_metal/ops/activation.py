"""Gated activations (SiluAndMul, GeluAndMul) in MLX: act(x[..., :d]) * x[..., d:]."""
import math

import mlx.core as mx
import torch
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

from torch_mlx import from_mlx, to_mlx


def silu(a: mx.array) -> mx.array:
    return a / (1.0 + mx.exp(-a))  # torch's formula, so rounding agrees


def gelu(a: mx.array, approximate: str) -> mx.array:
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (a + 0.044715 * a * a * a)
        return 0.5 * a * (1.0 + mx.tanh(inner))
    return 0.5 * a * (1.0 + mx.erf(a * (1.0 / math.sqrt(2.0))))


def gated(x: torch.Tensor, act) -> torch.Tensor:
    """act(gate) * up, the activation in float32 then rounded, as torch's kernels do."""
    a = to_mlx(x)
    d = a.shape[-1] // 2
    gate = act(a[..., :d].astype(mx.float32)).astype(a.dtype)
    return from_mlx(gate * a[..., d:])


@SiluAndMul.register_oot
class MLXSiluAndMul(SiluAndMul):
    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return gated(x, silu)


@GeluAndMul.register_oot
class MLXGeluAndMul(GeluAndMul):
    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return gated(x, lambda a: gelu(a, self.approximate))
