"""GPTQ and AWQ checkpoints, repacked at load into MLX's affine layout (methods ``mlx_gptq``,
``mlx_awq``).

Both formats store, per group of ``group_size`` input features k and output feature n, an integer
weight q, a zero point z and a scale s, and mean ``w[n, k] = s * (q - z)``. MLX's affine format
means ``w = s * q + b``; with ``b = -s * z`` the two are the same numbers: s is a float16 scale
and z a small integer, so s * z, s * q and their difference are exact in float32 (scales and
biases are kept in float32 for that reason). So the repacked layer computes the checkpoint's
dequantized matrix exactly, on MLX's kernels (``ops/quantized.py``).

Layouts (the exact ones vLLM's own GPTQ/AWQ loaders read):

- GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq", the default, or "gptq_v2"):
  ``qweight`` int32 [K * bits / 32, N], values packed along k little-end first (so its transpose
  already is MLX's packing); ``qzeros`` int32 [K / g, N * bits / 32] packed along n, holding
  z - 1 in the v1 format (z itself in v2); ``scales`` [K / g, N]; ``g_idx`` int32 [K], the group
  of each input feature. Symmetric checkpoints store z = 2^(bits-1) like any other. With act-order
  (``desc_act``) g_idx is a permutation of the groups: the input features are sorted by group at
  load (the weight's columns moved accordingly) and x is gathered in that order before the
  product (``mlx_input_order``). 2, 4 and 8 bits.
- AWQ (AutoAWQ GEMM, ``version`` "gemm", ``zero_point`` true): ``qweight`` int32 [K, N / 8] packed
  along n in the order 0, 2, 4, 6, 1, 3, 5, 7; ``qzeros`` int32 [K / g, N / 8] the same; ``scales``
  [K / g, N]. 4 bits.

Anything else (3-bit GPTQ, GEMV-packed or zero-point-free AWQ, GPTQModel's per-module
``dynamic`` rules, a quantized LM head, Marlin-packed checkpoints) stops at start-up with an error
naming what is unsupported.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)
from vllm.model_executor.utils import set_weight_attrs

from torch_mlx import _C

from .mlx_affine import QuantSpec, ShardLayout, affine_linear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int64 values of an int32 tensor packed `32 / bits` to a word along `dim`, little-end
    first (the order GPTQ and MLX use)."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    mask = (1 << bits) - 1
    if dim == 0:
        values = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [R, per_word, C]
        return values.reshape(-1, packed.shape[1])
    values = (words.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask  # [R, C, per_word]
    return values.reshape(packed.shape[0], -1)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    values = unpack(packed, 4, dim=1)
    inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
    return values.view(values.shape[0], -1, 8)[:, :, inverse].reshape(values.shape)


def pack_mlx(q: torch.Tensor, bits: int) -> torch.Tensor:
    """MLX's packing of integer values q [N, K] (2, 4 or 8 bits): uint32 [N, K * bits / 32]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (q.to(torch.int64).view(q.shape[0], -1, per_word) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.view(torch.uint32)


def to_mlx_affine(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                  group_of: torch.Tensor, bits: int, group_size: int, where: str):
    """MLX weight, scales and biases (and the input order, or None) of w = s * (q - z), from
    q [K, N], zeros and scales [G, N] and the group of each input feature [K]."""
    k = q.shape[0]
    order = None
    if not torch.equal(group_of, torch.arange(k) // group_size):
        order = torch.argsort(group_of, stable=True)
        if not torch.equal(group_of[order], torch.arange(k) // group_size):
            raise ValueError(f"{where}: g_idx does not give every group {group_size} input "
                             "features; cannot map onto MLX's contiguous groups")
        q = q[order]
    s = scales.to(torch.float32)
    weight = pack_mlx(q.t().contiguous(), bits)
    return weight, s.t().contiguous(), (-s * zeros.to(torch.float32)).t().contiguous(), order


class _Repacked(QuantizationConfig):
    """What GPTQ and AWQ share: settings, which layers are quantized, the method."""

    FORMAT = ""
    BITS: tuple[int, ...] = ()

    def __init__(self, bits: int, group_size: int, sym: bool, desc_act: bool,
                 skipped: list[str], v1_zeros: bool = False):
        super().__init__()
        if bits not in self.BITS:
            raise ValueError(f"{self.FORMAT} with bits={bits} does not map onto MLX's affine "
                             f"kernels on mlx (supported: {self.BITS})")
        if group_size not in (32, 64, 128):
            raise ValueError(f"{self.FORMAT} with group_size={group_size} is not supported on mlx "
                             "(32, 64 or 128; per-channel (-1) not yet)")
        self.bits, self.group_size, self.sym, self.desc_act = bits, group_size, sym, desc_act
        self.skipped = skipped
        self.v1_zeros = v1_zeros

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size}, "
                f"sym={self.sym}, desc_act={self.desc_act})")

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantize_config.json", "quant_config.json"]

    @staticmethod
    def get_checkpoint_weight_mapper():
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()  # keep g_idx: act-order is resolved at load, not dropped

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if str(hf_quant_cfg.get("quant_method", "")).lower() != cls.FORMAT:
            return None
        if user_quant in (None, cls.FORMAT, cls.get_name(), f"auto_{cls.FORMAT}"):
            return cls.get_name()
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            return UnquantizedEmbeddingMethod()
        if isinstance(layer, VocabParallelEmbedding):
            return UnquantizedEmbeddingMethod()
        if isinstance(layer, LinearBase):
            if any(s and s in prefix for s in self.skipped):
                return UnquantizedLinearMethod()
            return RepackedLinearMethod(self, prefix)
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            raise NotImplementedError(f"{prefix}: {self.FORMAT} MoE experts are not supported on "
                                      "mlx yet")
        return None

    # checkpoint tensors [K, N] (q), [G, N] (zeros) of one layer, as integers
    def weights(self, qweight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def zeros(self, qzeros: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_quantization_config("mlx_gptq")
class GPTQConfig(_Repacked):
    FORMAT = "gptq"
    BITS = (2, 4, 8)

    @classmethod
    def get_name(cls) -> str:
        return "mlx_gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        for key in ("dynamic", "modules_in_block_to_quantize"):
            if config.get(key):
                raise ValueError(f"GPTQ checkpoints with {key!r} are not supported on mlx yet")
        if config.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported on mlx")
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported on mlx "
                             "(gptq or gptq_v2)")
        return cls(int(config["bits"]), int(config["group_size"]), bool(config.get("sym", True)),
                   bool(config.get("desc_act", False)), [], v1_zeros=fmt == "gptq")

    def weights(self, qweight):
        return unpack(qweight, self.bits, dim=0)

    def zeros(self, qzeros):
        return unpack(qzeros, self.bits, dim=1) + (1 if self.v1_zeros else 0)


@register_quantization_config("mlx_awq")
class AWQConfig(_Repacked):
    FORMAT = "awq"
    BITS = (4,)

    @classmethod
    def get_name(cls) -> str:
        return "mlx_awq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported on mlx (GEMM-packed "
                             "checkpoints are)")
        if not config.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points are not supported on mlx")
        if config.get("lm_head"):
            raise ValueError("AWQ checkpoints with a quantized lm_head are not supported on mlx")
        bits = int(config.get("w_bit", config.get("bits", 4)))
        group = int(config.get("q_group_size", config.get("group_size", 128)))
        return cls(bits, group, False, False, list(config.get("modules_to_not_convert") or []))

    def weights(self, qweight):
        return unpack_awq(qweight)  # [K, N / 8] -> [K, N]

    def zeros(self, qzeros):
        return unpack_awq(qzeros)


