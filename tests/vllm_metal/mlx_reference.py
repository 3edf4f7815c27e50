"""mlx-lm on the same files: the reference quantized checkpoints are compared with.

``greedy`` runs mlx-lm's own generation loop (``generate_step``: its model code, KV cache and
prompt handling) with greedy sampling, and returns for each generated token the gap between
mlx-lm's top two logits there, so a comparison can tell a real divergence from a near-tie (two
candidates within float rounding of each other).
"""
import functools
import json
import os

NEAR_TIE = 1e-3  # a divergence where mlx-lm's top-2 logit gap is below this is a near-tie


def checkpoint_dtype(model_dir: str) -> str:
    """The dtype mlx-lm computes in for these files: config.json's. vLLM's "auto" would downcast
    a float32 checkpoint to the platform's preferred half type (bfloat16 on a GPU), so the vLLM
    side of a comparison asks for this dtype explicitly."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    return config.get("torch_dtype") or config.get("dtype") or "float32"


@functools.lru_cache(maxsize=2)
def load(model_dir: str):
    from mlx_lm import load as mlx_load

    return mlx_load(model_dir)


def greedy(model_dir: str, prompt_ids: list[int], max_tokens: int):
    """mlx-lm's greedy continuation of exactly max_tokens tokens (EOS suppressed, as vLLM's
    min_tokens does), and the top-1 minus top-2 logit gap at each step."""
    model, tokenizer = load(model_dir)
    eos = sorted(tokenizer.eos_token_ids)
    # The reference runs on MLX's CPU backend wherever the tests run. On MLX CUDA 0.32.4,
    # mlx-lm's float32 prefill of a group-128 checkpoint fails to launch (the quantized GEMM asks
    # for 64 KiB of shared memory past 32 rows: vllm_metal/ops/quantized.py works around it,
    # mlx-lm does not); MLX's CPU and GPU results for these files agree within 1.4e-5 (the
    # device kit's qmodel probe). generate_step's `stream` defaults to a stream its module made
    # at import on the default device (a default argument: rebinding the module's
    # generation_stream does not reach it), so the CPU stream is passed explicitly.
    return _greedy(model, prompt_ids, max_tokens, eos, _cpu_stream())


@functools.lru_cache(maxsize=1)
def _cpu_stream():
    import mlx.core as mx

    return mx.new_stream(mx.cpu)


def _greedy(model, prompt_ids, max_tokens, eos, stream):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    def suppress_eos(tokens, logits):  # vLLM's min_tokens does the same
        logits[..., eos] = -float("inf")
        return logits

    tokens, gaps = [], []
    for token, logprobs in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens,
                                         logits_processors=[suppress_eos], stream=stream):
        top2 = mx.topk(logprobs, 2).tolist()
        tokens.append(int(token))
        gaps.append(abs(top2[0] - top2[1]))
    return tokens, gaps


def compare(got: list[int], expected: list[int], gaps: list[float]) -> str | None:
    """None if `got` is mlx-lm's continuation up to the first near-tie divergence (after one,
    the two contexts differ and nothing further is comparable); else what differs."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            if gaps[i] < NEAR_TIE:
                return None
            return (f"token {i}: {a} != mlx-lm's {b} (mlx-lm's top-2 gap {gaps[i]:.3g}); "
                    f"got {got}, expected {expected}")
    if len(got) != len(expected):
        return f"{len(got)} tokens, mlx-lm {len(expected)}"
    return None


def near_ties(got: list[int], expected: list[int], gaps: list[float]) -> int:
    """1 if the sequences part at a near-tie, else 0 (for reporting how often it happens)."""
    return int(any(a != b for a, b in zip(got, expected)))
