"""Sweep vLLM's model registry on device "mlx": every text-generation and pooling architecture
that transformers can build from a small random config, run by vLLM on "mlx" and compared with
transformers on the CPU (issue 18).

    python tools/registry_sweep.py [--only ARCH,...] [--registry generate|pooling|all|multimodal]
                                   [--timeout S] [--jobs 1] [--json OUT] [--max-tokens N]
    python tools/registry_sweep.py --json OUT --resume [--only ARCH,...]   # (re)run some again
    python tools/registry_sweep.py --summarize OUT [OUT...]                 # table of saved runs

Measured figures: docs/registry_sweep.md.

For each architecture of vLLM's `_TEXT_GENERATION_MODELS` (registry "generate") and
`_EMBEDDING_MODELS` (registry "pooling"), or on request `_MULTIMODAL_MODELS` ("multimodal":
vision-language models generating from the same text-only prompts), in a subprocess of its own
with a timeout:

1. build: transformers' class of the same name (none: not_buildable), its config class's
   defaults shrunk (SHRINK: hidden 128, 2 layers, 4 heads, 4 experts, vocab of the local tokenizer
   of tools/make_tiny_model.py, ...), random weights under a seed, rescaled as make_tiny_model.py
   does (so greedy tokens are not decided by float32 noise). The architectures make_tiny_model.py
   knows are made by it unchanged. Where transformers 5.19 writes a checkpoint other than real
   ones (fields it dropped, a weight it does not make, another config.json schema, a smaller
   tokenizer), COMPAT_FIELDS, COMPAT_WEIGHTS, CONFIG_JSON_FORMAT and TOKENIZER_SPECIAL_TOKENS
   make it as real ones are, describing the model transformers computes. A composite config
   (CLIP, LLaVA, Qwen2-VL) has each sub-config shrunk (the vision tower's too: VISION_SHRINK),
   and the checkpoint carries an HF processor sized for it (PROCESSORS). A failure here (config
   validation, model construction, save) is not_buildable with the reason; nothing is
   downloaded.
2. reference: transformers on the CPU, float32, eager attention, no KV cache (each step a full
   forward): greedy continuations of 3 prompts, with each step's logits; for pooling the base
   model's last hidden states, pooled as vLLM's resolved pooler config says (CLS / LAST / MEAN);
   for a token-level model with no embedding task (vLLM's BertForMaskedLM: per-token MLM logits,
   "token_classify") the architecture's own per-token logits; for CLIP, SigLIP and ColPali their
   own text or per-token embeddings (POOLING_REFERENCES), and CLIP's and SigLIP's image
   embeddings of three random images (IMAGE_EMBEDDINGS).
   A failure here is not_buildable ("transformers reference failed").
3. vLLM: `vllm.LLM(model, dtype="float32", enforce_eager=True)` on "mlx" (engine in the
   process), the same token ids as prompts; generation greedy with EOS ignored, pooling
   `LLM.embed` (token-level models: `LLM.encode(pooling_task="token_classify")`, raw logits, or
   "token_embed"; images as image-only prompts). Vision-language models whose image path needs
   torchvision here run in vLLM's language-model-only mode (LANGUAGE_MODEL_ONLY).

Status per architecture:
  pass      every prompt's tokens identical (pooling: cosine >= 0.9999 for every prompt; for
            token-level models every token's, the lowest per prompt recorded)
  near_tie  the first divergence is at a step where transformers' top-2 logit gap < 1e-4
  mismatch  otherwise (the first divergence, its step and gap are recorded; a cause found in
            vLLM's model code, VLLM_MODEL_DEVIATIONS, is recorded with the cosines against
            what that code computes)
  error     vLLM failed; `category` groups the cause (missing lowering <aten op>, unsupported
            attention, cuda/triton-only kernel, vllm rejected config, timeout, crash, ...)
  not_buildable  transformers could not build or run it (reason recorded)

Results go to --json (one object per architecture, with timings and the traceback tail of an
error) and a table with totals is printed. Nothing is skipped silently: an architecture not run
is listed with the reason.
"""
import argparse
import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT_SEED = 0
GENERATING = ("generate", "multimodal")  # registries whose models are compared by greedy tokens
NEAR_TIE_GAP = 1e-4
COSINE_MIN = 0.9999


