"""vLLM quantization method "mlx": checkpoints made by ``mlx_lm.convert -q`` (MLX affine
group-wise quantization), run on the packed weights.

What mlx_lm writes: config.json has ``"quantization": {"group_size": 64, "bits": 4, "mode":
"affine"}`` (and, since 2024, the same dict as ``"quantization_config"``), optionally with one
entry per module path that was quantized differently (``"model.layers.0.mlp.down_proj":
{"group_size": 64, "bits": 6}``) or not at all (``false``). Each quantized Linear or Embedding
module ``P`` has ``P.weight`` (uint32, [N, K * bits / 32]), ``P.scales`` and ``P.biases``
([N, K / group_size]); mlx_lm's own loader treats a module as quantized when the config names it
or ``P.scales`` is in the checkpoint, and so does this one (the tensor names are read from the
safetensors headers in ``maybe_update_config``).

vLLM merges q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. For packed weights the
output dimension is the row dimension, so merging is a concatenation of rows, and each shard's
rows are loaded into their slice of one parameter. mlx_lm's mixed recipes give ``v_proj`` more bits
than ``q_proj``/``k_proj`` in some layers: such a layer keeps each shard's packed rows in one flat
parameter and runs one quantized matmul per shard (``ShardLayout``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)
from vllm.model_executor.utils import set_weight_attrs

logger = init_logger(__name__)

NAME = "mlx"
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
_SETTINGS = ("group_size", "bits", "mode", "quant_method")


def is_mlx_quantization(config: Any) -> bool:
    """Whether a config.json quantization dict is mlx_lm's (any of its modes)."""
    return (isinstance(config, dict) and isinstance(config.get("bits"), int)
            and isinstance(config.get("group_size"), int)
            and config.get("quant_method", "") in ("", None, NAME))


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one checkpoint module is quantized."""
    bits: int
    group_size: int

    @classmethod
    def parse(cls, entry: dict, where: str) -> "QuantSpec":
        mode = entry.get("mode", "affine")
        if mode != "affine":
            raise ValueError(
                f"{where}: MLX quantization mode {mode!r} is not supported on mlx yet (only "
                f"'affine', what mlx_lm.convert -q writes by default)")
        spec = cls(int(entry["bits"]), int(entry["group_size"]))
        if spec.bits not in BITS or spec.group_size not in GROUP_SIZES:
            raise ValueError(f"{where}: MLX affine quantization with bits={spec.bits}, "
                             f"group_size={spec.group_size} is not supported (bits {BITS}, "
                             f"group sizes {GROUP_SIZES})")
        return spec

    def packed_columns(self, k: int) -> int:
        return k * self.bits // 32


@dataclasses.dataclass
class ShardLayout:
    """Where each logical output partition of a layer lives in its three parameters.

    ``uniform``: every shard has the same spec, the parameters are the merged 2-D matrices and one
    matmul serves the layer. Otherwise the parameters are flat (1-D) and shard i is the 2-D view
    at ``offsets[i]`` of each."""
    k: int
    rows: list[int]
    specs: list[QuantSpec]
    pad_rows: bool = False  # embeddings: the vocabulary is padded past the checkpoint's rows

    @property
    def uniform(self) -> bool:
        return len(set(self.specs)) == 1

    def shapes(self, i: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(packed weight shape, scales shape) of shard i."""
        spec = self.specs[i]
        return (self.rows[i], spec.packed_columns(self.k)), (self.rows[i],
                                                             self.k // spec.group_size)

    def param_shapes(self) -> tuple[tuple, tuple]:
        if self.uniform:
            spec = self.specs[0]
            n = sum(self.rows)
            return (n, spec.packed_columns(self.k)), (n, self.k // spec.group_size)
        w = sum(a * b for (a, b), _ in map(self.shapes, range(len(self.rows))))
        s = sum(a * b for _, (a, b) in map(self.shapes, range(len(self.rows))))
        return (w,), (s,)

    def view(self, param: torch.Tensor, i: int, which: int) -> torch.Tensor:
        """Shard i of a parameter (which: 0 for the packed weight, 1 for scales/biases)."""
        if self.uniform:
            start = sum(self.rows[:i])
            return param[start:start + self.rows[i]]
        start = sum(a * b for a, b in (self.shapes(j)[which] for j in range(i)))
        a, b = self.shapes(i)[which]
        return param[start:start + a * b].view(a, b)


def _shard_index(shard_id) -> int | tuple[int, ...] | None:
    if isinstance(shard_id, str):
        return "qkv".index(shard_id)
    return shard_id


def make_loader(layout: ShardLayout, which: int, name: str):
    """The weight_loader of one of a layer's three parameters: copies a checkpoint tensor (a
    whole layer, one shard, or consecutive shards fused on disk) into its rows. There is one
    device ("mlx"), so nothing is split across ranks."""

    def load(param: Parameter, loaded: torch.Tensor, loaded_shard_id=None) -> None:
        shard = _shard_index(loaded_shard_id)
        if shard is None:
            shards = list(range(len(layout.rows)))
        elif isinstance(shard, tuple):
            shards = list(shard)
        else:
            shards = [shard]
        if len(shards) == 1 or layout.uniform:
            if layout.uniform:
                start = sum(layout.rows[:shards[0]])
                stop = sum(layout.rows[:shards[-1] + 1])
                target = param.data[start:stop]
            else:
                target = layout.view(param.data, shards[0], which)
            copy_rows(target, loaded, layout.pad_rows, name)
            return
        raise ValueError(f"{name}: a tensor covering shards {shards} of a layer whose shards are "
                         f"quantized differently ({layout.specs})")

    return load


def copy_rows(target: torch.Tensor, loaded: torch.Tensor, pad_rows: bool, name: str) -> None:
    if loaded.shape[1:] != target.shape[1:] or loaded.shape[0] > target.shape[0] or (
            loaded.shape[0] < target.shape[0] and not pad_rows):
        raise ValueError(f"{name}: checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                         f"the parameter's {tuple(target.shape)} (bits or group size differ from "
                         "the config's quantization entry?)")
    target[:loaded.shape[0]].copy_(loaded)
    if loaded.shape[0] < target.shape[0]:
        target[loaded.shape[0]:].zero_()  # padded vocabulary rows: scale 0, bias 0 -> zeros


class MLXAffineLinearMethod(LinearMethodBase):
    """Linear layers (and the LM head) on packed MLX weights."""

    def __init__(self, specs: list[QuantSpec], prefix: str):
        self.specs = specs
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        specs = self.specs if len(self.specs) > 1 else self.specs * len(output_partition_sizes)
        if len(specs) != len(output_partition_sizes):
            raise ValueError(f"{self.prefix}: {len(specs)} quantized shards for "
                             f"{len(output_partition_sizes)} output partitions")
        for spec in specs:
            if input_size_per_partition % spec.group_size:
                raise ValueError(f"{self.prefix}: input size {input_size_per_partition} is not a "
                                 f"multiple of the group size {spec.group_size}")
        layout = ShardLayout(input_size_per_partition, list(output_partition_sizes), specs,
                             pad_rows=isinstance(layer, VocabParallelEmbedding))
        weight_shape, scales_shape = layout.param_shapes()
        for name, shape, dtype, which in (("weight", weight_shape, torch.uint32, 0),
                                          ("scales", scales_shape, params_dtype, 1),
                                          ("biases", scales_shape, params_dtype, 1)):
            param = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": make_loader(layout, which,
                                                                  f"{self.prefix}.{name}")})
            layer.register_parameter(name, param)
        layer.mlx_layout = layout

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return affine_linear(layer, x, bias)


