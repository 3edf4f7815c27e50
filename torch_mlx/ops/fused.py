"""Fused ops for compiled graphs: ``torch_mlx::`` operators that stand for aten patterns models
write out op by op.

torch_mlx.compile_patterns rewrites those patterns in a graph before it is lowered; each op here
then computes the pattern's exact values (same roundings) in fewer MLX kernels. On a GPU a small
model's decode step is bound by how many kernels the host launches (docs/gpu_visits.md: 700 for
transformers' compiled Llama step, 276 for mlx-lm's), so a pattern that costs 3 kernels per use
and appears 2-4 times per layer is worth an op. The ops also run eagerly on "mlx" (their fake
kernels give torch the shapes), which is how tests check them against the patterns.
"""
import mlx.core as mx
import torch

from .registry import lowering

LIB = torch.library.Library("torch_mlx", "DEF")


def _define(schema: str, fake):
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    torch.library.register_fake(f"torch_mlx::{name}", fake, lib=LIB)
    return getattr(torch.ops.torch_mlx, name).default


rms_norm_op = _define("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor",
                      lambda x, weight, eps: torch.empty_like(x))
rotary_half_op = _define("rotary_half(Tensor x, Tensor cos, Tensor sin) -> Tensor",
                         lambda x, cos, sin: torch.empty_like(x))


@lowering("torch_mlx::rms_norm")
def rms_norm(x, weight, eps):
    """``(x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)``, the
    normalisation of transformers' RMSNorm, then ``weight *`` that (a weight of x's dtype and
    size of its last dim) if given. One kernel on the GPU: float32 inside, the normalised value
    rounded to x's dtype, then the weight's product rounded again, as the pattern's two ops
    (MLX's kernels and its CPU fallback compute ``w * T(x * inv_rms)``)."""
    return mx.fast.rms_norm(x, weight, eps)


@lowering("torch_mlx::rotary_half")
def rotary_half(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., h:], x[..., :h])``
    (transformers' apply_rotary_pos_emb; cos and sin broadcast to x, all of x's dtype), as one
    elementwise kernel: the last dim is viewed as (2, h), the halves swapped by a reversed view
    and signed by a multiply, so nothing is concatenated. Every product and the sum round to x's
    dtype as the pattern's ops do (negating and multiplying by 1 are exact)."""
    h = x.shape[-1] // 2

    def halves(a):  # [..., 2h] -> [..., 2, h], a view; a trailing 1 keeps broadcasting
        return a[..., None] if a.shape[-1] == 1 else a.reshape(*a.shape[:-1], 2, h)

    x2 = halves(x)
    swapped = x2[..., ::-1, :] * mx.array([[-1], [1]], dtype=x.dtype)
    return (x2 * halves(cos) + swapped * halves(sin)).reshape(x.shape)
