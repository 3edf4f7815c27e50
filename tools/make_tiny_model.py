"""Make a small random-initialised checkpoint of a real architecture, with a local tokenizer.

    python tools/make_tiny_model.py ARCH OUT [--seed N]

ARCH is one of ARCHITECTURES (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
MistralForCausalLM, GemmaForCausalLM, Phi3ForCausalLM, and the mixtures of experts
MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM; MLA: DeepseekV2ForCausalLM,
DeepseekV3ForCausalLM; state-space: MambaForCausalLM, Mamba2ForCausalLM; gated delta-net
hybrids: Qwen3NextForCausalLM, OlmoHybridForCausalLM). OUT receives
config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json
(with a chat template). Nothing is downloaded: the tokenizer is a byte-level BPE trained with
`tokenizers` on text generated here from the seed, and the weights come from transformers'
initialisation under `torch.manual_seed(seed)`, then rescaled. The same ARCH and seed give the same files, byte for
byte.

Why rescale: at transformers' default init (std 0.02) a random model's next-token distribution
is almost flat (top-1 log-probability near log(1/vocab)) and neighbouring logits differ by little
more than float32 noise, so two correct implementations could disagree on a greedy token. The
scales below (SCALES) give a mean top-1 log-probability of about -1.3, 25-32 distinct tokens in 32
greedy steps, and top-1/top-2 gaps that are typically 1e-2 or more. A tied head needs its own
recipe: with a large embedding the residual stream keeps the input token's embedding and the model
predicts its own input forever, so the embedding is small, the layers' output projections large
and the final norm's gain supplies the logit scale.
"""
import argparse
import json
import os
import random
import re

import torch

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shared sizes: small enough for a 2-core CI machine, large enough to be a real model.
COMMON = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,  # GQA: 4 query heads per kv head
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)

# Gemma 2's soft caps for the tiny model (its released models use 50 and 30). At 5 the
# attention cap changes the tiny model's greedy tokens from the 4th on (transformers, eager
# attention); the final cap cannot change a greedy token (tanh is monotonic), only logprobs.
ATTN_CAP, FINAL_CAP = 5.0, 3.0

# Per architecture: the config class and what differs from COMMON.
# DeepSeek-V3's tiny shape: low-rank queries (q_lora_rank), sigmoid routing with a correction
# bias in groups; DeepSeek-V3.2 adds its indexer to it
_DEEPSEEK_V3 = dict(num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=4,
                    num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
                    first_k_dense_replace=1, n_group=2, topk_group=1,
                    topk_method="noaux_tc", scoring_func="sigmoid",  # as V3 checkpoints name them
                    rope_theta=10000.0, tie_word_embeddings=False)

