"""transformers on the CPU in float32: the reference vLLM-on-mlx is compared with."""
import functools
import json
import os

import torch
import transformers


@functools.lru_cache(maxsize=2)
def load(model_dir: str):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # the checkpoint's own class, not AutoConfig's: vLLM registers its config classes there (in
    # this process vllm is imported), some for other model types (deepseek_v32 -> DeepSeek-V3's,
    # which would build a model without the sparse indexer)
    with open(os.path.join(model_dir, "config.json")) as f:
        model_cls = getattr(transformers, json.load(f)["architectures"][0])
    config = model_cls.config_class.from_pretrained(model_dir)
    # transformers applies attention logit soft-capping (Gemma 2) in its eager attention only:
    # SDPA would silently compute uncapped attention
    extra = ({"attn_implementation": "eager"}
             if getattr(config, "attn_logit_softcapping", None) else {})
    model = model_cls.from_pretrained(model_dir, config=config, dtype=torch.float32, **extra)
    return tokenizer, model.eval()


@torch.no_grad()
def greedy(model_dir: str, prompt_ids: list[int], max_tokens: int):
    """transformers' greedy generation of exactly max_tokens tokens (EOS suppressed, as vLLM's
    min_tokens does). Returns (token ids, per-step raw logits [max_tokens, vocab])."""
    _, model = load(model_dir)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, torch.cat(out.logits, dim=0)


def tokenize(model_dir: str, prompt: str) -> list[int]:
    tokenizer, _ = load(model_dir)
    return tokenizer(prompt).input_ids
