"""vLLM's fused mixture of experts (FusedMoE) on "mlx": top-k routing and the routed experts.

vLLM builds every MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek, ...) as a ``MoERunner``
holding a router (logits -> top-k expert ids and weights), the experts' weights in a
``RoutedExperts`` module and its quantization method, whose ``apply`` runs CUDA/Triton kernels
or, on vLLM's CPU platform, a C++ grouped GEMM. Here the method is replaced:

- ``MLXFusedMoEMethod`` is vLLM's ``UnquantizedFusedMoEMethod`` registered out of tree (vLLM
  builds it wherever a layer's experts are unquantized); ``MLXQuantizedMoEMethod`` holds experts
  quantized by mlx_lm (quantization method "mlx", quantization/mlx_affine.py). Both are
  *monolithic* methods in vLLM's terms: the runner hands them the router logits and they route
  and compute the experts themselves (``MLXMoEMixin``), through torch ops whose MLX lowerings
  sit in torch_mlx's table, so eager and compiled forwards run the same code:
  ``vllm_metal::moe_route`` and ``vllm_metal::moe_experts`` (``quantized_moe_experts`` on
  packed weights).
- The routing a layer needs is read once, at load time, from the router vLLM built for it
  (``Routing.of``): vLLM picks the router class from the model's options, and some classes
  drop options (a plain top-k router ignores ``routed_scaling_factor``), so the router, not
  the model's arguments, says what the layer computes. Routers this file does not reproduce
  stop the start-up with an error naming them.
- ``prepare_moe_layers`` (called by the model runner after loading) binds each layer's routing
  and makes its runner call its forward directly, as vLLM's CPU platform does, instead of
  through the opaque ``vllm::moe_forward`` op: dynamo then traces the router logits, the shared
  experts and the ops above into the step's graph, which torch_mlx lowers into one lazy MLX
  computation.
- ``MLXRoutedExperts`` (vLLM's RoutedExperts out of tree) also loads mlx_lm's stacked experts.

The experts: each token's k (token, expert) pairs are sorted by expert and the pairs' rows of x
gathered, so consecutive rows share an expert; each row is multiplied by its expert's matrices,
the results put back in token order, scaled by the routing weights and summed over the k
experts. On the GPU the products are ``mx.gather_mm`` / ``mx.gather_qmm`` (with fewer than
``SORT_FROM_PAIRS`` pairs, decode steps, rows meet their experts unsorted). MLX's CPU versions
make one call per row, reading an expert's weights once per row; on MLX's CPU backend the
products are torch_mlx's kernels (csrc/moe_cpu.cpp, csrc/quantized_cpu.cpp), one pass over an
expert's weights per run of rows that share it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import mlx.core as mx
import torch
from torch.nn import Parameter
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, UnquantizedFusedMoEMethod
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.utils import set_weight_attrs

from torch_mlx import _C
from torch_mlx.ops.registry import lowering

from ..quantization.mlx_affine import QuantSpec, copy_rows
from .activation import gated, gelu, silu, silu_and_mul
from .library import cpu_backend, define

SORT_FROM_PAIRS = 64  # (token, expert) pairs from which rows are sorted by expert
# On MLX's CPU backend the experts' products run torch_mlx's grouped kernels; False runs MLX's
# gather_mm / gather_qmm there too, as on the GPU (tests compare the two)
CPU_KERNELS = True
# MLX CUDA 0.32.4's grouped GEMM (gather_mm with sorted_indices=True: cutlass, float weights)
# returns wrong rows when the weights were made from host data (weights loaded through torch are),
# and right ones for weights an MLX GPU op produced; measured on the H100, 2026-12-06 (devlog).
# There the rows are still sorted by expert, and gather_mm runs its gathered GEMM.
GROUPED_GEMM = not mx.cuda.is_available()


# ---- the ops


def _route_fake(logits, top_k, *args):
    shape = (logits.shape[0], top_k)
    return (logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty(shape, dtype=torch.int32))


def _experts_fake(x, *args):
    return torch.empty_like(x)


moe_route_op = define(
    "moe_route(Tensor router_logits, int top_k, str scoring_func, bool renormalize, "
    "int num_expert_group, int topk_group, float routed_scaling_factor, "
    "Tensor? correction_bias) -> (Tensor, Tensor)", _route_fake)
moe_experts_op = define(
    "moe_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13, Tensor w2, "
    "Tensor? w13_bias, Tensor? w2_bias, str activation, float? clamp_limit, "
    "bool weight_on_input) -> Tensor", _experts_fake)
quantized_moe_experts_op = define(
    "quantized_moe_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13, "
    "Tensor w13_scales, Tensor w13_biases, int w13_group_size, int w13_bits, Tensor w2, "
    "Tensor w2_scales, Tensor w2_biases, int w2_group_size, int w2_bits, str activation, "
    "float? clamp_limit, bool weight_on_input) -> Tensor", _experts_fake)


@lowering("vllm_metal::moe_route")
def moe_route(logits, top_k, scoring_func, renormalize, num_expert_group, topk_group,
              routed_scaling_factor, correction_bias):
    """vLLM's top-k routing (fused_topk, fused_topk_bias, grouped_topk): scores in float32,
    experts chosen by score (plus the correction bias, if any: it steers the choice only),
    within the best ``topk_group`` of ``num_expert_group`` groups; weights are the chosen
    scores, renormalized to sum 1 if asked, then scaled. Ids come unordered (the experts'
    sum does not depend on their order)."""
    logits = logits.astype(mx.float32)
    if scoring_func == "softmax":
        scores = mx.softmax(logits, axis=-1, precise=True)
    elif scoring_func == "sigmoid":
        scores = mx.sigmoid(logits)
    else:
        raise NotImplementedError(f"MoE scoring function {scoring_func!r} is not supported on "
                                  "mlx (softmax and sigmoid are)")
    choice = scores if correction_bias is None else scores + correction_bias.astype(mx.float32)
    if num_expert_group > 1:
        tokens, experts = choice.shape
        groups = choice.reshape(tokens, num_expert_group, experts // num_expert_group)
        if correction_bias is not None:  # a group's score: its two best biased scores
            group_scores = mx.topk(groups, 2, axis=-1).sum(axis=-1)
        else:
            group_scores = groups.max(axis=-1)
        best = mx.argpartition(-group_scores, kth=topk_group - 1, axis=-1)[..., :topk_group]
        kept = mx.put_along_axis(mx.zeros(group_scores.shape, mx.bool_), best,
                                 mx.array(True), axis=-1)
        choice = mx.where(kept[..., None], groups, -mx.inf).reshape(tokens, experts)
    ids = mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.astype(mx.int32)


def _activate(h: mx.array, activation: str, clamp_limit: float | None) -> mx.array:
    """vLLM's MoE activations (fused_moe/activation.py) on the first product's output: gated
    ones take the gate from the first half of the rows and the up projection from the second,
    except swigluoai, whose checkpoints interleave them."""
    if activation == "silu" and clamp_limit is not None:  # swiglu_limit
        d = h.shape[-1] // 2
        gate = mx.minimum(h[..., :d].astype(mx.float32), clamp_limit)
        up = mx.clip(h[..., d:].astype(mx.float32), -clamp_limit, clamp_limit)
        return (silu(gate) * up).astype(h.dtype)
    if clamp_limit is not None:
        raise NotImplementedError(f"MoE activation {activation!r} with a clamp limit is not "
                                  "supported on mlx")
    if activation == "silu":
        return silu_and_mul(h)  # the dense MLP's SiluAndMul (one torch_mlx kernel on the CPU)
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return gated(h, lambda a: gelu(a, approximate))
    if activation == "swigluoai":  # gpt-oss: alpha 1.702, limit 7, interleaved gate/up
        gate = mx.minimum(h[..., ::2].astype(mx.float32), 7.0)
        up = mx.clip(h[..., 1::2].astype(mx.float32), -7.0, 7.0)
        return ((up + 1.0) * gate * mx.sigmoid(1.702 * gate)).astype(h.dtype)
    ungated = {"silu_no_mul": silu, "gelu_no_mul": lambda a: gelu(a, "none"),
               "gelu_tanh_no_mul": lambda a: gelu(a, "tanh"),
               "relu2_no_mul": lambda a: mx.square(mx.maximum(a, 0.0))}
    if activation in ungated:
        return ungated[activation](h.astype(mx.float32)).astype(h.dtype)
    raise NotImplementedError(
        f"MoE activation {activation!r} is not supported on mlx (supported: silu, gelu, "
        f"gelu_tanh, swigluoai, {', '.join(ungated)})")


def routed_experts(x: mx.array, topk_weights: mx.array, topk_ids: mx.array, project: Callable,
                   activation: str, clamp_limit: float | None, weight_on_input: bool,
                   grouped: bool) -> mx.array:
    """sum_j w[t, j] * down(act(gate_up(x[t]))) with expert ids[t, j], for every token t.

    ``project(rows, experts, which, sorted_experts)`` multiplies rows by the transposed matrix
    ``which`` ("w13" or "w2") of each row's expert. ``grouped`` (the CPU kernels): always sort,
    and rows are [pairs, K]; otherwise (``mx.gather_mm``) rows are [..., 1, K] with ``experts``
    of their batch shape, sorted from SORT_FROM_PAIRS pairs on."""
    tokens, k = topk_ids.shape
    if weight_on_input:  # Llama 4: the (single) expert's weight scales its input
        x = (x.astype(mx.float32) * topk_weights).astype(x.dtype)
    ids = topk_ids.astype(mx.uint32)
    if grouped or tokens * k >= SORT_FROM_PAIRS:
        flat = ids.flatten()
        order = mx.argsort(flat)
        experts = flat[order]
        rows = mx.take(x, order // k, axis=0)  # [pairs, H]
        if not grouped:
            rows = rows[:, None, :]
        hidden = _activate(project(rows, experts, "w13", True), activation, clamp_limit)
        out = project(hidden, experts, "w2", True).reshape(tokens * k, -1)
        out = mx.take(out, mx.argsort(order), axis=0).reshape(tokens, k, -1)  # token order
    else:
        rows = x[:, None, None, :]  # [tokens, 1, 1, H]: broadcast against ids [tokens, k]
        hidden = _activate(project(rows, ids, "w13", False), activation, clamp_limit)
        out = project(hidden, ids, "w2", False).squeeze(-2)  # [tokens, k, H]
    if weight_on_input:
        return out.sum(axis=1)
    return (out.astype(mx.float32) * topk_weights[..., None]).sum(axis=1)


def _add_bias(out: mx.array, bias: mx.array | None, experts: mx.array) -> mx.array:
    if bias is None:
        return out
    bias = mx.take(bias, experts, axis=0)
    return out + (bias if out.ndim == bias.ndim else mx.expand_dims(bias, -2))


@lowering("vllm_metal::moe_experts")
def moe_experts(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, activation, clamp_limit,
                weight_on_input):
    weights = {"w13": (w13, w13_bias), "w2": (w2, w2_bias)}
    # On MLX's CPU backend gather_mm is one BLAS call per row (and float32 only): torch_mlx's
    # kernel makes one per run of rows sharing an expert, through the same BLAS
    grouped = cpu_backend() and CPU_KERNELS and _C.has_cpu_blas()
    wide = cpu_backend() and x.dtype != mx.float32

    def project(rows, experts, which, sorted_experts):
        w, bias = weights[which]
        if grouped:
            out = _C.gather_matmul(rows, w, experts)
        else:
            if wide:  # half-precision experts widened per product
                rows, w = rows.astype(mx.float32), w.astype(mx.float32)
            out = mx.gather_mm(rows, w.swapaxes(-1, -2), rhs_indices=experts,
                               sorted_indices=sorted_experts and GROUPED_GEMM)
        return _add_bias(out, bias, experts)

    return routed_experts(x, topk_weights, topk_ids, project, activation, clamp_limit,
                          weight_on_input, grouped)


@lowering("vllm_metal::quantized_moe_experts")
def quantized_moe_experts(x, topk_weights, topk_ids, w13, w13_scales, w13_biases,
                          w13_group_size, w13_bits, w2, w2_scales, w2_biases, w2_group_size,
                          w2_bits, activation, clamp_limit, weight_on_input):
    packed = {"w13": (w13, w13_scales, w13_biases, w13_group_size, w13_bits),
              "w2": (w2, w2_scales, w2_biases, w2_group_size, w2_bits)}
    # MLX's CPU gather_qmm unpacks one value at a time, once per row: torch_mlx's kernel
    # (csrc/quantized_cpu.cpp) makes one pass over an expert's packed weights per run of rows
    grouped = cpu_backend() and CPU_KERNELS

    def project(rows, experts, which, sorted_experts):
        w, scales, biases, group_size, bits = packed[which]
        if grouped:
            return _C.affine_gather_qmm(rows, w, scales, biases, experts, group_size, bits)
        return mx.gather_qmm(rows, w, scales, biases, rhs_indices=experts, transpose=True,
                             group_size=group_size, bits=bits, sorted_indices=sorted_experts)

    return routed_experts(x, topk_weights, topk_ids, project, activation, clamp_limit,
                          weight_on_input, grouped)


# ---- routing, as the router vLLM built for a layer computes it


@dataclasses.dataclass
class Routing:
    """One layer's top-k routing (arguments of ``moe_route``), or a model's own function."""
    top_k: int
    scoring_func: str = "softmax"
    renormalize: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: torch.Tensor | None = None
    custom_function: Callable | None = None

    @classmethod
    def of(cls, runner, prefix: str) -> "Routing":
        from vllm.model_executor.layers.fused_moe.router.custom_routing_router import (
            CustomRoutingRouter,
        )
        from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import (
            FusedTopKBiasRouter,
        )
        from vllm.model_executor.layers.fused_moe.router.fused_topk_router import (
            FusedTopKRouter,
        )
        from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
            GroupedTopKRouter,
        )

        router = runner.router
        name = type(router).__name__

        def refuse(what: str):
            return NotImplementedError(
                f"{prefix}: {what} is not supported on mlx; MoE layers here route by softmax or "
                "sigmoid top-k, grouped top-k, a correction bias or the model's own routing "
                "function")

        if router.eplb_state is not None:
            raise refuse("expert-parallel load balancing (EPLB)")
        if getattr(router, "num_fused_shared_experts", 0):
            raise refuse("shared experts fused into the routed ones")
        if type(router) is FusedTopKRouter:  # ignores routed_scaling_factor, as vLLM does
            return cls(router.top_k, router.scoring_func, router.renormalize)
        if type(router) is CustomRoutingRouter:
            return cls(router.top_k, renormalize=router.renormalize,
                       custom_function=router.custom_routing_function)
        if type(router) is GroupedTopKRouter:
            experts = runner.moe_config.num_experts
            groups = router.num_expert_group
            if experts > groups and experts % groups == 0:
                return cls(router.top_k, router.scoring_func, router.renormalize, groups,
                           router.topk_group, router.routed_scaling_factor,
                           router.e_score_correction_bias)
            if router.e_score_correction_bias is None:  # vLLM's fallback: plain softmax top-k
                return cls(router.top_k, "softmax", router.renormalize)
            return cls(router.top_k, router.scoring_func, router.renormalize,
                       routed_scaling_factor=router.routed_scaling_factor,
                       correction_bias=router.e_score_correction_bias)
        if type(router) is FusedTopKBiasRouter:
            if router._hash_indices_table is not None or router.bias_vl is not None:
                raise refuse("hash or vision-biased routing")
            if router.scoring_func not in ("softmax", "sigmoid"):
                raise refuse(f"scoring function {router.scoring_func!r}")
            return cls(router.top_k, router.scoring_func, router.renormalize,
                       routed_scaling_factor=router.routed_scaling_factor,
                       correction_bias=router.e_score_correction_bias)
        raise refuse(f"routing by vLLM's {name}")

    def __call__(self, x: torch.Tensor, router_logits: torch.Tensor):
        if self.custom_function is not None:
            weights, ids = self.custom_function(hidden_states=x, gating_output=router_logits,
                                                topk=self.top_k, renormalize=self.renormalize)
            return weights.to(torch.float32), ids.to(torch.int32)
        bias = self.correction_bias
        return moe_route_op(router_logits, self.top_k, self.scoring_func, self.renormalize,
                            self.num_expert_group, self.topk_group,
                            float(self.routed_scaling_factor),
                            None if bias is None else bias.data)


class MLXMoEMixin:
    """A monolithic FusedMoE method: route with the layer's Routing, then ``experts``."""

    routing: Routing | None = None

    @property
    def is_monolithic(self) -> bool:
        return True

    @property
    def supports_eplb(self) -> bool:
        return False

    def experts(self, layer: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_monolithic(self, layer: RoutedExperts, x: torch.Tensor,
                         router_logits: torch.Tensor, input_ids: torch.Tensor | None = None):
        if self.routing is None:
            raise RuntimeError(f"{layer.layer_name}: MoE routing was not bound at load time "
                               "(vllm_metal.ops.moe.prepare_moe_layers)")
        if layer.routing_sink is not None:
            raise NotImplementedError(f"{layer.layer_name}: capturing routed experts is not "
                                      "supported on mlx")
        topk_weights, topk_ids = self.routing(x, router_logits)
        return self.experts(layer, x, topk_weights, topk_ids)


def _clamp_limit(layer: RoutedExperts) -> float | None:
    if layer.swiglu_alpha is not None or layer.swiglu_beta is not None:
        raise NotImplementedError(f"{layer.layer_name}: SwiGLU alpha/beta parameters are not "
                                  "supported on mlx")
    return None if layer.swiglu_limit is None else float(layer.swiglu_limit)


def _check_activation_config(layer: RoutedExperts) -> None:
    config = layer.moe_config
    if config.activation_situ_beta is not None or config.activation_situ_linear_beta is not None:
        raise NotImplementedError(f"{layer.layer_name}: the SITU activation is not supported "
                                  "on mlx")


@UnquantizedFusedMoEMethod.register_oot
class MLXFusedMoEMethod(MLXMoEMixin, UnquantizedFusedMoEMethod):
    """Unquantized experts: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], as vLLM
    creates and loads them."""

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        # vLLM's version rewrites every weight in place (ROCm padding; a full copy here) and
        # builds a CUDA/CPU kernel; the weights are used as loaded.
        _check_activation_config(layer)
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)

    def experts(self, layer, x, topk_weights, topk_ids):
        return moe_experts_op(x, topk_weights, topk_ids, layer.w13_weight, layer.w2_weight,
                              getattr(layer, "w13_bias", None), getattr(layer, "w2_bias", None),
                              layer.activation.value, _clamp_limit(layer),
                              layer.apply_router_weight_on_input)