ARCHITECTURES = {
    "LlamaForCausalLM": ("LlamaConfig", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=False)),
    "Qwen3ForCausalLM": (
        "Qwen3Config",
        dict(head_dim=64, rope_theta=1000000.0, tie_word_embeddings=False),  # q/k RMSNorm
    ),
    "MistralForCausalLM": (
        "MistralConfig",
        # A window shorter than the long test prompts, so sliding-window attention is exercised.
        dict(num_hidden_layers=3, num_key_value_heads=1, sliding_window=40,
             rope_theta=10000.0, tie_word_embeddings=False),  # MQA
    ),
    "GemmaForCausalLM": (
        "GemmaConfig",
        # (1 + w) RMSNorm, tanh-GELU MLP, sqrt(hidden)-scaled embeddings, tied head.
        dict(head_dim=32, num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh",
             tie_word_embeddings=True),
    ),
    "Gemma2ForCausalLM": (
        "Gemma2Config",
        # Gemma's, plus: attention logits and final logits soft-capped (caps small enough to
        # change this model's tokens), a sliding-window layer then a global one, a query scale
        # of its own (query_pre_attn_scalar), post-attention/MLP norms
        dict(head_dim=32, num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh",
             tie_word_embeddings=True, sliding_window=40, attn_logit_softcapping=ATTN_CAP,
             final_logit_softcapping=FINAL_CAP, query_pre_attn_scalar=24),
    ),
    "Phi3ForCausalLM": (
        "Phi3Config",
        # Fused qkv_proj and gate_up_proj checkpoints.
        dict(num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False,
             pad_token_id=0),
    ),
    # Mixtures of experts (vLLM's FusedMoE). Each token's top-2 of a few experts, so a batch
    # of prompts routes to every expert and a single token to two.
    "MixtralForCausalLM": (
        "MixtralConfig",
        # softmax, top-2, renormalized. Mixtral's own rope base: mlx-lm (the quantized tests'
        # reference) reads no rope_parameters and assumes it
        dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0,
             tie_word_embeddings=False),
    ),
    "Qwen2MoeForCausalLM": (
        "Qwen2MoeConfig",
        # top-k not renormalized, and a shared expert scaled by its own sigmoid gate
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
             shared_expert_intermediate_size=256, norm_topk_prob=False, decoder_sparse_step=1,
             rope_theta=1000000.0, tie_word_embeddings=False),
    ),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        # renormalized top-k of 8 experts; q/k RMSNorm as Qwen3
        dict(head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
             norm_topk_prob=True, decoder_sparse_step=1, rope_theta=1000000.0,
             tie_word_embeddings=False),
    ),    "GptOssForCausalLM": (
        "GptOssConfig",
        # attention sinks (a learned logit per head in each softmax), a sliding-window layer then
        # a full one, biased q/k/v/o, top-2 of 4 biased experts with the clamped swiglu ("oai")
        dict(head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=40,
             layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
    ),
    # Multi-head latent attention (vLLM's MLAAttention: a cached latent of kv_lora_rank plus a
    # shared rotary key, decompressed per head by kv_b_proj), a dense first layer then a
    # mixture of experts with a shared expert. As many key/value heads as query heads, as in
    # DeepSeek's configs (transformers' eager MLA attention does not repeat them).
    "DeepseekV2ForCausalLM": (
        "DeepseekV2Config",
        # V2-Lite's shape: queries projected directly (no q_lora_rank); greedy top-2 routing
        # (vLLM routes in groups: one group is the plain top-k)
        dict(num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=4, num_experts_per_tok=2,
             n_shared_experts=1,
             moe_intermediate_size=128, first_k_dense_replace=1, topk_method="greedy",
             n_group=1, topk_group=1, rope_theta=10000.0, tie_word_embeddings=False),
    ),
    "DeepseekV3ForCausalLM": (
        "DeepseekV3Config",
        _DEEPSEEK_V3,
    ),
    # DeepSeek-V3.2's sparse MLA: V3's layers plus a lightning indexer per layer that keeps each
    # query's 8 best earlier tokens (fewer than most prompts have: the selection is exercised;
    # a short prompt's early tokens have fewer than 8 and attend to all). 16 indexer heads make
    # exact zero-score ties (a relu per head) improbable.
    "DeepseekV32ForCausalLM": (
        "DeepseekV32Config",
        dict(_DEEPSEEK_V3, index_topk=8, index_head_dim=32, index_n_heads=16),
    ),
    # State-space models (vLLM's Mamba mixers: causal conv1d and a selective scan, a recurrent
    # state per request instead of a KV cache). Mamba-1: per-channel decay (inner size 512).
    "MambaForCausalLM": (
        "MambaConfig",
        dict(state_size=16, expand=2, conv_kernel=4, time_step_rank=16, use_mambapy=False,
             tie_word_embeddings=False),
    ),
    # Mamba-2: per-head scalar decay, 8 heads of 64, a gated RMSNorm before the output
    # projection; chunks of 32 tokens, so the longer prompts span several chunks. One group of
    # B/C: with more, transformers' gated norm (over the whole inner size) and vLLM's (per
    # group, as mamba_ssm's) are different functions.
    "Mamba2ForCausalLM": (
        "Mamba2Config",
        dict(state_size=16, expand=2, conv_kernel=4, num_heads=8, head_dim=64, n_groups=1,
             chunk_size=32, time_step_rank=16, tie_word_embeddings=False),
    ),
    # Gated delta-net hybrids (vLLM's GDN layers: causal conv1d, then the gated delta rule, a
    # [V, K] state per value head): two linear-attention layers, then a full-attention one.
    # 2 key heads for 4 value heads, value heads wider than key heads (32 -> 64), so the
    # kernels' head grouping and V != K are exercised; the longer prompts span several of the
    # kernels' 64-token chunks.
    "Qwen3NextForCausalLM": (
        "Qwen3NextConfig",
        # Qwen3-Next: gated attention with partial rotary, (1 + w) norms, a mixture of 4
        # experts (top 2) with a gated shared expert in every layer
        dict(num_hidden_layers=3, layer_types=["linear_attention", "linear_attention",
                                               "full_attention"],
             head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=32, linear_value_head_dim=64, linear_conv_kernel_dim=4,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
             shared_expert_intermediate_size=256, decoder_sparse_step=1, rope_theta=10000.0,
             tie_word_embeddings=False),
    ),
    "OlmoHybridForCausalLM": (
        "OlmoHybridConfig",
        # OLMo-Hybrid: beta in (0, 2) (allow_neg_eigval), q/k-normed attention, dense MLPs
        dict(num_hidden_layers=3, layer_types=["linear_attention", "linear_attention",
                                               "full_attention"],
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
             linear_value_head_dim=64, linear_conv_kernel_dim=4, linear_allow_neg_eigval=True,
             rope_theta=10000.0, tie_word_embeddings=False),
    ),
}

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "qui", "zo", "fa",
              "ber", "ton", "el", "an", "is", "or", "um", "gra", "ple", "sto", "wen", "yi"]