@functools.cache  # one execution of the module per process (two callers per architecture)
def _model_maker():
    spec = importlib.util.spec_from_file_location("make_tiny_model",
                                                  ROOT / "tools" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Registry


def registry_architectures(which: str) -> list[tuple[str, str, str]]:
    """[(registry, architecture, vLLM module)] from vLLM's own tables, in their order."""
    from vllm.model_executor.models import registry

    out = []
    if which in ("generate", "all"):
        out += [("generate", arch, mod) for arch, (mod, _) in
                registry._TEXT_GENERATION_MODELS.items()]
    if which in ("pooling", "all"):
        out += [("pooling", arch, mod) for arch, (mod, _) in registry._EMBEDDING_MODELS.items()]
    if which == "multimodal":  # generation with text-only prompts; not part of "all"
        out += [("multimodal", arch, mod) for arch, (mod, _) in
                registry._MULTIMODAL_MODELS.items()]
    return out


def transformers_lacks(arch: str) -> str | None:
    """The not_buildable reason when transformers has no class of this name (checked in the
    parent, so no subprocess is spent on it), else None."""
    import transformers

    if getattr(transformers, arch, None) is None:
        return f"LookupError: transformers {transformers.__version__} has no class {arch}"
    return None


# ---------------------------------------------------------------------------------------------
# Building a tiny random checkpoint

# Config fields set wherever the config class has them (its init signature or attribute_map).
SHRINK = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
    # GPT-2/GPT-J/Bloom/OPT/Falcon-style names
    n_inner=512, ffn_dim=256, ffn_hidden_size=512,  # 4 x hidden (vLLM's Falcon assumes it)
    word_embed_proj_dim=128, rotary_dim=16,
    # mixtures of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, moe_k=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=128, n_shared_experts=1, num_shared_experts=1,
    moe_num_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    # MLA (DeepSeek-V2/V3 style)
    q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
    # sparse MLA's indexer (DeepSeek-V3.2, GLM-MoE-DSA): top-k below the prompts' 16-41 tokens,
    # so the selection is exercised; 16 heads make exact zero-score ties (relu) improbable
    index_topk=8, index_head_dim=32, index_n_heads=16,
    # state-space mixers
    state_size=16, mamba_d_state=16, mamba_n_heads=8, mamba_head_dim=32, mamba_d_conv=4,
    ssm_state_size=16, mamba_expand=2, n_groups=1, mamba_n_groups=1, time_step_rank=8,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
    linear_value_head_dim=32,
    # windows shorter than the longest prompt, so sliding-window attention is exercised
    sliding_window=32, local_attention=32,  # ModernBERT: a window of 16 tokens either side
    # dual encoders (CLIP, SigLIP) and vision-language models: a projection to the text width
    projection_dim=128, projection_size=128,
)
# Per config class, SHRINK's values replaced where transformers' and vLLM's model code agree only
# on a narrower setting (each says why; docs/registry_sweep.md tells the story).
SHRINK_OVERRIDES = {
    # transformers 5.19's HYV4 rotates the rotary slice as halves (rotate_half, NeoX style);
    # vLLM 0.32's as interleaved pairs (is_neox_style=False), as the released Hy4 checkpoints
    # are laid out. With one pair (2 rotary dims) the two are the same function of the same
    # weights; with more they are different models of one checkpoint.
    "HYV4Config": dict(qk_rope_head_dim=2),
}
# Also set in a composite config's vision_config (a vision tower): 32x32 images in 8x8 patches
# (16 patches). Qwen2-VL's tower names its width embed_dim, its depth depth and its heads
# num_heads (its hidden_size is the text model's, which SHRINK sets).
VISION_SHRINK = dict(image_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
# Layer-count fields (the first one the config has is set, the others are aliases).
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
SEQ_MIN_LAYERS = 2


def _config_fields(config_cls) -> set[str]:
    import inspect

    fields = set(inspect.signature(config_cls.__init__).parameters)
    return fields | set(getattr(config_cls, "attribute_map", {}) or {})


def _canonical(config_cls, name: str) -> str:
    return (getattr(config_cls, "attribute_map", {}) or {}).get(name, name)


def _sub_config_class(declared, default: dict):
    """The class of a composite config's sub-config: the declared one, or for a generic
    declaration (AutoConfig, PreTrainedConfig) the class of the default's model_type."""
    import transformers

    if declared in (transformers.AutoConfig, transformers.PretrainedConfig):
        return transformers.CONFIG_MAPPING[default["model_type"]]
    return declared


def shrink_kwargs(config_cls, vocab_size: int, token_ids: dict, vision: bool = False) -> dict:
    """kwargs for config_cls: SHRINK where it has the field, the local tokenizer's vocabulary and
    special tokens, and per-layer pattern fields (layer_types, hybrid patterns) cut to a few
    layers that keep one of each kind of layer. A composite config (CLIP, LLaVA, Qwen2-VL:
    sub_configs) gets each sub-config shrunk the same way, as a dict (its vision_config also
    with VISION_SHRINK), and MULTIMODAL_FIELDS' fields that must agree across them."""
    fields = _config_fields(config_cls)
    defaults = config_cls().to_dict()
    kwargs = {}
    for name, declared in (getattr(config_cls, "sub_configs", None) or {}).items():
        default = defaults.get(name)
        if isinstance(default, dict) and name not in SUB_CONFIGS_DERIVED.get(
                config_cls.__name__, ()):
            sub_cls = _sub_config_class(declared, default)
            kwargs[name] = dict(shrink_kwargs(sub_cls, vocab_size, token_ids,
                                              vision=name == "vision_config"),
                                model_type=sub_cls.model_type)
    shrink = dict(SHRINK, **VISION_SHRINK) if vision else SHRINK
    for name, value in shrink.items():
        if name in fields:
            default = defaults.get(_canonical(config_cls, name))
            if default is None:
                # None means "derived" (Falcon's ffn_hidden_size = 4 * hidden, a head_dim of
                # hidden / heads) or "absent" (no window): keep it so
                continue
            if isinstance(default, int) and not isinstance(default, bool) and default < value \
                    and name not in ("num_hidden_layers",):
                value = default  # never grow a field (top-k above the expert count, say)
            if isinstance(default, dict):
                continue  # a sub-config (shrunk above)
            kwargs[_canonical(config_cls, name)] = value
    num_layers = SEQ_MIN_LAYERS
    default_layers = None
    for name in LAYER_FIELDS:
        if name in fields and isinstance(defaults.get(_canonical(config_cls, name)), int):
            default_layers = defaults[_canonical(config_cls, name)]
            break
    # Per-layer sequences (list or pattern string as long as the default layer count): keep the
    # first layer of each kind, in order, so a hybrid keeps its attention and its mixer.
    index_lists = {}
    if default_layers:
        for name, value in defaults.items():
            if isinstance(value, list) and name in fields and value and \
                    all(isinstance(v, int) and not isinstance(v, bool) for v in value) and \
                    value == sorted(set(value)) and value[-1] < default_layers and \
                    (len(value) < default_layers or value == list(range(default_layers))):
                index_lists[name] = value  # layer indices (moe_layers, full_attn_idxs)
                continue
            if isinstance(value, (list, str)) and len(value) == default_layers \
                    and default_layers > 1 and name in fields:
                seen, kept = set(), []
                for item in value:
                    key = json.dumps(item, sort_keys=True) if not isinstance(item, str) else item
                    if key not in seen:
                        seen.add(key)
                        kept.append(item)
                while len(kept) < SEQ_MIN_LAYERS:
                    kept.append(value[len(kept)])
                num_layers = max(num_layers, len(kept))
                if name in SHRINK and all(isinstance(v, int) for v in kept):
                    kept = [min(v, SHRINK[name]) for v in kept]  # per-layer sizes
                kwargs[name] = "".join(kept) if isinstance(value, str) else kept
    for name, value in index_lists.items():
        kept = [i for i in value if i < num_layers]
        kwargs[name] = kept or value[:1]
    if default_layers is not None:
        for name in LAYER_FIELDS:
            if name in fields:
                kwargs[_canonical(config_cls, name)] = num_layers
    if "num_experts_per_tok" in fields and "num_experts_per_tok" not in kwargs and any(
            k in kwargs for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        kwargs["num_experts_per_tok"] = SHRINK["num_experts_per_tok"]  # experts but no top-k
    if "num_heads" in fields and "expand" in fields and "head_dim" in kwargs:
        # Mamba-2 mixers: num_heads * head_dim == expand * hidden_size
        kwargs["num_heads"] = (defaults.get("expand", 2) * kwargs.get("hidden_size", 128)
                               // kwargs["head_dim"])
    if "attention_hidden_size" in defaults:
        # Zamba2: head_dim names attention_head_dim, which vLLM requires to be
        # attention_hidden_size (2 x hidden) / heads, and vLLM's attention has as many
        # key/value heads as query heads; the config derives both so when not given
        kwargs.pop("attention_head_dim", None)
        kwargs.pop("num_key_value_heads", None)
    if "kv_lora_rank" in fields and "num_key_value_heads" in kwargs:
        # MLA: as many key/value heads as query heads (transformers' eager MLA attention does
        # not repeat them)
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", SHRINK[
            "num_attention_heads"])
    if "layer_types" in fields and "layer_types" not in kwargs \
            and isinstance(defaults.get("layer_types"), list):
        kwargs["layer_types"] = None  # rebuilt for the new layer count by the config
    for name in ("vocab_size", "padded_vocab_size"):
        if name in fields:
            kwargs[_canonical(config_cls, name)] = vocab_size
    for field, token in (("bos_token_id", "<|bos|>"), ("eos_token_id", "<|eos|>"),
                         ("pad_token_id", "<|pad|>"), *MULTIMODAL_TOKENS.items()):
        if field in fields and token in token_ids:
            kwargs.setdefault(_canonical(config_cls, field), token_ids[token])
    fix = MULTIMODAL_FIELDS.get(config_cls.__name__)
    if fix is not None:
        kwargs.update(fix(kwargs))
    return kwargs


# Token-id fields of vision-language configs and the special token each names (added to the
# local tokenizer for an architecture whose config has the field: the ids must be in the
# vocabulary, where vLLM's processors look them up).
MULTIMODAL_TOKENS = {
    "image_token_index": "<image>", "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>", "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>"}

# Sub-configs a composite config derives from another one when not given (ColPali's
# text_config is its vlm_config's).
SUB_CONFIGS_DERIVED = {"ColPaliConfig": ("text_config",)}


def _llava_next_fields(kwargs: dict) -> dict:
    # LLaVA-NeXT tiles an image into image_size squares on a grid of pinpoints (multiples of
    # image_size), each tile image_seq_length patches; the defaults are for 336-pixel tiles
    size = kwargs["vision_config"]["image_size"]
    patches = (size // kwargs["vision_config"]["patch_size"]) ** 2
    return dict(image_grid_pinpoints=[[size, 2 * size], [2 * size, size], [2 * size, 2 * size]],
                image_seq_length=patches)


def _qwen2_vl_fields(kwargs: dict) -> dict:
    # M-RoPE splits each head's rotary frequencies among (time, height, width) by
    # mrope_section; Qwen2-VL's 16/24/24 of 64 is 2:3:3 of head_dim / 2
    text = kwargs["text_config"]
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text["rope_parameters"] = dict(rope_type="default", rope_theta=1000000.0,
                                   mrope_section=section)
    return {}


# Fields of a composite config that must agree with its shrunk sub-configs, by config class.
MULTIMODAL_FIELDS = {
    "LlavaNextConfig": _llava_next_fields,
    "Qwen2VLConfig": _qwen2_vl_fields,
}


def _mimo_v2_flash_fields(c) -> dict:
    rope = c.rope_parameters  # per layer type: {"full_attention": {...}, "sliding_attention": {...}}
    full, swa = rope["full_attention"], rope["sliding_attention"]
    factor = full.get("partial_rotary_factor", 0.334)
    if swa.get("partial_rotary_factor", 0.334) != factor:
        raise ValueError("MiMo-V2-Flash: vLLM has one partial_rotary_factor for both layer kinds")
    return dict(
        # transformers: layer_types / mlp_layer_types; vLLM: 0/1 lists (1 = sliding window, MoE)
        hybrid_layer_pattern=[int(t == "sliding_attention") for t in c.layer_types],
        moe_layer_freq=[int(t == "sparse") for t in c.mlp_layer_types],
        # transformers' sliding layers: the same query heads and head sizes, twice the key/value
        # heads, and a learned sink per head
        swa_num_attention_heads=c.num_attention_heads,
        swa_num_key_value_heads=2 * c.num_key_value_heads,
        swa_head_dim=c.head_dim, swa_v_head_dim=c.v_head_dim,
        sliding_window_size=c.sliding_window, add_swa_attention_sink_bias=True,
        rope_theta=full["rope_theta"], swa_rope_theta=swa["rope_theta"],
        partial_rotary_factor=factor, layernorm_epsilon=c.rms_norm_eps)


def _nomic_bert_fields(c) -> dict:
    if c.hidden_act != "silu":
        # transformers' NomicBertMLP is always gated; nomic's remote code gates only "swiglu"
        raise ValueError(f"NomicBert hidden_act {c.hidden_act!r}: no nomic equivalent")
    return dict(
        activation_function="swiglu", qkv_proj_bias=False, mlp_fc1_bias=False,
        mlp_fc2_bias=False, rotary_emb_fraction=1.0, rotary_emb_base=c.rope_parameters["rope_theta"],
        rotary_emb_scale_base=None, rotary_emb_interleaved=False,
        n_embd=c.hidden_size, n_inner=c.intermediate_size, n_layer=c.num_hidden_layers,
        layer_norm_epsilon=c.layer_norm_eps, position_embedding_type="rope")


# Fields real checkpoints' config.json carry that vLLM 0.32's model code reads, but that
# transformers 5.19's config class dropped or renamed (so a config it builds lacks them). Each
# value is derived from the built config so that it is what transformers' own model computes
# with: the checkpoint must describe one model to both. Keyed by config class name; a field
# the built config already has is left alone.
COMPAT_FIELDS = {
    # transformers: getattr(config, "head_dim", hidden // heads); vLLM reads config.head_dim
    "Glm4MoeConfig": lambda c: dict(head_dim=c.hidden_size // c.num_attention_heads),
    # transformers renamed block_dim/conv_dim to hidden_size and block_ff_dim to
    # intermediate_size (both sizes are hidden_size in its Lfm2ShortConv and Lfm2MLP)
    "Lfm2Config": lambda c: dict(block_dim=c.hidden_size, conv_dim=c.hidden_size,
                                 conv_dim_out=c.hidden_size, block_ff_dim=c.intermediate_size),
    # transformers' AfmoeTokenChoiceRouter: sigmoid scores, bias-corrected top-k over all
    # experts (no groups), weights renormalized then scaled by route_scale
    "AfmoeConfig": lambda c: dict(score_func="sigmoid", route_norm=True, n_group=1,
                                  topk_group=1),
    # transformers' MiniMaxM2: sigmoid router with an e_score_correction_bias buffer, rotary on
    # int(head_dim * partial_rotary_factor) of each head
    "MiniMaxM2Config": lambda c: dict(
        scoring_func="sigmoid", use_routing_bias=True,
        rotary_dim=int((c.head_dim or c.hidden_size // c.num_attention_heads)
                       * c.rope_parameters.get("partial_rotary_factor", 1.0))),
    "MiMoV2FlashConfig": _mimo_v2_flash_fields,
    # transformers 5.19's XLM-R has absolute positions only (the field was dropped)
    "XLMRobertaConfig": lambda c: dict(position_embedding_type="absolute"),
    # transformers' Gte and NomicBert are rotary models; vLLM reads the remote-code configs'
    # names (Snowflake's GteConfig, nomic's NomicBertConfig)
    "GteConfig": lambda c: dict(position_embedding_type="rope"),
    "NomicBertConfig": _nomic_bert_fields,
    # transformers' GLM-4-MoE-Lite lists each layer's MLP (mlp_layer_types); vLLM reads
    # DeepSeek's first_k_dense_replace (leading dense layers, the rest mixtures of experts)
    "Glm4MoeLiteConfig": lambda c: dict(first_k_dense_replace=_leading_dense(c.mlp_layer_types)),
    # transformers' DeepSeek-V3.2 and GLM-MoE-DSA route as DeepSeek-V3 (sigmoid scores,
    # bias-corrected top-k: the e_score_correction_bias weight), which vLLM builds only for the
    # checkpoints' topk_method "noaux_tc"; GLM's indexer rotates interleaved pairs, which vLLM
    # reads from indexer_rope_interleave (default: halves, DeepSeek-V3.2's)
    "DeepseekV32Config": lambda c: dict(topk_method="noaux_tc", scoring_func="sigmoid"),
    "GlmMoeDsaConfig": lambda c: dict(topk_method="noaux_tc", scoring_func="sigmoid",
                                      indexer_rope_interleave=True),
    # transformers' HYV3 (Hy3-preview): each layer's MLP in mlp_layer_types, experts of
    # moe_intermediate_size, q/k RMSNorm in every attention, sigmoid top-k renormalized then
    # scaled by router_scaling_factor. vLLM reads the Tencent config's names:
    # first_k_dense_replace, expert_hidden_dim, qk_norm (getattr, default False) and route_norm
    "HYV3Config": lambda c: dict(first_k_dense_replace=_leading_dense(c.mlp_layer_types),
                                 expert_hidden_dim=c.moe_intermediate_size, qk_norm=True,
                                 route_norm=True),
}


def _leading_dense(mlp_layer_types: list[str]) -> int:
    k = next((i for i, t in enumerate(mlp_layer_types) if t != "dense"), len(mlp_layer_types))
    if any(t != "sparse" for t in mlp_layer_types[k:]):
        raise ValueError(f"mlp_layer_types {mlp_layer_types} is not k dense layers then sparse "
                         f"ones: first_k_dense_replace cannot describe it")
    return k


def _deepseek_v4_released_format(d: dict) -> dict:
    # transformers 5.19 writes DeepSeek-V4's schedules as layer_types / mlp_layer_types with
    # V4's own values ("hash_moe", "moe", "*_compressed_attention") and a compress_rates dict;
    # the released checkpoints carry compress_ratios (per layer: 0 sliding, 4 CSA, 128 HCA) and
    # num_hash_layers, which transformers folds into the same fields on load. vLLM 0.32 reads
    # the released names, and its DeepseekV4Config (a transformers PreTrainedConfig) rejects
    # mlp_layer_types values other than "sparse"/"dense" while parsing.
    ratio = {"sliding_attention": 0, **d.pop("compress_rates")}
    d["compress_ratios"] = [ratio[t] for t in d.pop("layer_types")]
    mlp = d.pop("mlp_layer_types")
    k = mlp.count("hash_moe")
    if mlp != ["hash_moe"] * k + ["moe"] * (len(mlp) - k):
        raise ValueError(f"mlp_layer_types {mlp}: num_hash_layers cannot describe it")
    d["num_hash_layers"] = k
    return d


# config.json as real checkpoints write it where transformers 5.19 writes another schema that
# vLLM 0.32 cannot parse (keyed by config class name: saved dict -> dict). The file is checked
# to load back in transformers to the very config it was built from (the reference reads it).
CONFIG_JSON_FORMAT = {
    "DeepseekV4Config": _deepseek_v4_released_format,
}


def rewrite_config_json(config, out: str) -> bool:
    fn = CONFIG_JSON_FORMAT.get(type(config).__name__)
    if fn is None:
        return False
    path = os.path.join(out, "config.json")
    with open(path) as f:
        saved = json.load(f)
    with open(path, "w") as f:
        json.dump(fn(dict(saved)), f, indent=2, sort_keys=True)
    built, loaded = config.to_dict(), type(config).from_pretrained(out).to_dict()
    differ = sorted(k for k in set(built) | set(loaded) if k not in (
        "transformers_version", "_name_or_path") and built.get(k) != loaded.get(k))
    if differ:
        raise ValueError(f"config.json in the released format loads back different: {differ}")
    return True


def _axk1_dense_post_mlp_norms(config) -> dict:
    import torch

    first_k = config.first_k_dense_replace
    return {f"model.layers.{i}.post_mlp_layernorm.weight": torch.ones(config.hidden_size)
            for i in range(min(first_k, config.num_hidden_layers))}


# Weights real checkpoints carry that transformers 5.19's model does not make, and that vLLM
# 0.32's loader requires (it fails on a parameter the checkpoint lacks) but its forward never
# reads: only such weights belong here (a weight either model computes with must come from
# transformers' model). Keyed by config class name; added to the saved checkpoint where absent.
COMPAT_WEIGHTS = {
    # A.X-K1: the released checkpoints keep a post_mlp_layernorm in every decoder layer;
    # transformers moved it into its AXK1MoE (sparse layers only). vLLM's AXK1DecoderLayer
    # builds one in every layer but applies it only where is_layer_sparse, so the dense
    # layers' (first_k_dense_replace of them) are loaded and never read: RMSNorm's initial ones.
    "AXK1Config": _axk1_dense_post_mlp_norms,
}


def add_compat_weights(config, out: str) -> list[str]:
    """Add COMPAT_WEIGHTS' tensors the saved checkpoint (out/model.safetensors) lacks; returns
    their names."""
    fn = COMPAT_WEIGHTS.get(type(config).__name__)
    if fn is None:
        return []
    from safetensors.torch import load_file, save_file

    path = os.path.join(out, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} (a sharded checkpoint: COMPAT_WEIGHTS handles one file)")
    tensors = load_file(path)
    added = {k: v.to(next(iter(tensors.values())).dtype).contiguous()
             for k, v in fn(config).items() if k not in tensors}
    if added:
        save_file({**tensors, **added}, path, metadata={"format": "pt"})
    return sorted(added)


# Special tokens real checkpoints' tokenizers have that vLLM needs at engine start, by
# architecture: added to the sweep's local tokenizer (after its own, so the prompts' ids do not
# change) and counted in the config's vocabulary.
TOKENIZER_SPECIAL_TOKENS = {
    # vLLM picks its native Inkling chat renderer (tokenizer_mode "inkling") for Inkling models,
    # which resolves the chat framing tokens from the vocabulary when the engine starts
    # (vllm/renderers/inkling_encoding.py); Inkling's released tokenizer has them
    "InklingForCausalLM": [
        "<|endoftext|>", "<|message_user|>", "<|message_model|>", "<|message_system|>",
        "<|message_tool|>", "<|content_text|>", "<|content_image|>",
        "<|content_model_end_sampling|>", "<|content_thinking|>", "<|content_audio_input|>",
        "<|content_tool_error|>", "<|content_xml|>", "<|content_invoke_tool_json|>",
        "<|content_invoke_tool_text|>", "<|end_message|>", "<|audio_end|>"],
    # vLLM's PaliGemma processor looks "\n" up in the vocabulary (it ends image prompts with it;
    # Gemma's SentencePiece vocabulary has it, the byte-level one spells it "Ċ")
    "ColPaliForRetrieval": ["\n"],
    "PaliGemmaForConditionalGeneration": ["\n"],
}


def _all_fields(config_cls) -> set[str]:
    """config_cls's field names (canonical) and its sub-configs', recursively."""
    fields = {_canonical(config_cls, f) for f in _config_fields(config_cls)}
    sub_configs = getattr(config_cls, "sub_configs", None) or {}
    if sub_configs:
        defaults = config_cls().to_dict()
        for name, declared in sub_configs.items():
            if isinstance(defaults.get(name), dict):
                fields |= _all_fields(_sub_config_class(declared, defaults[name]))
    return fields


# Vision-language architectures run in vLLM's language-model-only mode (every modality's limit
# 0: vLLM builds no vision tower and profiles no encoder): the sweep's prompts are text only, and
# here vLLM's image path for them needs torchvision, which cannot be installed beside the CPU
# torch (see docs/registry_sweep.md). CLIP and SigLIP run their towers on the sweep's images.
# (LLaVA-NeXT's and Qwen2-VL's vLLM modules import torchvision outright: not listed, untried.)
_VISION_ENCODER_INFO = ("vLLM's get_vision_encoder_info imports its Pixtral module, which "
                        "imports transformers' torchvision-only Pixtral image processor")
LANGUAGE_MODEL_ONLY = {
    "ColPaliForRetrieval": _VISION_ENCODER_INFO,
    "PaliGemmaForConditionalGeneration": _VISION_ENCODER_INFO,
}

# Architectures whose local tokenizer has its special tokens last: vLLM's CLIP processor takes
# token id 0 as its image placeholder and requires it not to be a special token (CLIP's
# vocabulary ends with its special tokens).
SPECIAL_TOKENS_LAST = {"CLIPModel"}


def multimodal_tokens(config_cls) -> list[str]:
    """MULTIMODAL_TOKENS' tokens for the token-id fields config_cls (or a sub-config) has."""
    fields, named, tokens = _all_fields(config_cls), set(), []
    for field, token in MULTIMODAL_TOKENS.items():
        canonical = _canonical(config_cls, field)  # LLaVA: image_token_id -> image_token_index
        if (field in fields or canonical in fields) and canonical not in named:
            named.add(canonical)
            tokens.append(token)
    return tokens


def _square(size: int) -> dict:
    return {"height": size, "width": size}


# The HF processor (image processor and tokenizer) a vision-language checkpoint carries, by
# config class: vLLM builds its multimodal inputs with it, and profiles the vision tower on a
# dummy image at start-up. Sized for the shrunk vision_config (PIL image processors: no
# torchvision here).
PROCESSORS = {
    "CLIPConfig": lambda t, c, tokenizer: t.CLIPProcessor(
        image_processor=t.CLIPImageProcessor(
            size={"shortest_edge": c.vision_config.image_size},
            crop_size=_square(c.vision_config.image_size)), tokenizer=tokenizer),
    "SiglipConfig": lambda t, c, tokenizer: t.SiglipProcessor(
        image_processor=t.SiglipImageProcessor(size=_square(c.vision_config.image_size)),
        tokenizer=tokenizer),
    # vLLM loads PaliGemmaProcessor, which reads image_seq_length from the image processor
    # (saved alone: the processor's constructor grows the tokenizer by PaliGemma's 1152
    # location/segmentation tokens, as it does again when vLLM loads it)
    "ColPaliConfig": lambda t, c, tokenizer: _paligemma_image_processor(t, c.vlm_config),
    "PaliGemmaConfig": lambda t, c, tokenizer: _paligemma_image_processor(t, c),
}


def _paligemma_image_processor(transformers, config):
    processor = transformers.SiglipImageProcessor(size=_square(config.vision_config.image_size))
    processor.image_seq_length = config.text_config.num_image_tokens
    return processor


def save_processor(config, out: str) -> bool:
    """Write PROCESSORS' processor for config into out (beside its tokenizer)."""
    make = PROCESSORS.get(type(config).__name__)
    if make is None:
        return False
    import transformers

    make(transformers, config, transformers.AutoTokenizer.from_pretrained(out)).save_pretrained(out)
    return True


def add_compat_fields(config) -> list[str]:
    """Set COMPAT_FIELDS' fields the config lacks; returns their names."""
    fn = COMPAT_FIELDS.get(type(config).__name__)
    added = []
    for name, value in (fn(config) if fn else {}).items():
        if not hasattr(config, name):
            setattr(config, name, value)
            added.append(name)
    return added


_OUT_PROJ = re.compile(r"(o_proj|down_proj|out_proj|dense_4h_to_h|c_proj|fc2|w2|\.dense\.)")


def rescale_generic(model, generator, maker) -> None:
    """make_tiny_model.py's SCALES by parameter role, for any module layout: embeddings, the
    output head, output projections, other matrices, biases; the final norm's gain where one is
    found outside the layers (the tied recipe needs it)."""
    import torch

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    scales = maker.SCALES["tied" if tied else "untied"]
    out_embed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = {id(p) for p in out_embed.parameters()} if out_embed is not None else set()
    embed_params = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embed_params |= {id(p) for p in module.parameters()}
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if id(param) in head_params and id(param) not in embed_params:
                role = "lm_head"
            elif id(param) in embed_params:
                role = "embed"
            elif name.endswith(".bias"):
                role = "bias"
            elif _OUT_PROJ.search(name):
                role = "out_proj"
            else:
                role = "proj"
            if param.dim() < 2 and role != "bias":
                continue
            if not param.is_floating_point():
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * scales[role])
        # The final norm: the last norm-like module outside numbered layers.
        final = None
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1].lower()
            if re.search(r"\.\d+(\.|$)", name) or not leaf:
                continue
            if ("norm" in leaf or leaf in ("ln_f",)) and getattr(module, "weight", None) is not None \
                    and module.weight.dim() == 1:
                final = module
        if final is not None:
            gemma_style = model.config.model_type.startswith("gemma")
            final.weight.fill_(scales["final_gain"] - 1.0 if gemma_style else scales["final_gain"])


def build_checkpoint(arch: str, out: str, seed: int) -> dict:
    """Write a tiny random checkpoint of arch to out. Returns facts about it (config class,
    sizes). Raises on any failure (the caller records not_buildable)."""
    import torch
    import transformers

    maker = _model_maker()
    if arch in maker.ARCHITECTURES:
        maker.make_model(arch, out, seed=seed)
        return {"builder": "make_tiny_model"}
    model_cls = getattr(transformers, arch, None)
    if model_cls is None:
        raise LookupError(f"transformers {transformers.__version__} has no class {arch}")
    config_cls = getattr(model_cls, "config_class", None)
    if config_cls is None or config_cls is transformers.PretrainedConfig:
        raise LookupError(f"transformers' {arch} names no config class")
    os.makedirs(out, exist_ok=True)
    tokenizer = maker.build_tokenizer(seed, specials_last=arch in SPECIAL_TOKENS_LAST)
    extra_tokens = TOKENIZER_SPECIAL_TOKENS.get(arch, []) + multimodal_tokens(config_cls)
    if extra_tokens:
        tokenizer.add_special_tokens(extra_tokens)
    maker.save_tokenizer(tokenizer, out)
    token_ids = {t: tokenizer.token_to_id(t) for t in maker.SPECIAL_TOKENS + extra_tokens}
    kwargs = dict(shrink_kwargs(config_cls, tokenizer.get_vocab_size(), token_ids),
                  **SHRINK_OVERRIDES.get(config_cls.__name__, {}))
    try:
        config = config_cls(**kwargs)
    except Exception as exc:
        raise RuntimeError(f"config build failure: {type(exc).__name__}: {exc}") from exc
    config.architectures = [arch]
    config.dtype = torch.float32
    compat = add_compat_fields(config)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    rescale_generic(model, torch.Generator().manual_seed(seed), maker)
    maker.save_model(model, arch, out)  # in the released layout where make_tiny_model knows it
    compat_weights = add_compat_weights(config, out)
    released_format = rewrite_config_json(config, out)
    processor = save_processor(config, out)
    params = sum(p.numel() for p in model.parameters())
    return {"builder": "generic", "config_class": config_cls.__name__, "params": params,
            "shrunk": sorted(kwargs), **({"compat_fields": compat} if compat else {}),
            **({"compat_weights": compat_weights} if compat_weights else {}),
            **({"extra_special_tokens": len(extra_tokens)} if extra_tokens else {}),
            **({"config_json": "released format"} if released_format else {}),
            **({"processor": "saved"} if processor else {})}


# ---------------------------------------------------------------------------------------------
# Prompts and the transformers reference


def prompt_ids(model_dir: str) -> list[list[int]]:
    import transformers

    maker = _model_maker()
    sentences = maker.training_text(PROMPT_SEED)[3000:]
    prompts = ["Hello, how are you today?", sentences[0], " ".join(sentences[1:5])]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p).input_ids for p in prompts]


