"""Graph rewrites before lowering: aten patterns that models write out op by op, replaced by what
computes the same values in fewer MLX kernels.

On a GPU, a small model's decode step costs about one host launch per kernel, and transformers
writes its layers out in small ops (docs/gpu_visits.md, census:hf: 700 kernels a Llama step
against mlx-lm's 276). Each rewrite here keeps the pattern's values exactly (same roundings); a
node is rewritten only when every intermediate of the pattern has no other user, so nothing
else reads a value that disappears.

- RMSNorm (transformers' LlamaRMSNorm and its copies): ``y = v * rsqrt(mean(v**2, -1) + eps)``
  on a float32 ``v``, and when ``v = x.float()`` and ``y`` is cast back to x's dtype, the whole
  cast-normalise-cast, and the weight's multiply after it where the weight has the result's
  dtype -> ``torch_mlx::rms_norm`` (MLX's fused kernel: 1 kernel instead of 4).
- Rotary embedding written with ``rotate_half``: ``x * cos + cat(-x2, x1) * sin`` ->
  ``torch_mlx::rotary_half`` (1 elementwise kernel instead of negate, concatenate, multiply-add).
- Attention inputs: keys and values repeated for grouped-query attention (transformers'
  ``repeat_kv``: unsqueeze, expand, clone, view) go to the attention unrepeated (MLX's attention
  shares each key/value head among its query heads: no copy of the KV cache a layer), and a
  boolean mask that torch made additive (``where(mask, 0, -inf)``) goes as the boolean mask (no
  cast of it a layer; checks on the one mask are shared by every layer).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .ops import fused

aten = torch.ops.aten
_SDPA = aten._scaled_dot_product_fused_attention_overrideable.default
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def rewrite(gm: fx.GraphModule) -> int:
    """Apply every rewrite to ``gm`` in place; returns how many patterns were replaced."""
    count = 0
    for node in list(gm.graph.nodes):
        if node._erased:  # by an earlier rewrite
            continue
        if node.target is aten.mul.Tensor:
            count += _rms_norm(gm.graph, node)
        elif node.target is aten.add.Tensor:
            count += _rotary_half(gm.graph, node)
        elif node.target is _SDPA:
            count += _attention_inputs(node)
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


# ----------------------------------------------------------------------------------------------
# Matching helpers


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _sole_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def _last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim % ndim == ndim - 1


def _cast_of(node) -> fx.Node | None:
    """``x`` where ``node`` is ``x.to(dtype)`` (``_to_copy`` with a dtype and nothing else)."""
    if _call(node, aten._to_copy.default) and set(node.kwargs) == {"dtype"} \
            and len(node.args) == 1:
        return node.args[0]
    return None


def _replace(graph: fx.Graph, old: fx.Node, target, args) -> fx.Node:
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


# ----------------------------------------------------------------------------------------------
# RMSNorm


def _rms_norm(graph: fx.Graph, mul: fx.Node) -> int:
    """mul(v, rsqrt(add(mean(pow(v, 2), [-1], True), eps))), v float32 -> rms_norm."""
    for v, r in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if not (_call(r, aten.rsqrt.default) and _sole_user(r, mul)):
            continue
        add = r.args[0]
        if not (_call(add, aten.add.Tensor) and _sole_user(add, r) and len(add.args) == 2
                and isinstance(add.args[1], float) and not add.kwargs):
            continue
        mean = add.args[0]
        if not (_call(mean, aten.mean.dim) and _sole_user(mean, add) and not mean.kwargs
                and len(mean.args) == 3 and mean.args[2] is True):
            continue
        square, dims = mean.args[0], mean.args[1]
        if not (_call(square, aten.pow.Tensor_Scalar) and _sole_user(square, mean)
                and square.args == (v, 2)):
            continue
        value = _val(v)
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32
                and value.dim() >= 1 and list(dims) in ([-1], [value.dim() - 1])):
            continue
        eps = add.args[1]
        # x.float() normalised and cast back to x's dtype: one op on x, rounded once as the
        # cast does
        source = _cast_of(v)
        back = next(iter(mul.users)) if len(mul.users) == 1 else None
        if source is not None and _cast_of(back) is mul and isinstance(_val(source), torch.Tensor) \
                and _val(source).dtype in (torch.float16, torch.bfloat16) \
                and back.kwargs["dtype"] == _val(source).dtype:
            normed = _replace(graph, back, fused.rms_norm_op, (source, None, eps))
            graph.erase_node(mul)
        else:
            normed = _replace(graph, mul, fused.rms_norm_op, (v, None, eps))
        for node in (r, add, mean, square):
            graph.erase_node(node)
        _fold_weight(graph, normed)
        return 1
    return 0


def _fold_weight(graph: fx.Graph, normed: fx.Node) -> None:
    """rms_norm(x, None, eps) * weight -> rms_norm(x, weight, eps): a 1-D weight of the result's
    dtype and size of its last dim (MLX's kernel rounds the normalised value to that dtype, then
    the product, as the two ops do)."""
    scale = next(iter(normed.users)) if len(normed.users) == 1 else None
    if not (_call(scale, aten.mul.Tensor) and len(scale.args) == 2 and not scale.kwargs):
        return
    weight = scale.args[1] if scale.args[0] is normed else scale.args[0]
    w, out, result = _val(weight), _val(normed), _val(scale)
    if not (isinstance(weight, fx.Node) and isinstance(w, torch.Tensor) and w.dim() == 1
            and isinstance(out, torch.Tensor) and isinstance(result, torch.Tensor)
            and w.dtype == out.dtype == result.dtype and w.shape[0] == out.shape[-1]
            and tuple(result.shape) == tuple(out.shape)):
        return
    source, _, eps = normed.args
    _replace(graph, scale, fused.rms_norm_op, (source, weight, eps))
    graph.erase_node(normed)


# ----------------------------------------------------------------------------------------------
# Rotary embedding written with rotate_half


def _rotate_half_of(cat: fx.Node, user: fx.Node) -> fx.Node | None:
    """``x`` where ``cat`` is cat([-x[..., h:], x[..., :h]], -1), x's last dim 2h, and the cat and
    its parts feed nothing else."""
    if not (_call(cat, aten.cat.default) and _sole_user(cat, user) and len(cat.args) == 2):
        return None
    parts, dim = cat.args
    if len(parts) != 2:
        return None
    neg, low = parts
    if not (_call(neg, aten.neg.default) and _sole_user(neg, cat)):
        return None
    high = neg.args[0]
    if not (_call(high, aten.slice.Tensor) and _call(low, aten.slice.Tensor)
            and _sole_user(high, neg) and _sole_user(low, cat)):
        return None
    x = low.args[0]
    value = _val(x)
    if high.args[0] is not x or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    ndim, size = value.dim(), value.shape[-1]
    if not (isinstance(size, int) and size % 2 == 0 and _last_dim(dim, ndim)):
        return None
    half = size // 2

    def is_slice(node, start, end) -> bool:  # slice(self, dim=0, start=None, end=None, step=1)
        _, sdim, sstart, send, step = list(node.args) + [None, 0, None, None, 1][len(node.args):]
        send = size if send is None else send
        return (not node.kwargs and _last_dim(sdim, ndim) and step == 1
                and (sstart or 0) == start and isinstance(send, int) and min(send, size) == end)

    return x if is_slice(high, half, size) and is_slice(low, 0, half) else None


def _rotary_half(graph: fx.Graph, add: fx.Node) -> int:
    """add(mul(x, cos), mul(rotate_half(x), sin)) -> rotary_half(x, cos, sin), every operand of
    one dtype and cos/sin broadcasting to x's shape."""
    if len(add.args) != 2 or add.kwargs:
        return 0
    for m1, m2 in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        if not (_call(m1, aten.mul.Tensor) and _call(m2, aten.mul.Tensor)
                and _sole_user(m1, add) and _sole_user(m2, add)):
            continue
        for cat, sin in ((m2.args[0], m2.args[1]), (m2.args[1], m2.args[0])):
            x = _rotate_half_of(cat, m2) if isinstance(cat, fx.Node) else None
            if x is None or x not in m1.args:
                continue
            cos = m1.args[1] if m1.args[0] is x else m1.args[0]
            values = [_val(n) for n in (x, cos, sin, add)]
            if not all(isinstance(v, torch.Tensor) for v in values):
                continue
            xv, cv, sv, out = values
            if len({v.dtype for v in values}) != 1 or not xv.dtype.is_floating_point \
                    or out.shape != xv.shape or not all(_halves_fit(v, xv) for v in (cv, sv)):
                continue
            _replace(graph, add, fused.rotary_half_op, (x, cos, sin))
            for node in (m1, m2, cat):
                if not node.users:
                    graph.erase_node(node)
            return 1
    return 0


