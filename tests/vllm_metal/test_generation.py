"""vLLM's own model code on device "mlx": greedy output is token-identical to transformers.

Every tiny architecture, eight prompts of different lengths in one batch, 32 greedy tokens each
(EOS suppressed on both sides: transformers' min_new_tokens, vLLM's min_tokens). This file
imports vllm only: the platform must come from the vllm.platform_plugins entry point.
"""
import gc

import pytest
import vllm
from vllm import SamplingParams

import reference
from vllm_metal.compiler import MlxCompiler
from conftest import ARCHITECTURES, PROMPTS, rerun_with_async_launch

MAX_TOKENS = 32

pytestmark = pytest.mark.usefixtures("in_process_engine")


def _layer_windows(worker):
    from vllm.model_executor.layers.attention import Attention, MLAAttention

    return sorted({(type(m.impl).__name__, m.impl.sliding_window)
                   for m in worker.model_runner.model.modules()
                   if isinstance(m, (Attention, MLAAttention))}, key=str)


# Compiled (vLLM's default: the forward captured once and lowered whole, attention included, into
# one lazy MLX graph per step) for every architecture; enforce_eager for the architectures with different
# op mixes (Gemma: GeLU, scaled embeddings, (1 + w) norms; Mistral: sliding window; Mixtral and
# Qwen2-MoE: routed experts, a shared expert with its gate; DeepSeek-V2/V3: MLA, whose eager
# path is vLLM's MLAAttention.forward_impl driving the backend, the compiled one MLXMLAImpl.attend;
# DeepSeek-V3.2: sparse MLA, its indexer's top-k (8, below most prompts' lengths) chosen by the
# vllm_metal::sparse_attn_indexer op; Mamba-1/2: state-space mixers; Qwen3-Next, OLMo-Hybrid:
# gated delta-net layers beside attention; those mixers run eagerly in both modes).
SSM = ("MambaForCausalLM", "Mamba2ForCausalLM")
GDN = ("Qwen3NextForCausalLM", "OlmoHybridForCausalLM")
CASES = [(arch, False) for arch in ARCHITECTURES] + [
    (arch, True) for arch in ("LlamaForCausalLM", "GemmaForCausalLM", "MistralForCausalLM",
                              "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Gemma2ForCausalLM",
                              "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
                              "DeepseekV32ForCausalLM") + SSM + GDN]
MLA = {"DeepseekV2ForCausalLM": "MLXMLAImpl", "DeepseekV3ForCausalLM": "MLXMLAImpl",
       "DeepseekV32ForCausalLM": "MLXSparseMLAImpl"}
# Compiled pieces of a state-space, gated delta-net or sparse-MLA model: its mixers (or the
# sparse indexers, one per layer, whose top-k the next piece's attention reads) have no MLX
# lowering and split the graph (the platform's splitting ops), so the forward is one piece more
# than it has of them (two linear-attention layers each in the GDN hybrids).
PIECES = {"MambaForCausalLM": 3, "Mamba2ForCausalLM": 3, "Qwen3NextForCausalLM": 3,
          "OlmoHybridForCausalLM": 3, "DeepseekV32ForCausalLM": 3}


def _olmo_conv_loader_reads_the_shard(monkeypatch):
    """vLLM 0.32's OLMo-Hybrid conv1d loader takes the q/k/v part as an argument that vLLM's
    AutoWeightsLoader never passes (its weights mapper puts it on the tensor, ``shard_id``), so
    no OLMo-Hybrid checkpoint loads, on any platform (docs/registry_sweep.md). Here the loader
    reads the part from the tensor, so that the gated delta-net kernels are checked end to
    end."""
    from vllm.model_executor.layers.mamba.gdn import olmo_gdn_linear_attn as olmo

    make = olmo._make_fused_conv1d_weight_loader

    def reading_the_shard(dims, tp_size, tp_rank):
        load = make(dims, tp_size, tp_rank)
        return lambda param, weight, shard=None: load(
            param, weight, getattr(weight, "shard_id", None) if shard is None else shard)

    monkeypatch.setattr(olmo, "_make_fused_conv1d_weight_loader", reading_the_shard)