def max_model_len(model_dir: str, limit: int = 256) -> int:
    """The engine's max_model_len: `limit`, or the text model's position table if shorter
    (CLIP's 77, SigLIP's 64: vLLM refuses a longer one; the prompts are at most 41 tokens)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir).get_text_config()
    except Exception:  # a config only vLLM's own classes read: vLLM checks the limit itself
        return limit
    positions = getattr(config, "max_position_embeddings", None)
    return min(limit, positions) if isinstance(positions, int) else limit


def _load_hf(arch: str, model_dir: str, base: bool = False):
    import torch
    import transformers

    cls = getattr(transformers, arch)
    if base:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    except (ValueError, TypeError) as exc:
        if "attn_implementation" not in str(exc) and "eager" not in str(exc):
            raise
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def reference_greedy(arch: str, model_dir: str, prompts: list[list[int]], max_tokens: int):
    """[(tokens, [top1 - top2 gap per step])] by full forwards without a cache."""
    import torch

    model = _load_hf(arch, model_dir)
    results = []
    with torch.no_grad():
        for ids in prompts:
            seq, tokens, gaps = list(ids), [], []
            for _ in range(max_tokens):
                x = torch.tensor([seq])
                logits = model(input_ids=x, attention_mask=torch.ones_like(x),
                               use_cache=False).logits[0, -1].float()
                top = torch.topk(logits, 2)
                tokens.append(int(top.indices[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                seq.append(tokens[-1])
            results.append((tokens, gaps))
    return results


def reference_embeddings(arch: str, model_dir: str, prompts: list[list[int]], pooling: str):
    import torch

    base = not arch.endswith("Model")  # *ForCausalLM / *ForMaskedLM: the base model's states
    model = _load_hf(arch, model_dir, base=base)
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0]
            vec = {"CLS": hidden[0], "LAST": hidden[-1], "MEAN": hidden.mean(0)}[pooling]
            out.append(vec.float())
    return out


# Pooling architectures whose vLLM output is not the base model's pooled last hidden states:
# architecture -> transformers' computation of the same output from the model of that class and
# one prompt's ids [1, n]: a vector, or one per token (token_embed).
POOLING_REFERENCES = {
    # CLIP's text embedding is text_projection of the text tower's final states at the EOS
    # token (CLIP's tokenizer ends every prompt with it); vLLM pools the projected states at the
    # LAST token. The sweep's prompts end without EOS, so the reference projects the last
    # token's state, which is where vLLM pools (with EOS last, get_text_features' own vector).
    "CLIPModel": lambda model, ids: model.text_projection(
        model.text_model(input_ids=ids).last_hidden_state[0, -1]),
    # SigLIP's text embedding: head() of the last token's state (bidirectional attention);
    # vLLM reverses each sequence so that its CLS pooling takes the last token
    "SiglipModel": lambda model, ids: model.get_text_features(input_ids=ids).pooler_output[0],
    # ColPali (token_embed): every token's last hidden state projected to embedding_dim and
    # L2-normalised
    "ColPaliForRetrieval": lambda model, ids: model(input_ids=ids).embeddings[0],
}


def reference_pooling_output(arch: str, model_dir: str, prompts: list[list[int]]):
    import torch

    model, compute = _load_hf(arch, model_dir), POOLING_REFERENCES[arch]
    with torch.no_grad():
        return [compute(model, torch.tensor([ids])).float() for ids in prompts]


# Dual encoders whose image embeddings are compared too, so that the vision tower runs on "mlx"
# on real inputs (not only vLLM's start-up profiling): vLLM embeds image-only prompts, transformers
# runs get_image_features on the pixels the checkpoint's processor makes of the same images.
IMAGE_EMBEDDINGS = ("CLIPModel", "SiglipModel")
# (height, width) of the random test images; the processor resizes them to the tower's size
IMAGE_SIZES = ((32, 32), (48, 40), (64, 64))


def test_images(seed: int = PROMPT_SEED) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in IMAGE_SIZES]


def reference_image_embeddings(arch: str, model_dir: str, images: list):
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    model = _load_hf(arch, model_dir)
    with torch.no_grad():
        return [model.get_image_features(pixel_values=processor(
            images=image, return_tensors="pt").pixel_values).pooler_output[0].float()
            for image in images]


def _colpali_without_projection_bias(model, ids):
    import torch

    hidden = model.vlm(input_ids=ids).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden @ model.embedding_proj_layer.weight.T, dim=-1)


# Mismatches whose cause is vLLM's model code, not the platform: architecture -> (the cause,
# transformers' computation of what vLLM's model computes instead). The status stays mismatch;
# the cause and the cosines against that second reference are recorded, to show that "mlx"
# runs vLLM's model as vLLM defines it.
VLLM_MODEL_DEVIATIONS = {
    # transformers' ColPaliForRetrieval, like colpali-engine's ColPali, projects with an
    # nn.Linear that has a bias; vLLM 0.32's ColPaliModel builds custom_text_proj with
    # bias=False when the config gives embedding_dim, and its load_weights skips the
    # checkpoint's embedding_proj_layer.bias (getattr(..., "bias") is None)
    "ColPaliForRetrieval": ("vLLM's ColPaliModel drops embedding_proj_layer.bias",
                            _colpali_without_projection_bias),
}


def _lowest_cosines(expected, got) -> list:
    """Per prompt, the cosine of vLLM's output with the reference (for per-token outputs the
    prompt's lowest token); None where the shapes differ."""
    import torch

    cosines = []
    for want, have in zip(expected, got):
        have = torch.as_tensor(have, dtype=torch.float32)
        cosines.append(None if have.shape != want.shape else float(
            torch.nn.functional.cosine_similarity(want, have, dim=-1).min()))
    return cosines