def _halves_fit(table: torch.Tensor, x: torch.Tensor) -> bool:
    """cos/sin broadcast to x, their last dim x's (or 1)."""
    if table.dim() > x.dim() or table.shape[-1] not in (1, x.shape[-1]):
        return False
    try:
        return tuple(torch.broadcast_shapes(table.shape, x.shape)) == tuple(x.shape)
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------------------------
# Attention inputs


def _unrepeated(node) -> tuple[fx.Node, int] | None:
    """(kv, n) where ``node`` is kv [B, H, L, D] repeated n times per head (transformers'
    repeat_kv: kv[:, :, None].expand(B, H, n, L, D), made contiguous, viewed [B, H*n, L, D])."""
    if not _call(node, *_VIEWS):
        return None
    clone = node.args[0]
    if not (_call(clone, aten.clone.default) and _sole_user(clone, node)):
        return None
    expand = clone.args[0]
    if not (_call(expand, aten.expand.default) and _sole_user(expand, clone)):
        return None
    unsqueeze = expand.args[0]
    if not (_call(unsqueeze, aten.unsqueeze.default) and _sole_user(unsqueeze, expand)
            and unsqueeze.args[1] == 2):
        return None
    kv = unsqueeze.args[0]
    kv_val, out_val, expanded = _val(kv), _val(node), _val(expand)
    if not all(isinstance(v, torch.Tensor) for v in (kv_val, out_val, expanded)):
        return None
    if kv_val.dim() != 4 or expanded.dim() != 5 or out_val.dim() != 4:
        return None
    batch, heads, length, dim = kv_val.shape
    n = expanded.shape[2]
    if tuple(expanded.shape) != (batch, heads, n, length, dim) \
            or tuple(out_val.shape) != (batch, heads * n, length, dim):
        return None
    return kv, n


