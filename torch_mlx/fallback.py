"""What happens to an aten op on "mlx" that has no lowering.

By default: ``NotImplementedError`` naming the op and the switch. With ``TORCH_MLX_FALLBACK=1`` or
``torch_mlx.set_fallback(True)``: the op runs on the CPU over zero-copy CPU aliases of the same
(unified) memory, with one warning per op.
"""
import os
import warnings

import torch
from torch.utils._pytree import tree_map

from . import _C

_enabled = os.environ.get("TORCH_MLX_FALLBACK", "0") not in ("", "0", "false", "False")
_warned: set[str] = set()


def set_fallback(enabled: bool) -> None:
    """Run ops without an MLX lowering on the CPU (True) or raise NotImplementedError (False)."""
    global _enabled
    _enabled = bool(enabled)


def fallback_enabled() -> bool:
    return _enabled


def _is_mlx(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "mlx"


def unsupported(op_name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{op_name} has no MLX lowering for device 'mlx'. Set TORCH_MLX_FALLBACK=1 (or call "
        f"torch_mlx.set_fallback(True)) to run it on the CPU over the same memory, or move the "
        f"tensors to the CPU first."
    )


def run_on_cpu(op, args, kwargs):
    """Run ``op`` on CPU aliases of its "mlx" arguments; fresh outputs are copied back to "mlx",
    outputs that alias an argument (in-place and out= ops) come back as that argument."""
    name = str(op)
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"torch_mlx: {name} has no MLX lowering; running it on the CPU", stacklevel=3)
    aliases = {}

    def to_cpu(x):
        if _is_mlx(x):
            alias = _C.cpu_alias(x)
            aliases[id(alias)] = (alias, x)
            return alias
        if isinstance(x, torch.device) and x.type == "mlx":
            return torch.device("cpu")
        return x

    generators = []

    def to_cpu_gen(x):
        if isinstance(x, torch.Generator) and x.device.type == "mlx":
            cpu = torch.Generator()
            cpu.set_state(x.get_state())
            generators.append((cpu, x))
            return cpu
        return to_cpu(x)

    cpu_args, cpu_kwargs = tree_map(to_cpu_gen, (args, kwargs))
    out = op(*cpu_args, **cpu_kwargs)
    for cpu, gen in generators:  # the mlx generator advances as the CPU one did
        gen.set_state(cpu.get_state())

    def back(x):
        if isinstance(x, torch.Tensor):
            hit = aliases.get(id(x))
            return hit[1] if hit is not None else x.to("mlx")
        return x

    return tree_map(back, out)


def _fallback_kernel(op, *args, **kwargs):
    if _enabled:
        return run_on_cpu(op, args, kwargs)
    raise unsupported(op._schema.name  # with its namespace: aten::, vllm::, a user library's
                      + (f".{op._overloadname}" if op._overloadname != "default" else ""))


_lib = torch.library.Library("_", "IMPL")
_lib.fallback(_fallback_kernel, "PrivateUse1")