def affine_linear(layer: torch.nn.Module, x: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for a layer holding MLX-packed ``weight``, ``scales``, ``biases`` laid
    out by ``layer.mlx_layout`` (and, for repacked GPTQ act-order weights, the input columns'
    order ``layer.mlx_input_order``)."""
    from ..ops.quantized import quantized_matmul_op

    layout: ShardLayout = layer.mlx_layout
    order = getattr(layer, "mlx_input_order", None)
    if order is not None:
        x = x.index_select(-1, order)
    if layout.uniform:
        spec = layout.specs[0]
        out = quantized_matmul_op(x, layer.weight, layer.scales, layer.biases, spec.group_size,
                                  spec.bits)
    else:
        out = torch.cat([
            quantized_matmul_op(x, layout.view(layer.weight, i, 0),
                                layout.view(layer.scales, i, 1),
                                layout.view(layer.biases, i, 1), spec.group_size, spec.bits)
            for i, spec in enumerate(layout.specs)], dim=-1)
    if bias is not None:
        out = out + bias
    return out


class MLXAffineEmbeddingMethod(MLXAffineLinearMethod):
    """Input embeddings: the looked-up rows are dequantized; as a (tied) LM head, a matmul."""

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        from ..ops.quantized import quantized_embedding_op

        spec = layer.mlx_layout.specs[0]
        return quantized_embedding_op(input_, layer.weight, layer.scales, layer.biases,
                                      spec.group_size, spec.bits)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        if not isinstance(embed_tokens.quant_method, MLXAffineEmbeddingMethod):
            # The checkpoint's embedding is quantized (this head's spec is its spec) but the model
            # built it without a quantization config (vLLM's Gemma and Gemma 2 pass none): give
            # it this method's packed parameters in place of its float weight.
            if not isinstance(embed_tokens.quant_method, UnquantizedEmbeddingMethod):
                raise ValueError(f"{self.prefix}: the LM head is tied to an embedding quantized "
                                 f"another way ({type(embed_tokens.quant_method).__name__})")
            method = MLXAffineEmbeddingMethod(self.specs, "embed_tokens")
            del embed_tokens.weight
            method.create_weights(embed_tokens, embed_tokens.input_size_per_partition,
                                  embed_tokens.output_partition_sizes, embed_tokens.input_size,
                                  embed_tokens.output_size, embed_tokens.params_dtype)
            embed_tokens.quant_method = method
        for name in ("weight", "scales", "biases"):
            setattr(layer, name, getattr(embed_tokens, name))
        layer.mlx_layout = embed_tokens.mlx_layout
        return layer


@register_quantization_config(NAME)
class MLXQuantConfig(QuantizationConfig):
    """The checkpoint's quantization dict: default spec plus per-module entries."""

    def __init__(self, default: QuantSpec, modules: dict[str, QuantSpec | None]):
        super().__init__()
        self.default = default
        self.modules = modules  # checkpoint module path -> spec, or None for "not quantized"
        self.tensors: set[str] | None = None  # checkpoint tensor names, once known
        self.tied = False

    def __repr__(self) -> str:
        return (f"MLXQuantConfig(bits={self.default.bits}, group_size={self.default.group_size}, "
                f"{len(self.modules)} per-module entries)")

    @classmethod
    def get_name(cls) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization entry is all there is

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MLXQuantConfig":
        default = QuantSpec.parse(config, "config.json quantization")
        modules = {}
        for key, entry in config.items():
            if key in _SETTINGS:
                continue
            if entry is False:
                modules[key] = None
            elif isinstance(entry, dict):
                modules[key] = QuantSpec.parse(entry, f"config.json quantization[{key!r}]")
        return cls(default, modules)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if is_mlx_quantization(hf_quant_cfg) and user_quant in (None, NAME):
            return NAME
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        from vllm.transformers_utils.config import get_safetensors_params_metadata

        metadata = get_safetensors_params_metadata(model_name, revision=revision)
        self.tensors = {name for name in metadata if name != "__metadata__"} or None
        if self.tensors is None:
            logger.warning("mlx quantization: could not list %s's tensors; assuming every "
                           "linear layer and embedding is quantized", model_name)
        if hf_config is not None:
            text = hf_config.get_text_config()
            self.tied = bool(getattr(text, "tie_word_embeddings", False))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # module names as the vLLM model names them (the mapper renames tensor names)
        def rename(module: str) -> str | None:
            mapped = hf_to_vllm_mapper.map_name(module + ".weight")
            return mapped[:-len(".weight")] if mapped and mapped.endswith(".weight") else mapped

        self.modules = {rename(k) or k: v for k, v in self.modules.items()}
        if self.tensors is not None:
            self.tensors = {hf_to_vllm_mapper.map_name(t) or t for t in self.tensors}

    def spec_of(self, module: str) -> QuantSpec | None:
        """The spec of one checkpoint module, or None if it is stored unquantized."""
        if module in self.modules:
            return self.modules[module]
        if self.tensors is None or f"{module}.scales" in self.tensors:
            return self.default
        return None

    def _shard_modules(self, prefix: str) -> list[str]:
        parent, _, last = prefix.rpartition(".")
        if f"{prefix}.scales" in (self.tensors or ()) or prefix in self.modules:
            return [prefix]  # fused on disk (Phi-3's qkv_proj) or not merged
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def _embedding_module(self, prefix: str) -> str:
        if prefix:
            return prefix
        # models that build VocabParallelEmbedding without a prefix (Llama): mlx_lm's name
        candidates = sorted({t.rsplit(".", 1)[0] for t in self.tensors or ()
                             if t.rsplit(".", 1)[0].endswith("embed_tokens")})
        return candidates[0] if len(candidates) == 1 else "model.embed_tokens"

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            # a head of its own in the checkpoint, or tied to the input embedding (which vLLM's
            # config may still say after untying: the checkpoint decides)
            own = (f"{prefix}.weight" in self.tensors if self.tensors is not None
                   else not self.tied)
            spec = self.spec_of(prefix if own else self._embedding_module(""))
            return (UnquantizedEmbeddingMethod() if spec is None
                    else MLXAffineEmbeddingMethod([spec], prefix))
        if isinstance(layer, VocabParallelEmbedding):
            module = self._embedding_module(prefix)
            spec = self.spec_of(module)
            return (UnquantizedEmbeddingMethod() if spec is None
                    else MLXAffineEmbeddingMethod([spec], module))
        if isinstance(layer, LinearBase):
            modules = self._shard_modules(prefix)
            specs = [self.spec_of(m) for m in modules]
            if all(s is None for s in specs):
                return UnquantizedLinearMethod()
            if any(s is None for s in specs):
                raise NotImplementedError(
                    f"{prefix}: vLLM merges {modules} into one layer, but the checkpoint "
                    "quantizes only some of them")
            return MLXAffineLinearMethod(specs, prefix)
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            specs = self._expert_specs(layer, prefix)
            if specs is None:
                return None  # float experts: vLLM's unquantized method (mlx's override)
            from ..ops.moe import MLXQuantizedMoEMethod

            return MLXQuantizedMoEMethod(layer.moe_config, *specs, prefix)
        return None

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint stores ``module`` quantized, for layers vLLM builds without a
        quantization config (MoE router gates): only what the config or the files say."""
        if module in self.modules:
            return self.modules[module] is not None
        return self.tensors is not None and f"{module}.scales" in self.tensors

    def _expert_specs(self, layer, prefix: str) -> tuple[QuantSpec, QuantSpec] | None:
        """(gate/up spec, down spec) of a MoE layer's experts, or None if they are float.

        mlx_lm stores a layer's experts stacked, one tensor per projection for all experts, as
        ``<block>.switch_mlp.{gate_proj,up_proj,down_proj}`` beside the router gate, where vLLM's
        RoutedExperts is ``<block>.experts`` (names as the model's mapper leaves them: Mixtral
        renames gate_proj/up_proj/down_proj to w1/w3/w2)."""
        block = prefix.rpartition(".")[0]
        projections = {"gate": (layer.ckpt_gate_proj_name, "gate_proj", "w1"),
                       "up": (layer.ckpt_up_proj_name, "up_proj", "w3"),
                       "down": (layer.ckpt_down_proj_name, "down_proj", "w2")}
        if layer.ckpt_up_proj_name is None:  # experts without a gated activation
            del projections["up"]
        specs = {}
        for role, names in projections.items():
            modules = [f"{block}.switch_mlp.{n}" for n in dict.fromkeys(names) if n]
            known = [m for m in modules
                     if m in self.modules or f"{m}.scales" in (self.tensors or ())]
            specs[role] = self.spec_of(known[0]) if known else (
                self.default if self.tensors is None else None)
        if all(s is None for s in specs.values()):
            return None
        if any(s is None for s in specs.values()):
            raise NotImplementedError(f"{prefix}: the checkpoint quantizes only some of the "
                                      f"experts' projections ({specs})")
        if specs.get("up", specs["gate"]) != specs["gate"]:
            raise NotImplementedError(f"{prefix}: the experts' gate and up projections are "
                                      f"quantized differently ({specs}); vLLM merges them")
        return specs["gate"], specs["down"]

    def get_checkpoint_weight_mapper(self):
        # mlx_lm's stacked experts (<block>.switch_mlp.*) go to the layer vLLM builds for them
        # (<block>.experts), whose loader (vllm_metal.ops.moe.MLXRoutedExperts) splits them
        from vllm.model_executor.models.utils import WeightsMapper

        stacked = re.compile(r"(?<!\.experts)\.switch_mlp\.")
        return super().get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_regex={stacked: ".experts.switch_mlp."})