def _additive_of_bool(node) -> fx.Node | None:
    """``mask`` where ``node`` is where(mask, 0, -inf) with a boolean mask (how torch hands a
    boolean mask to a fused attention) and the result broadcasts like the mask."""
    if not (_call(node, aten.where.self) and len(node.args) == 3):
        return None
    mask, zero, minus_inf = node.args
    mask_val, out = _val(mask), _val(node)
    if not (isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.bool
            and isinstance(out, torch.Tensor) and tuple(mask_val.shape) == tuple(out.shape)):
        return None

    def scalar(n, value) -> bool:
        return _call(n, aten.scalar_tensor.default) and n.args[0] == value

    return mask if scalar(zero, 0.0) and scalar(minus_inf, -math.inf) else None


def _attention_inputs(sdpa: fx.Node) -> int:
    args = list(sdpa.args)
    if len(args) < 3:
        return 0
    count = 0
    key, value = _unrepeated(args[1]), _unrepeated(args[2])
    query = _val(args[0])
    if key and value and key[1] == value[1] and isinstance(query, torch.Tensor) \
            and query.dim() == 4 and query.shape[1] == _val(key[0]).shape[1] * key[1]:
        args[1], args[2] = key[0], value[0]
        count += 1
    if len(args) > 3:
        mask = _additive_of_bool(args[3])
        if mask is not None:
            args[3] = mask
            count += 1
    sdpa.args = tuple(args)
    return count