def training_text(seed: int, num_sentences: int = 6000) -> list[str]:
    """Pseudo-language text: a fixed lexicon of invented words, sentences with punctuation and
    numbers, so BPE learns a few hundred merges and encodes real-looking prompts compactly."""
    rng = random.Random(seed)
    lexicon = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
                      for _ in range(900)})
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(lexicon) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", "?", "!", ","])
        lines.append(sentence)
    # Also the English of the tests' prompts and chat roles.
    lines += ["The quick brown fox jumps over the lazy dog.", "user", "assistant", "system",
              "Hello, how are you today? Tell me a story about the sea."] * 20
    return lines


def build_tokenizer(seed: int, specials_last: bool = False):
    """The BPE tokenizer, VOCAB_SIZE tokens. The special tokens take the first ids, or with
    specials_last the last ones (as in CLIP's vocabulary, where id 0 is an ordinary token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - (len(SPECIAL_TOKENS) if specials_last else 0),
        special_tokens=[] if specials_last else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(seed), trainer=trainer)
    if specials_last:
        tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def save_tokenizer(tokenizer, out: str) -> None:
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": COMMON["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def make_config(arch: str, vocab_size: int, token_ids: dict, **config_overrides):
    import transformers

    class_name, overrides = ARCHITECTURES[arch]
    kwargs = dict(COMMON, vocab_size=vocab_size, bos_token_id=token_ids["<|bos|>"],
                  eos_token_id=token_ids["<|eos|>"], pad_token_id=token_ids["<|pad|>"])
    kwargs.update(overrides)
    kwargs.update(config_overrides)
    config = getattr(transformers, class_name)(**kwargs)
    config.architectures = [arch]
    config.dtype = torch.float32
    return config


# Standard deviations by parameter role, and the final norm's gain (module docstring).
SCALES = {
    "untied": dict(embed=0.5, proj=0.05, out_proj=0.05, lm_head=0.2, bias=0.05, final_gain=1.0,
                   sinks=1.0),
    "tied": dict(embed=0.02, proj=0.08, out_proj=0.5, lm_head=None, bias=0.05, final_gain=10.0),
}


def _role(name: str) -> str:
    if "embed_tokens" in name or "embeddings" in name:  # Mamba: backbone.embeddings
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    if name.endswith(".bias") or name.endswith("_bias"):
        return "bias"
    if name.endswith(".sinks"):
        return "sinks"
    if "o_proj" in name or "down_proj" in name:
        return "out_proj"
    return "proj"


@torch.no_grad()
def rescale_weights(model, generator: torch.Generator) -> None:
    """Redraw matrices and biases at SCALES; norms keep transformers' init except the final one."""
    scales = SCALES["tied" if model.config.tie_word_embeddings else "untied"]
    for name, param in sorted(model.named_parameters()):
        role = _role(name)
        if param.dim() < 2 and role not in ("bias", "sinks"):
            continue
        param.copy_(torch.randn(param.shape, generator=generator) * scales[role])
    base = getattr(model, "model", None) or model.backbone  # Mamba: backbone.norm_f
    norm = (base.norm if hasattr(base, "norm") else base.norm_f).weight
    # Gemma's RMSNorm multiplies by (1 + w), the others by w.
    gemma_style = model.config.model_type.startswith("gemma")
    norm.fill_(scales["final_gain"] - 1.0 if gemma_style else scales["final_gain"])


