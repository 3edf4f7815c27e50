"""Gated activations (SiluAndMul, GeluAndMul) in MLX: act(x[..., :d]) * x[..., d:].

On MLX's CPU backend SiluAndMul is one torch_mlx kernel (csrc/fast_cpu.cpp, a vectorized exp):
MLX's compiled elementwise kernels evaluate exp one element at a time there.
"""
import math

import mlx.core as mx
import torch
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

from torch_mlx import _C
from torch_mlx.ops.registry import lowering

from .library import cpu_backend, define


def _gated_fake(x, *args):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


silu_and_mul_op = define("silu_and_mul(Tensor x) -> Tensor", _gated_fake)
gelu_and_mul_op = define("gelu_and_mul(Tensor x, str approximate) -> Tensor", _gated_fake)


def silu(a: mx.array) -> mx.array:
    return a / (1.0 + mx.exp(-a))  # torch's formula, so rounding agrees


def gelu(a: mx.array, approximate: str) -> mx.array:
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (a + 0.044715 * a * a * a)
        return 0.5 * a * (1.0 + mx.tanh(inner))
    return 0.5 * a * (1.0 + mx.erf(a * (1.0 / math.sqrt(2.0))))


def gated(a: mx.array, act) -> mx.array:
    """act(gate) * up, the activation in float32 then rounded, as torch's kernels do."""
    d = a.shape[-1] // 2
    gate = act(a[..., :d].astype(mx.float32)).astype(a.dtype)
    return gate * a[..., d:]


@lowering("vllm_metal::silu_and_mul")
def silu_and_mul(x):
    if cpu_backend():
        return _C.silu_and_mul(x)
    return gated(x, silu)


@lowering("vllm_metal::gelu_and_mul")
def gelu_and_mul(x, approximate):
    return gated(x, lambda a: gelu(a, approximate))


@SiluAndMul.register_oot
class MLXSiluAndMul(SiluAndMul):
    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_op(x)


@GeluAndMul.register_oot
class MLXGeluAndMul(GeluAndMul):
    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_and_mul_op(x, self.approximate)