class MLXQuantizedMoEMethod(MLXMoEMixin, FusedMoEMethodBase):
    """Experts quantized by mlx_lm (quantization method "mlx"): per projection a packed
    ``weight`` [E, N, K * bits / 32] uint32 and ``scales``, ``biases`` [E, N, K / group_size],
    MLX's affine format per expert, multiplied with ``mx.gather_qmm`` without unpacking. As in
    vLLM's layout, gate and up rows share the w13 tensors (gate first) and down is w2."""

    def __init__(self, moe, w13_spec: QuantSpec, w2_spec: QuantSpec, prefix: str):
        super().__init__(moe)
        self.specs = {"w13": w13_spec, "w2": w2_spec}
        self.prefix = prefix

    def create_weights(self, layer: RoutedExperts, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs):
        inter = intermediate_size_per_partition
        gated_rows = 2 * inter if self.moe.is_act_and_mul else inter
        for which, rows, k in (("w13", gated_rows, hidden_size), ("w2", hidden_size, inter)):
            spec = self.specs[which]
            if k % spec.group_size:
                raise ValueError(f"{self.prefix}: {which}'s input size {k} is not a multiple of "
                                 f"the group size {spec.group_size}")
            for kind, shape, dtype in (
                    ("weight", (num_experts, rows, spec.packed_columns(k)), torch.uint32),
                    ("scales", (num_experts, rows, k // spec.group_size), params_dtype),
                    ("biases", (num_experts, rows, k // spec.group_size), params_dtype)):
                param = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                set_weight_attrs(param, {"weight_loader": self._loader(layer, inter)})
                layer.register_parameter(f"{which}_{kind}", param)

    def _loader(self, layer: RoutedExperts, inter: int):
        """RoutedExperts.load_weights hands over one expert's tensor of one projection
        (shard w1: gate, w3: up, w2: down), named by vLLM's expert mapping."""

        def load(param, loaded_weight, weight_name, shard_id, expert_id,
                 return_success=False):
            expert = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if expert != -1:
                rows = param.data[expert]
                if shard_id in ("w1", "w3") and self.moe.is_act_and_mul:
                    rows = rows[:inter] if shard_id == "w1" else rows[inter:]
                copy_rows(rows, loaded_weight, False, f"{weight_name} (expert {expert_id})")
            return (expert != -1) if return_success else None

        return load

    def get_fused_moe_quant_config(self, layer: RoutedExperts) -> FusedMoEQuantConfig:
        return FusedMoEQuantConfig.make()  # what vLLM's runner asks for: nothing to add here

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        _check_activation_config(layer)
        if getattr(layer, "w13_bias", None) is not None:
            raise NotImplementedError(f"{self.prefix}: quantized experts with biases are not "
                                      "supported on mlx")
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)

    def experts(self, layer, x, topk_weights, topk_ids):
        w13, w2 = self.specs["w13"], self.specs["w2"]
        return quantized_moe_experts_op(
            x, topk_weights, topk_ids, layer.w13_weight, layer.w13_scales, layer.w13_biases,
            w13.group_size, w13.bits, layer.w2_weight, layer.w2_scales, layer.w2_biases,
            w2.group_size, w2.bits, layer.activation.value, _clamp_limit(layer),
            layer.apply_router_weight_on_input)


# ---- checkpoints written by mlx_lm


@RoutedExperts.register_oot
class MLXRoutedExperts(RoutedExperts):
    """vLLM's RoutedExperts, also loading mlx_lm's stacked experts: mlx_lm stores a layer's
    experts as one tensor per projection (``switch_mlp.gate_proj.weight`` [E, ...]), which the
    mlx quantization method's weight mapper (MLXQuantConfig.get_checkpoint_weight_mapper) puts
    under this layer; each expert's slice goes through vLLM's per-expert loading."""

    def load_weights(self, weights):
        return super().load_weights(self._per_expert(weights))

    def _per_expert(self, weights):
        names = {"gate_proj": self.ckpt_gate_proj_name, "w1": self.ckpt_gate_proj_name,
                 "up_proj": self.ckpt_up_proj_name, "w3": self.ckpt_up_proj_name,
                 "down_proj": self.ckpt_down_proj_name, "w2": self.ckpt_down_proj_name}
        for name, tensor in weights:
            if not name.startswith("switch_mlp."):
                yield name, tensor
                continue
            projection, _, kind = name.removeprefix("switch_mlp.").partition(".")
            if names.get(projection) is None:
                raise ValueError(f"{self.layer_name}: unexpected stacked expert tensor {name!r}")
            for expert, one in enumerate(tensor.unbind(0)):
                yield f"{expert}.{names[projection]}.{kind}", one


def prepare_moe_layers(forward_context: dict) -> int:
    """After loading: bind each MoE layer's routing to its method, and make its runner call
    its forward directly (as on vLLM's CPU platform) rather than through the opaque
    ``vllm::moe_forward`` op, so a compiled forward contains the routing and expert ops.
    ``forward_context``: the compilation config's static forward context (layer name ->
    layer). Returns the number of MoE layers."""
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    count = 0
    for name, runner in forward_context.items():
        if not isinstance(runner, moe_runner.MoERunner):
            continue
        method = runner.routed_experts.quant_method
        if not isinstance(method, MLXMoEMixin):
            raise NotImplementedError(
                f"{name}: MoE experts with quantization method {type(method).__name__} are "
                "not supported on mlx (unquantized and MLX-quantized experts are)")
        method.routing = Routing.of(runner, name)
        # vLLM's runner picks its entry point by platform: the custom op everywhere but on the
        # CPU and TPU, whose entry is the same forward, called directly.
        runner._forward_entry = (moe_runner._moe_forward if runner.shared_experts is None
                                 else moe_runner._moe_forward_shared)
        count += 1
    return count


def _allow_ungated_experts() -> None:
    """vLLM's FusedMoEConfig refuses non-gated experts (``is_act_and_mul=False``: NemotronH's
    relu^2, the *_no_mul activations) on platforms other than CUDA, ROCm and XPU, whose
    kernels it knows run them; the MLX experts here do (``_activate``). The refusal is the last
    step of its ``__post_init__``, so a config that reaches it is otherwise complete."""
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

    original = FusedMoEConfig.__post_init__
    if getattr(original, "_mlx_ungated", False):
        return

    def __post_init__(self):
        try:
            original(self)
        except NotImplementedError as e:
            if self.is_act_and_mul or "is_act_and_mul=False" not in str(e):
                raise

    __post_init__._mlx_ungated = True
    FusedMoEConfig.__post_init__ = __post_init__


_allow_ungated_experts()