def _olmo_hybrid_released(state: dict, config) -> dict:
    """OLMo-Hybrid's released layout: one q/k/v conv weight each (key, key, value channels),
    where transformers keeps them concatenated. (transformers 5.19's save_pretrained, reverting
    its conversion, splits the concatenation in three equal parts, wrong whenever the value
    width differs from the key width, and renames the norms of every layer, attention layers
    included, to names the released checkpoints and vLLM do not use.)"""
    key = config.linear_num_key_heads * config.linear_key_head_dim
    out = {}
    for name, tensor in state.items():
        if name.endswith("linear_attn.conv1d.weight"):
            base = name[: -len("conv1d.weight")]
            for part, rows in zip("qkv", tensor.split([key, key, tensor.shape[0] - 2 * key])):
                out[f"{base}{part}_conv1d.weight"] = rows.contiguous()
        else:
            out[name] = tensor
    return out


_HYV4_RELEASED_NAMES = [
    # transformers' name (regex) -> the released checkpoints' (Hy4-preview's) name
    (re.compile(r"\.attn_hc\.(fn|base|scale)$"), r".hc_attn_layer.hc_pre.hc_\1"),
    (re.compile(r"\.ffn_hc\.(fn|base|scale)$"), r".hc_mlp_layer.hc_pre.hc_\1"),
    (re.compile(r"^model\.hc_head\.hc_(fn|base|scale)$"), r"model.hc_head.hc_head_\1"),
    (re.compile(r"\.self_attn\.sinks$"), r".self_attn.learnable_sink_param"),
    (re.compile(r"\.self_attn\.gate_proj\.weight$"), r".self_attn.linear_gate.weight"),
]


def _hyv4_released(state: dict, config) -> dict:
    """HY V4's released names: the hyper-connection weights under hc_attn_layer.hc_pre /
    hc_mlp_layer.hc_pre and hc_head.hc_head_*, the attention gate as linear_gate, the sinks as
    learnable_sink_param (transformers' conversion_mapping "hy_v4" renames these on load).
    transformers 5.19's save_pretrained reverts that mapping wrongly: it writes
    layers.N.hc_pre.hc_attn_layer.hc_fn and model.hc_pre.hc_head.hc_head_fn (reverting
    ".hc_pre.hc_" -> ".hc_" after the others, on every ".hc_"), and linear_gate for the MLPs'
    gate_proj too (reverting ".linear_gate" -> ".gate_proj" on every gate_proj), names neither
    the released checkpoints nor vLLM use."""
    out = {}
    for name, tensor in state.items():
        for pattern, repl in _HYV4_RELEASED_NAMES:
            name, n = pattern.subn(repl, name)
            if n:
                break
        out[name] = tensor
    return out


# Architectures whose checkpoint is written in its released layout from transformers' own
# names (saved with save_original_format=False, then rewritten): arch -> (state, config) -> state.
RELEASED_LAYOUT = {"OlmoHybridForCausalLM": _olmo_hybrid_released,
                   "HYV4ForCausalLM": _hyv4_released}


def save_model(model, arch: str, out: str) -> None:
    """model.save_pretrained(out), in the released layout where RELEASED_LAYOUT has arch (checked
    to load back into transformers as the very model saved)."""
    if arch not in RELEASED_LAYOUT:
        model.save_pretrained(out)
        return
    import transformers
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out, save_original_format=False)
    path = os.path.join(out, "model.safetensors")
    save_file(RELEASED_LAYOUT[arch](load_file(path), model.config), path,
              metadata={"format": "pt"})
    # transformers must read the rewritten file back as the very model it was made from
    loaded = getattr(transformers, arch).from_pretrained(out).state_dict()
    for name, tensor in model.state_dict().items():
        if not torch.equal(loaded[name], tensor):
            raise ValueError(f"{arch}: {name} differs after the released-layout rewrite")


def make_model(arch: str, out: str, seed: int = 0, **config_overrides) -> str:
    """config_overrides: config fields to change from ARCHITECTURES' (tie_word_embeddings=True
    for a tied variant of an untied architecture, say)."""
    import transformers

    os.makedirs(out, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    save_tokenizer(tokenizer, out)
    config = make_config(arch, tokenizer.get_vocab_size(),
                         {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}, **config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    rescale_weights(model, torch.Generator().manual_seed(seed))
    save_model(model, arch, out)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arch", choices=sorted(ARCHITECTURES))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_model(args.arch, args.out, args.seed))


if __name__ == "__main__":
    main()