@pytest.mark.parametrize("arch,enforce_eager", CASES,
                         ids=[f"{a}-{'eager' if e else 'compiled'}" for a, e in CASES])
def test_greedy_matches_transformers(arch, enforce_eager, model_dir, monkeypatch):
    path = model_dir(arch)
    if arch == "OlmoHybridForCausalLM":
        _olmo_conv_loader_reads_the_shard(monkeypatch)
    pieces_before = MlxCompiler.pieces_compiled  # the engine runs in this process
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                   enforce_eager=enforce_eager)
    pieces = MlxCompiler.pieces_compiled - pieces_before
    # compiled: the whole forward is one graph handed to the MLX compiler
    assert pieces == (0 if enforce_eager else PIECES.get(arch, 1))
    from vllm.platforms import current_platform

    assert type(current_platform).__name__ == "MetalPlatform"
    assert current_platform.device_type == "mlx"
    windows = llm.collective_rpc(_layer_windows)[0]
    expected_windows = {"MistralForCausalLM": [40],
                        "Gemma2ForCausalLM": [40, None],
                        "GptOssForCausalLM": [40, None]}.get(arch, [None])  # sliding, global
    if arch in SSM:
        expected_windows = []  # no attention layer
    impl = MLA.get(arch, "MLXAttentionImpl")
    assert windows == sorted(((impl, w) for w in expected_windows), key=str)

    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        prompt_ids = reference.tokenize(path, prompt)
        assert list(output.prompt_token_ids) == prompt_ids
        expected, _ = reference.greedy(path, prompt_ids, MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == expected, (
            f"{arch}: prompt of {len(prompt_ids)} tokens")
    del llm
    gc.collect()


@pytest.mark.parametrize("mode", [1, 2], ids=["STOCK_TORCH_COMPILE", "DYNAMO_TRACE_ONCE"])
def test_other_compilation_modes(mode, model_dir):
    # STOCK_TORCH_COMPILE: torch.compile(backend="mlx") over the whole forward (attention split
    # out by the partitioner); DYNAMO_TRACE_ONCE runs as VLLM_COMPILE (see MetalPlatform).
    path = model_dir("LlamaForCausalLM")
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                   compilation_config={"mode": mode})
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)
    outputs = llm.generate(PROMPTS[:3], params)
    for prompt, output in zip(PROMPTS, outputs):
        expected, _ = reference.greedy(path, reference.tokenize(path, prompt), MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == expected
    del llm
    gc.collect()


def test_reference_honours_the_sliding_window(model_dir):
    # The Mistral comparison above only proves sliding-window attention if transformers'
    # reference itself depends on the window: without it, a long prompt continues differently.
    import transformers

    path = model_dir("MistralForCausalLM")
    prompt_ids = reference.tokenize(path, PROMPTS[-1])
    assert len(prompt_ids) > 2 * 40
    windowed, _ = reference.greedy(path, prompt_ids, MAX_TOKENS)
    config = transformers.AutoConfig.from_pretrained(path)
    config.sliding_window = None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config).eval()
    ids = reference.torch.tensor([prompt_ids])
    full = model.generate(ids, attention_mask=reference.torch.ones_like(ids), do_sample=False,
                          max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
    assert full[0, len(prompt_ids):].tolist() != windowed


def test_async_launch_engine_does_not_hang():
    # TORCH_MLX_ASYNC=1 (csrc/launch.h): the MLX stream thread, finishing a task, dropped the last
    # reference to a torch storage, whose Python object needs the GIL, while the engine's thread
    # waited for that task holding the GIL: DeepSeek-V2 eager never returned. The case, in a
    # child with the switch on (it is read once per process).
    done = rerun_with_async_launch(
        __file__, "test_greedy_matches_transformers and DeepseekV2ForCausalLM-eager", 600)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:]