class RepackedLinearMethod(LinearMethodBase):
    """Loads a layer's GPTQ/AWQ tensors as they are, then repacks them into MLX's layout."""

    def __init__(self, config: _Repacked, prefix: str):
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        c = self.config
        k, n = input_size_per_partition, sum(output_partition_sizes)
        per_word = 32 // c.bits
        if k % c.group_size or any(size % per_word for size in output_partition_sizes):
            raise ValueError(f"{self.prefix}: shape [{n}, {k}] does not fit {c.FORMAT} packing "
                             f"at {c.bits} bits, group {c.group_size}")
        groups = k // c.group_size
        gptq = isinstance(c, GPTQConfig)
        shapes = {
            "qweight": ((k // per_word, n) if gptq else (k, n // per_word), torch.int32,
                        1 if gptq else per_word),
            "qzeros": ((groups, n // per_word), torch.int32, per_word),
            "scales": ((groups, n), params_dtype, 1),
        }
        if gptq:
            shapes["g_idx"] = ((len(output_partition_sizes), k), torch.int32, 0)
        for name, (shape, dtype, divisor) in shapes.items():
            param = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": _column_loader(
                list(output_partition_sizes), divisor, f"{self.prefix}.{name}")})
            layer.register_parameter(name, param)
        layer.mlx_partitions = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        cpu = {name: _C.cpu_alias(getattr(layer, name).data)
               for name in ("qweight", "qzeros", "scales", "g_idx") if hasattr(layer, name)}
        q = c.weights(cpu["qweight"])  # [K, N]
        k = q.shape[0]
        group_of = torch.arange(k) // c.group_size
        if "g_idx" in cpu:
            indices = cpu["g_idx"].to(torch.int64)
            if any(not torch.equal(indices[0], row) for row in indices[1:]):
                raise NotImplementedError(
                    f"{self.prefix}: the merged shards have different act-order g_idx")
            group_of = indices[0]
        weight, scales, biases, order = to_mlx_affine(
            q, c.zeros(cpu["qzeros"]), cpu["scales"], group_of, c.bits, c.group_size,
            self.prefix)
        for name in list(cpu):
            delattr(layer, name)
        for name, value in (("weight", weight), ("scales", scales), ("biases", biases)):
            layer.register_parameter(name, Parameter(value.to("mlx"), requires_grad=False))
        spec = QuantSpec(c.bits, c.group_size)
        layer.mlx_layout = ShardLayout(k, layer.mlx_partitions, [spec] * len(layer.mlx_partitions))
        layer.mlx_input_order = None if order is None else order.to("mlx")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return affine_linear(layer, x, bias)


def _column_loader(partitions: list[int], divisor: int, name: str):
    """weight_loader of a GPTQ/AWQ tensor whose dim 1 (0 for g_idx: one row per shard) holds the
    output features (divided by `divisor` where they are packed): a shard's columns, or all."""

    def load(param: Parameter, loaded: torch.Tensor, loaded_shard_id=None) -> None:
        shard = "qkv".index(loaded_shard_id) if isinstance(loaded_shard_id, str) \
            else loaded_shard_id
        shards = (list(range(len(partitions))) if shard is None
                  else list(shard) if isinstance(shard, tuple) else [shard])
        if divisor == 0:  # g_idx: the same [K] for every shard it covers
            for i in shards:
                param.data[i].copy_(loaded)
            return
        start = sum(partitions[:shards[0]]) // divisor
        stop = sum(partitions[:shards[-1] + 1]) // divisor
        target = param.data[:, start:stop]
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"{name}: checkpoint tensor of shape {tuple(loaded.shape)} does not "
                             f"fit {tuple(target.shape)}")
        target.copy_(loaded)

    return load