def reference_token_logits(arch: str, model_dir: str, prompts: list[list[int]]):
    """The architecture's own per-token logits [tokens, vocab] (a masked-LM head)."""
    import torch

    model = _load_hf(arch, model_dir)
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]


# ---------------------------------------------------------------------------------------------
# Error categories

_ATEN = re.compile(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


def categorize(text: str) -> str:
    """A short cause for grouping, from an exception's traceback text."""
    last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
    last = last[0]
    low = text.lower()
    if "timed out" in last or last.startswith("timeout"):
        return "timeout"
    if "NotImplementedError" in text:
        tail = text[text.rfind("NotImplementedError"):]
        message = tail.split("\n", 1)[0].split(":", 1)[-1].strip()  # its first line
        m = _ATEN.search(tail)
        if m:
            return f"missing lowering: {m.group(1).replace('::', '.')}"
        if "attention" in message.lower() or "soft-capping" in message.lower():
            # "ALiBi attention is not supported on mlx" -> "unsupported attention: ALiBi"
            what = re.sub(r"\s*(attention\s*)?(is |are )?not supported on mlx\s*", "", message)
            what = re.sub(r"\{'(\w+)': None\}.*", r"\1=None", what)  # passed as None
            what = re.sub(r"\{'(\w+)'.*", r"\1", what)  # an options dict: its first key
            return "unsupported attention: " + what.strip(" :")[:60]
        return "NotImplementedError: " + message[:80]
    if "transformers_utils/config" in text and "parse" in text and "load_weights" not in text:
        return "vllm config parsing: " + last.split(":", 1)[-1].strip()[:60]
    m = re.search(r"'(\w+Config)' object has no attribute", last)
    if m:
        return "config field vLLM reads is absent from transformers' config"
    if "load_weights" in text and "Error" in last:
        return "weight loading: " + last.split(":", 1)[0].strip()[-40:]
    if "triton" in low and ("triton" in last.lower() or "jit" in last.lower()):
        return "cuda/triton-only kernel"
    if re.search(r"\b(cuda|_C\.|torch\.ops\._C|cutlass|flashinfer)", last, re.I):
        return "cuda/triton-only kernel"
    if "torch.ops._c" in low or "_C::" in text or "no attribute '_C'" in text:
        return "cuda/triton-only kernel"
    if "available kv cache memory" in last.lower():
        return "KV cache budget: one request of max_model_len does not fit"
    if "attention backend" in low or "no valid attention backend" in low:
        return "unsupported attention"
    if last.startswith(("pydantic", "ValidationError")) or "validation error" in low[-2000:]:
        return "vllm rejected config"
    m = re.match(r"([A-Za-z_.]+(Error|Exception))", last)
    return (m.group(1).rsplit(".", 1)[-1] + ": " + last.split(":", 1)[-1].strip()[:60]
            ) if m else last[:80]


# Causes found by reading vLLM's and transformers' code, for errors whose generic category would
# point elsewhere: architecture -> (a pattern the error's traceback must match, the category).
# Only an error that still matches is labelled (a changed error gets the generic category).
ARCH_CAUSES = {
    # vLLM maps transformers' Inkling field names to its own only in its InklingModelConfig
    # (model_type "inkling_model", the released format); a transformers-format text config
    # ("inkling_text") reaches vLLM's model as is, which reads intermediate_size as the expert
    # width (transformers: the dense width) and lacks padded_vocab_size, local_layer_ids, ...
    # Given an "inkling_model" config.json, vLLM's model stops at its sconv SWA cache
    # (bfloat16 only); its attention is FlashAttention-4 (CuTe DSL) with a relative bias and
    # its convolutions and norms are Triton kernels: CUDA-only on any config.
    "InklingForCausalLM": (
        r"'InklingTextConfig' object has no attribute",
        "vLLM's Inkling: OG-format configs only (inkling_model), CUDA/Triton-only kernels"),
    # vLLM 0.32 serves Kimi-Linear through its NVIDIA Kimi-K3 model (vllm/models/kimi_k3),
    # whose constructor makes a torch.cuda.Stream; its MLA layer and KDA kernels are Kimi-K3's
    # own Triton/CUDA ones (only ROCm gets another implementation).
    "KimiLinearForCausalLM": (
        r"torch\.cuda\.Stream requires CUDA support",
        "vLLM's Kimi-Linear is its NVIDIA Kimi-K3 model (torch.cuda.Stream at construction)"),
    # vLLM 0.32's OLMo-Hybrid conv1d weight loader takes the q/k/v part as an argument that
    # vLLM's AutoWeightsLoader never passes (its mapper puts it on the tensor): no checkpoint
    # loads, on any platform. tests/vllm_metal/test_generation.py works around it to check the
    # gated delta-net kernels end to end.
    "OlmoHybridForCausalLM": (
        r"dims\[loaded_shard_id\]",
        "vLLM 0.32's OLMo-Hybrid conv1d loader is never given its shard id (any platform)"),
}


def recategorize(result: dict) -> None:
    """An error's category by the current rules; where vLLM's model inspection (a subprocess of
    its own) failed, the cause is in the child's log, not in the traceback."""
    if result["status"] != "error" or result.get("stage") not in ("engine", "run"):
        return
    result["category"] = categorize(result["traceback_tail"])
    known = ARCH_CAUSES.get(result["arch"])
    if known and re.search(known[0], result["traceback_tail"]):
        result["category"] = known[1]
    if "failed to be inspected" in result["traceback_tail"] and result.get("log") \
            and os.path.exists(result["log"]):
        with open(result["log"], errors="replace") as f:
            m = re.search(r"No module named '([\w.]+)'", f.read())
        result["category"] = ("vLLM's model module does not import: no module named "
                              f"{m.group(1)}" if m else "vLLM could not inspect the model class")


# ---------------------------------------------------------------------------------------------
# One architecture (child process)


def run_one(registry: str, arch: str, workdir: str, seed: int, max_tokens: int) -> dict:
    result = {"arch": arch, "registry": registry}
    t0 = time.time()
    model_dir = os.path.join(workdir, arch)
    try:
        result["build"] = build_checkpoint(arch, model_dir, seed)
    except Exception as exc:
        result.update(status="not_buildable", reason=f"{type(exc).__name__}: {exc}"[:300],
                      stage="build")
        return result
    result["build_s"] = round(time.time() - t0, 1)
    prompts = prompt_ids(model_dir)
    result["prompt_tokens"] = [len(p) for p in prompts]

    t1 = time.time()
    if registry in GENERATING:
        try:
            expected = reference_greedy(arch, model_dir, prompts, max_tokens)
        except Exception as exc:
            result.update(status="not_buildable", stage="reference",
                          reason=f"transformers reference failed: {type(exc).__name__}: {exc}"[:300])
            return result
        result["reference_s"] = round(time.time() - t1, 1)
        result["min_gap"] = min(min(g) for _, g in expected)

    # vLLM on mlx, in this process.
    t2 = time.time()
    stage = "engine"
    try:
        import vllm
        from vllm import SamplingParams

        kw = dict(model=model_dir, dtype="float32", max_model_len=max_model_len(model_dir),
                  max_num_seqs=4, seed=0, enforce_eager=True)
        if registry == "pooling":
            kw["runner"] = "pooling"
        if arch in LANGUAGE_MODEL_ONLY:
            kw["language_model_only"] = True
            result["language_model_only"] = LANGUAGE_MODEL_ONLY[arch]
        llm = vllm.LLM(**kw)
        result["engine_s"] = round(time.time() - t2, 1)
        from vllm.platforms import current_platform

        result["device"] = current_platform.device_type
        stage = "run"
        inputs = [{"prompt_token_ids": p} for p in prompts]
        if registry in GENERATING:
            params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens,
                                    temperature=0.0, ignore_eos=True)
            outputs = llm.generate(inputs, params, use_tqdm=False)
            got = [list(o.outputs[0].token_ids) for o in outputs]
        else:
            pooler = llm.llm_engine.model_config.pooler_config
            pooling = pooler.seq_pooling_type if pooler is not None else None
            if "embed" not in llm.supported_tasks:
                # token-level models: per-token MLM logits (BERT), per-token embeddings (ColPali)
                pooling = next((t for t in ("token_classify", "token_embed")
                                if t in llm.supported_tasks), pooling)
            result["pooling"] = pooling
            if pooling in ("token_classify", "token_embed"):
                from vllm import PoolingParams

                params = PoolingParams(use_activation=False) if pooling == "token_classify" \
                    else None
                outputs = llm.encode(inputs, params, pooling_task=pooling, use_tqdm=False)
                got = [o.outputs.data.float().cpu() for o in outputs]
            else:
                outputs = llm.embed(inputs, use_tqdm=False)
                got = [list(o.outputs.embedding) for o in outputs]
            if arch in IMAGE_EMBEDDINGS:
                images = test_images()
                outputs = llm.embed([{"prompt": "", "multi_modal_data": {"image": image}}
                                     for image in images], use_tqdm=False)
                got_images = [list(o.outputs.embedding) for o in outputs]
    except Exception:
        tb = traceback.format_exc()
        result.update(status="error", stage=stage, category=categorize(tb),
                      detail=[l for l in tb.strip().splitlines() if l.strip()][-1][:300],
                      traceback_tail=tb[-3000:])
        return result
    result["vllm_s"] = round(time.time() - t2, 1)

    if registry in GENERATING:
        result["status"] = "pass"
        for i, ((want, gaps), have) in enumerate(zip(expected, got)):
            if have == want:
                continue
            step = next((k for k, (a, b) in enumerate(zip(want, have)) if a != b),
                        min(len(want), len(have)))
            gap = gaps[step] if step < len(gaps) else None
            tie = gap is not None and gap < NEAR_TIE_GAP
            result.update(status="near_tie" if tie else "mismatch",
                          first_divergence=dict(prompt=i, step=step, gap=gap,
                                                expected=want, got=have))
            if not tie:
                break
    else:
        import torch

        if pooling not in ("CLS", "LAST", "MEAN", "token_classify") and \
                arch not in POOLING_REFERENCES:
            result.update(status="error", stage="compare", category="unknown pooling type",
                          detail=f"pooler seq_pooling_type={pooling!r}")
            return result
        try:
            if arch in POOLING_REFERENCES:
                expected = reference_pooling_output(arch, model_dir, prompts)
            elif pooling == "token_classify":
                expected = reference_token_logits(arch, model_dir, prompts)
            else:
                expected = reference_embeddings(arch, model_dir, prompts, pooling)
        except Exception as exc:
            result.update(status="not_buildable", stage="reference",
                          reason=f"transformers reference failed: {type(exc).__name__}: {exc}"[:300])
            return result
        cosines = _lowest_cosines(expected, got)
        result["cosines"] = cosines
        if arch in IMAGE_EMBEDDINGS:
            result["image_cosines"] = _lowest_cosines(
                reference_image_embeddings(arch, model_dir, images), got_images)
            cosines = cosines + result["image_cosines"]
        ok = all(c is not None and c >= COSINE_MIN for c in cosines)
        result["status"] = "pass" if ok else "mismatch"
        if not ok and arch in VLLM_MODEL_DEVIATIONS:
            cause, compute = VLLM_MODEL_DEVIATIONS[arch]
            model = _load_hf(arch, model_dir)
            with torch.no_grad():
                as_vllm = [compute(model, torch.tensor([ids])).float() for ids in prompts]
            result.update(category=cause, cosines_vllm_model=_lowest_cosines(as_vllm, got))
        if any(c is None for c in cosines):
            result["detail"] = (f"output shape {tuple(torch.as_tensor(got[0]).shape)} vs the "
                                f"reference's {tuple(expected[0].shape)}")
    result["total_s"] = round(time.time() - t0, 1)
    return result


