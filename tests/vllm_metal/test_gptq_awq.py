"""GPTQ and AWQ checkpoints on "mlx": repacked at load into MLX's affine layout.

The checkpoints are written here in each format's exact layout from the tiny Llama (every linear
layer of the decoder quantized group-wise), with a float32 twin holding the same dequantized
weights. The repacked model must compute that float model: greedy output equals transformers' on
the twin, up to a near-tie. Requires the vllm.general_plugins entry point (an installed package).
"""
import gc
import json
import os
import shutil

import pytest
import torch
import vllm
from safetensors.torch import load_file, save_file
from vllm import SamplingParams

import reference
from conftest import PROMPTS

MAX_TOKENS = 24
NEAR_TIE = 1e-3
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

pytestmark = pytest.mark.usefixtures("in_process_engine")


@pytest.fixture(autouse=True, scope="module")
def general_plugin_installed():
    import importlib.metadata as metadata

    names = {e.name for e in metadata.entry_points(group="vllm.general_plugins")}
    assert "metal_quantization" in names, (
        "the vllm.general_plugins entry point of setup.py is not installed: rerun "
        "tools/bootstrap.sh (pip install -e .)")


def quantize(w: torch.Tensor, bits: int, group: int, sym: bool, order: torch.Tensor,
             min_zero: int = 0):
    """Group-wise quantization of w [N, K] over the input features taken in `order` (act-order):
    q [N, K] ints, scales (float16) and zeros [N, K / group], and each feature's group.
    (GPTQ's v1 format stores zero - 1, so its zeros start at 1.)"""
    n, k = w.shape
    maxq = 2**bits - 1
    grouped = w[:, order].view(n, k // group, group)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        scale = (2 * hi / maxq).to(torch.float16)
        zero = torch.full_like(hi, 2 ** (bits - 1), dtype=torch.int64)
    else:
        scale = ((hi - lo) / maxq).to(torch.float16)
        zero = torch.round(-lo / scale.float()).clamp(min_zero, maxq).to(torch.int64)
    q = torch.round(grouped / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)
    q = q.clamp(0, maxq).to(torch.int64).view(n, k)
    unordered = torch.empty_like(q)
    unordered[:, order] = q
    group_of = torch.empty(k, dtype=torch.int64)
    group_of[order] = torch.arange(k) // group
    return unordered, scale, zero, group_of


def pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """int32 words of `32 / bits` values along dim, little-end first (in AWQ's order if given)."""
    per_word = 32 // bits
    v = values.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per_word)
    if order is not None:
        v = v[..., list(order)]
    words = (v << (torch.arange(per_word) * bits)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def write_checkpoint(src: str, out: str, fmt: str, bits: int, group: int, sym: bool,
                     desc_act: bool) -> tuple[str, str]:
    """The quantized checkpoint and its float twin (same dequantized weights)."""
    twin = out + "-dequantized"
    for d in (out, twin):
        shutil.copytree(src, d)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, dense = {}, {}
    orders = {}
    for name, w in sorted(tensors.items()):
        module = name[:-len(".weight")]
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR):
            quantized[name] = dense[name] = w
            continue
        n, k = w.shape
        # act-order sorts a layer's input features by its inputs' statistics, so layers that
        # read the same input (q/k/v, gate/up) share the order
        source = module.replace("k_proj", "q_proj").replace("v_proj", "q_proj") \
            .replace("up_proj", "gate_proj")
        gen = torch.Generator().manual_seed(len(orders))
        order = orders.setdefault(source, torch.randperm(k, generator=gen)) if desc_act \
            else torch.arange(k)
        q, scale, zero, group_of = quantize(w, bits, group, sym, order,
                                            min_zero=1 if fmt == "gptq" else 0)
        dense[name] = (scale.float()[:, group_of] * (q - zero[:, group_of])).float()
        if fmt == "gptq":
            quantized[f"{module}.qweight"] = pack(q.t(), bits, dim=0)
            quantized[f"{module}.qzeros"] = pack(zero.t() - 1, bits, dim=1)  # v1: zero - 1
            quantized[f"{module}.g_idx"] = group_of.to(torch.int32)
        else:
            quantized[f"{module}.qweight"] = pack(q.t(), bits, dim=1, order=AWQ_ORDER)
            quantized[f"{module}.qzeros"] = pack(zero.t(), bits, dim=1, order=AWQ_ORDER)
        quantized[f"{module}.scales"] = scale.t().contiguous()
    save_file(quantized, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, os.path.join(twin, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(out, "config.json")))
    if fmt == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits,
                                         "group_size": group, "desc_act": desc_act, "sym": sym,
                                         "checkpoint_format": "gptq"}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group,
                                         "zero_point": True, "version": "gemm"}
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    return out, twin


def _methods(worker):
    return sorted({type(m.quant_method).__name__ for m in worker.model_runner.model.modules()
                   if hasattr(m, "quant_method")})


CASES = [("gptq", 4, 64, True, False), ("gptq", 4, 32, False, True), ("gptq", 8, 64, False, False),
         ("gptq", 2, 64, False, False), ("awq", 4, 64, False, False)]


@pytest.mark.parametrize("fmt,bits,group,sym,desc_act", CASES, ids=[
    f"{f}-{b}bit-g{g}{'-sym' if s else ''}{'-act_order' if a else ''}"
    for f, b, g, s, a in CASES])
def test_greedy_matches_the_dequantized_model(fmt, bits, group, sym, desc_act, model_dir,
                                               tmp_path):
    path, twin = write_checkpoint(model_dir("LlamaForCausalLM"), str(tmp_path / fmt), fmt, bits,
                                  group, sym, desc_act)
    # the reference runs the float32 twin: "auto" would downcast to bfloat16 on a GPU
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0)
    assert llm.llm_engine.vllm_config.model_config.quantization == f"mlx_{fmt}"
    assert "RepackedLinearMethod" in llm.collective_rpc(_methods)[0]
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)
    tokenizer, _ = reference.load(twin)
    eos = tokenizer.eos_token_id
    for output in llm.generate(PROMPTS, params):
        got = list(output.outputs[0].token_ids)
        expected, logits = reference.greedy(twin, list(output.prompt_token_ids), MAX_TOKENS)
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                step = logits[i].clone()
                step[eos] = -float("inf")
                top2 = step.topk(2).values
                assert top2[0] - top2[1] < NEAR_TIE, (i, got, expected)
                break
    del llm
    gc.collect()


def test_unmappable_gptq_fails_at_start(model_dir, tmp_path):
    path, _ = write_checkpoint(model_dir("LlamaForCausalLM"), str(tmp_path / "gptq"), "gptq", 4,
                               64, False, False)
    config = json.load(open(os.path.join(path, "config.json")))
    config["quantization_config"]["bits"] = 3
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(Exception, match="gptq with bits=3 does not map"):
        vllm.LLM(model=path, max_model_len=256)
