"""The ``vllm_metal::`` torch operator library: MLX fast kernels as torch ops.

vLLM's custom ops (RMSNorm, SiluAndMul, rotary embedding, ...) are overridden on "mlx" by calls
to the operators defined here. Each operator has a fake kernel (shapes and dtypes, for dynamo
and for torch_mlx's adapter) and one MLX lowering in torch_mlx's table, registered with
``@lowering("vllm_metal::name")`` next to the vLLM op it overrides. The same lowering runs in
eager mode and inside graphs compiled by vllm_metal.compiler, where dynamo sees an ordinary
torch op instead of a call into MLX it could not trace.
"""
import mlx.core as mx
import torch

LIB = torch.library.Library("vllm_metal", "DEF")


def cpu_backend() -> bool:
    """Whether MLX computes on the CPU: the lowerings then use torch_mlx's CPU kernels
    (csrc/fast_cpu.cpp) where MLX has fused kernels only for the GPU."""
    return mx.default_device() == mx.cpu


def define(schema: str, fake):
    """Define ``vllm_metal::<schema>`` with ``fake`` as its fake (and meta) kernel."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    torch.library.register_fake(f"vllm_metal::{name}", fake, lib=LIB)
    return getattr(torch.ops.vllm_metal, name).default


def rebind(modules, names: dict) -> None:
    """Set each of ``names`` (name -> replacement) in every module of ``modules`` that has it:
    vLLM's layers call kernels by the names their modules imported, so the replacement must
    sit in each of those modules."""
    import importlib

    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, fn in names.items():
            if hasattr(module, name):
                setattr(module, name, fn)
