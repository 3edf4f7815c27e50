"""torch's own decompositions as kernels for aten ops that would otherwise reach "mlx" with none.

Imported last by ``torch_mlx/ops/__init__.py``, so it only fills gaps the family modules leave.

Selection rule: an aten overload ``op`` gets ``torch._decomp.decomposition_table[op]`` as its
PrivateUse1 kernel (a torch-level kernel, like ``@torch_kernel``) when all of these hold:

1. it is listed in ``EXACT`` below: its decomposition was checked to give the CPU kernel's
   results (OpInfo samples, ``torch.testing.assert_close`` at default tolerances) on "mlx" with
   the CPU fallback off -- which also checks that every op it decomposes into is lowered.
   Decompositions that draw random numbers differently from the CPU generator, compute in
   float64, or round differently from the CPU kernel beyond the default tolerances are not
   listed (e.g. tril_indices/triu_indices, whose decompositions take a float64 square root);
2. no family module covers it: it is not in the lowering table (as a functional op or as the
   in-place / out= variant the adapter derives from one), not a ``@torch_kernel``, and has no
   native C++ kernel;
3. ATen has no CompositeImplicitAutograd / CompositeExplicitAutograd(NonFunctional) kernel for
   it: those already run on "mlx" through the ops they call.

A decomposition that declines an input (returns ``NotImplemented``) or re-enters its own op
falls through to the standard no-lowering path (``NotImplementedError``, or the CPU fallback
when it is switched on).
"""
from __future__ import annotations

import threading

import torch
from torch._decomp import decomposition_table

from .. import fallback
from . import registry

# Checked against the CPU with OpInfo (see the module docstring); the comment names the OpInfo.
EXACT = [
    "count_nonzero.dim_IntList",  # count_nonzero
    "narrow_copy.out",  # narrow_copy (out=)
    "trace",  # trace
    "channel_shuffle",  # nn.functional.channel_shuffle
    "im2col",  # nn.functional.unfold
    "im2col.out",
    "col2im",  # nn.functional.fold
    "col2im.out",
    "max_unpool2d",  # nn.functional.max_unpool2d
    "max_unpool2d.out",
    "max_unpool3d",  # nn.functional.max_unpool3d
    "max_unpool3d.out",
    "renorm.out",  # renorm
    "eye.out",  # eye
    "eye.m_out",
    "mvlgamma.out",  # mvlgamma
    "linalg_cross.out",  # linalg.cross, cross
    "huber_loss",  # nn.functional.huber_loss
    "huber_loss.out",
    "huber_loss_backward.out",
    "smooth_l1_loss.out",  # nn.functional.smooth_l1_loss
    "smooth_l1_loss_backward.grad_input",
    "multi_margin_loss",  # nn.functional.multi_margin_loss
    "multi_margin_loss.out",
    "multilabel_margin_loss_forward",  # nn.functional.multilabel_margin_loss
    "multilabel_margin_loss_forward.output",
    "_weight_norm_interface",  # torch._weight_norm (nn.utils weight_norm); no OpInfo, tested
    "binary_cross_entropy",  # nn.functional.binary_cross_entropy
    "binary_cross_entropy.out",
    "binary_cross_entropy_backward",
    "binary_cross_entropy_backward.grad_input",
]

_active = threading.local()


def _kernel(op, decomp):
    def kernel(*args, **kwargs):
        running = getattr(_active, "ops", None)
        if running is None:
            running = _active.ops = set()
        if op in running:  # the decomposition calls its own op again: no progress
            return fallback._fallback_kernel(op, *args, **kwargs)
        running.add(op)
        try:
            out = decomp(*args, **kwargs)
        finally:
            running.discard(op)
        if out is NotImplemented:
            return fallback._fallback_kernel(op, *args, **kwargs)
        return out

    kernel.__name__ = f"mlx_decomp_{registry._qualname(op).replace('.', '_')}"
    return kernel


def _lowered_names() -> set[str]:
    """Every overload the family modules give a kernel: table entries, the in-place and out=
    variants the adapter will derive from them, torch-level kernels."""
    names = set(registry.TORCH_KERNELS)
    for name, low in registry.TABLE.items():
        if not low.eager:
            continue
        names.add(name)
        op = registry.overload(name)
        for variant in (registry.inplace_variant(op), registry.out_variant(op)):
            if variant is not None:
                names.add(registry._qualname(variant))
    return names


def _reaches_backend_without_kernel(op) -> bool:
    full = op.name()
    return not any(torch._C._dispatch_has_kernel_for_dispatch_key(full, key) for key in (
        "PrivateUse1", "CompositeImplicitAutograd", "CompositeExplicitAutograd",
        "CompositeExplicitAutogradNonFunctional"))


def select() -> dict[str, object]:
    """{overload name: decomposition} chosen by the rule in the module docstring."""
    lowered = _lowered_names()
    chosen = {}
    for name in EXACT:
        op = registry.overload(name)
        if name in lowered or op not in decomposition_table:
            continue
        if _reaches_backend_without_kernel(op):
            chosen[name] = decomposition_table[op]
    return chosen


SELECTED = select()
for _name, _decomp in SELECTED.items():
    registry.torch_kernel(_name)(_kernel(registry.overload(_name), _decomp))