def child_main(args) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = run_one(args.registry, args.child, args.workdir, args.seed, args.max_tokens)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------------------------
# The sweep (parent)


def run_child(registry: str, arch: str, args, workdir: str) -> dict:
    result_path = os.path.join(workdir, f"{registry}-{arch}.json")
    log_path = os.path.join(workdir, f"{registry}-{arch}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", arch, "--registry", registry,
           "--workdir", workdir, "--result", result_path, "--seed", str(args.seed),
           "--max-tokens", str(args.max_tokens)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    elapsed = round(time.time() - t0, 1)
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    else:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        if rc is None:
            category, detail = "timeout", f"no result after {args.timeout} s"
        else:
            category = (f"crash (signal {-rc})" if rc < 0 else categorize(tail)
                        if "Traceback" in tail else f"crash (exit {rc})")
            detail = ([l for l in tail.strip().splitlines() if l.strip()] or [""])[-1][:300]
        result = dict(arch=arch, registry=registry, status="error", stage="process",
                      category=category, detail=detail, traceback_tail=tail)
    result["wall_s"] = elapsed
    result["log"] = log_path
    return result


def summarize(results: list[dict]) -> str:
    width = max([9] + [len(r["registry"]) for r in results])
    lines = [f"{'registry':{width}} {'architecture':34} {'status':13} {'s':>5}  cause"]
    for r in results:
        cause = (r.get("category") or r.get("reason") or "")
        if r["status"] in ("mismatch", "near_tie") and r.get("first_divergence"):
            d = r["first_divergence"]
            cause = f"prompt {d['prompt']} step {d['step']} gap {d['gap']:.3g}" \
                if d.get("gap") is not None else f"prompt {d['prompt']} step {d['step']}"
        elif r["status"] == "mismatch" and r.get("cosines"):
            cause = "cosines " + ", ".join("None" if c is None else f"{c:.6f}"
                                           for c in r["cosines"])
            if r.get("category"):  # a known cause in vLLM's model (VLLM_MODEL_DEVIATIONS)
                cause = f"{r['category']} ({cause})"
        lines.append(f"{r['registry']:{width}} {r['arch']:34} {r['status']:13} "
                     f"{r.get('wall_s', 0):5.0f}  {cause[:110]}")
    lines.append("")
    for registry in sorted({r["registry"] for r in results}):
        rs = [r for r in results if r["registry"] == registry]
        counts = {}
        for r in rs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        buildable = len(rs) - counts.get("not_buildable", 0)
        lines.append(f"{registry}: {len(rs)} run, " + ", ".join(
            f"{k} {v}" for k, v in sorted(counts.items())) +
            f"; pass {counts.get('pass', 0)}/{buildable} buildable")
        cats = {}
        for r in rs:
            if r["status"] == "error":
                cats[r["category"]] = cats.get(r["category"], 0) + 1
        for cat, n in sorted(cats.items(), key=lambda kv: -kv[1]):
            lines.append(f"    error {n:3d}  {cat}")
        reasons = {}
        for r in rs:
            if r["status"] == "not_buildable":
                key = re.sub(r"class \w+", "class <arch>", r["reason"].split("\n")[0])[:90]
                reasons[key] = reasons.get(key, 0) + 1
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"    not buildable {n:3d}  {reason}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated architectures (of the registries chosen)")
    parser.add_argument("--skip", help="comma-separated architectures to leave out (listed as "
                        "not run in the output)")
    parser.add_argument("--registry", choices=["generate", "pooling", "all", "multimodal"],
                        default="all", help="all: generate and pooling; multimodal: vLLM's "
                        "vision-language models, generating from text-only prompts")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per architecture")
    parser.add_argument("--jobs", type=int, default=1, help="architectures at once")
    parser.add_argument("--json", help="write the results here (updated after each one)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in --json and run only the others")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="checkpoints and logs (default: a temporary folder)")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print the table and totals of saved results (no runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.summarize:
        results = []
        for path in args.summarize:
            with open(path) as f:
                results += json.load(f)["results"]
        for r in results:
            recategorize(r)
        print(summarize(results))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="registry-sweep-")
    os.makedirs(workdir, exist_ok=True)
    # Enumerating the registry imports vllm only in a child: keep this process light.
    listing = subprocess.run(
        [sys.executable, "-c", "import json, sys; sys.path.insert(0, %r); "
         "import registry_sweep as s; print(json.dumps([(r, a, s.transformers_lacks(a)) "
         "for r, a, _ in s.registry_architectures(%r)]))"
         % (str(ROOT / "tools"), args.registry)],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, VLLM_METAL_USE_MLX="0", TORCH_DEVICE_BACKEND_AUTOLOAD="0"))
    todo = [tuple(x) for x in json.loads(listing.stdout.strip().splitlines()[-1])]
    if args.only:
        only = set(args.only.split(","))
        unknown = only - {a for _, a, _ in todo}
        if unknown:
            sys.exit(f"not in the registry chosen: {', '.join(sorted(unknown))}")
        todo = [t for t in todo if t[1] in only]
    skip = set(args.skip.split(",")) if args.skip else set()

    results = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)["results"]
        if args.only:  # --resume --only A,B: run A and B again, replacing their results
            results = [r for r in results if r["arch"] not in only]
    done = {(r["registry"], r["arch"]) for r in results}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"vllm_registry": args.registry, "max_tokens": args.max_tokens,
                           "timeout_s": args.timeout, "results": results}, f, indent=1)

    from concurrent.futures import ThreadPoolExecutor

    lacking = {(reg, arch): why for reg, arch, why in todo if why}
    for reg, arch in lacking:
        if (reg, arch) not in done and arch not in skip:
            results.append(dict(arch=arch, registry=reg, status="not_buildable", stage="build",
                                reason=lacking[(reg, arch)], wall_s=0.0))
    done |= set(lacking)
    pending = [(reg, arch) for reg, arch, _ in todo if (reg, arch) not in done]
    for reg, arch in [p for p in pending if p[1] in skip]:
        results.append(dict(arch=arch, registry=reg, status="not_run", reason="--skip"))
    pending = [p for p in pending if p[1] not in skip]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_child, reg, arch, args, workdir): (reg, arch)
                   for reg, arch in pending}
        for future in futures:
            r = future.result()
            results.append(r)
            print(f"[{len(results)}/{len(todo)}] {r['registry']} {r['arch']}: {r['status']} "
                  f"{r.get('category') or r.get('reason') or ''} ({r.get('wall_s')} s)",
                  flush=True)
            save()
    for r in results:  # categories by the current rules (also for results kept by --resume)
        recategorize(r)
    order = {(reg, arch): i for i, (reg, arch, _) in enumerate(todo)}
    results.sort(key=lambda r: order.get((r["registry"], r["arch"]), 1 << 30))
    save()
    print(summarize(results))


if __name__ == "__main__":
    main()
