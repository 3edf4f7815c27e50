"""MLX-quantized checkpoints (``mlx_lm.convert -q``) through vLLM's own model code on "mlx".

The checkpoints are the tiny random ones of conftest, converted here with mlx_lm. Loading needs
no flag (the format is recognised from config.json); greedy output must be mlx-lm's on the same
files, up to a near-tie (mlx_reference.NEAR_TIE); the weights stay packed in memory.
"""
import gc
import json
import os
import shutil

import mlx.core as mx
import pytest
import torch
import vllm
from vllm import SamplingParams

import mlx_reference
from conftest import PROMPTS, model_maker

MAX_TOKENS = 24

pytestmark = pytest.mark.usefixtures("in_process_engine")


@pytest.fixture(scope="session")
def quantized_dir(model_dir, tmp_path_factory):
    """quantized_dir(arch, bits, group_size, recipe=None) -> an mlx_lm-quantized checkpoint."""
    made: dict[tuple, str] = {}
    base = tmp_path_factory.mktemp("mlx-quantized")

    def get(arch: str, bits: int = 4, group_size: int = 64, recipe: str | None = None,
            tied: bool = False) -> str:
        key = (arch, bits, group_size, recipe, tied)
        if key not in made:
            from mlx_lm.convert import convert

            src = model_dir(arch)
            if tied:  # a tied variant of an untied architecture
                src = model_maker.make_model(arch, str(base / f"{arch}-tied"), seed=0,
                                             tie_word_embeddings=True)
            name = f"{arch}-{bits}bit-g{group_size}{'-' + recipe if recipe else ''}"
            out = base / (name + ("-tied" if tied else ""))
            convert(src, str(out), quantize=True, q_bits=bits, q_group_size=group_size,
                    quant_predicate=recipe)
            made[key] = str(out)
        return made[key]

    return get


def _files_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _quant_summary(worker) -> dict:
    from vllm_metal.ops.moe import MLXQuantizedMoEMethod
    from vllm_metal.quantization.mlx_affine import MLXAffineLinearMethod

    methods = {}
    for name, m in worker.model_runner.model.named_modules():
        method = getattr(m, "quant_method", None)
        specs = None
        if isinstance(method, MLXAffineLinearMethod):
            specs = [[s.bits, s.group_size] for s in m.mlx_layout.specs]
        elif isinstance(method, MLXQuantizedMoEMethod):  # [gate and up, down]
            specs = [[s.bits, s.group_size] for s in method.specs.values()]
        if method is not None:
            methods[name] = (type(method).__name__, specs)
    model = worker.model_runner.model
    return {"methods": methods, "weights_bytes": _tensor_bytes(model.parameters()),
            "buffers_bytes": _tensor_bytes(model.buffers()),
            "loaded_bytes": worker.model_runner.model_memory_usage}


def _generate_and_compare(path: str, enforce_eager: bool = False, prompts=PROMPTS):
    llm = vllm.LLM(model=path, dtype=mlx_reference.checkpoint_dtype(path), max_model_len=512,
                   max_num_seqs=8, seed=0, enforce_eager=enforce_eager)
    assert llm.llm_engine.vllm_config.model_config.quantization == "mlx"
    summary = llm.collective_rpc(_quant_summary)[0]
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)
    outputs = llm.generate(prompts, params)
    ties = 0
    for output in outputs:
        got = list(output.outputs[0].token_ids)
        expected, gaps = mlx_reference.greedy(path, list(output.prompt_token_ids), MAX_TOKENS)
        problem = mlx_reference.compare(got, expected, gaps)
        assert problem is None, \
            f"{path}, prompt of {len(output.prompt_token_ids)} tokens: {problem}"
        ties += mlx_reference.near_ties(got, expected, gaps)
    assert ties <= len(prompts) // 4, f"{ties} near-tie divergences in {len(prompts)} prompts"
    del llm
    gc.collect()
    return summary


# (architecture, bits, group size, recipe, tied, enforce_eager). Not Mistral: mlx-lm runs it as
# a Llama and ignores its sliding window, so it is no reference past the window.
CASES = [
    ("LlamaForCausalLM", 4, 64, None, False, False),
    ("LlamaForCausalLM", 4, 64, None, False, True),
    ("Qwen3ForCausalLM", 8, 32, None, False, False),
    ("Qwen2ForCausalLM", 3, 64, None, False, False),  # qkv biases stay float
    ("LlamaForCausalLM", 6, 128, None, False, False),
    ("Qwen3ForCausalLM", 4, 64, None, True, False),  # the LM head is the quantized embedding
    # tied too, and vLLM's Gemma builds its embedding without a quantization config
    ("GemmaForCausalLM", 4, 64, None, False, False),
    ("Phi3ForCausalLM", 4, 32, None, False, False),  # qkv_proj / gate_up_proj fused on disk
    ("LlamaForCausalLM", 4, 64, "mixed_3_6", False, False),  # per-layer overrides
    # MoE: experts stacked per projection (switch_mlp) and multiplied packed (gather_qmm); the
    # router gates and the embedding, which vLLM's Mixtral builds unquantized, quantized too
    ("MixtralForCausalLM", 4, 64, None, False, False),
    ("MixtralForCausalLM", 4, 64, None, False, True),
    ("MixtralForCausalLM", 4, 64, "mixed_3_6", False, False),  # down 6 bits, gate/up 3
]


@pytest.mark.parametrize("arch,bits,group_size,recipe,tied,enforce_eager", CASES, ids=[
    f"{a}-{b}bit-g{g}{'-' + r if r else ''}{'-tied' if t else ''}{'-eager' if e else ''}"
    for a, b, g, r, t, e in CASES])
def test_greedy_matches_mlx_lm(arch, bits, group_size, recipe, tied, enforce_eager,
                               quantized_dir):
    path = quantized_dir(arch, bits, group_size, recipe, tied)
    summary = _generate_and_compare(path, enforce_eager)
    methods = summary["methods"]
    linear = {n: m for n, m in methods.items() if n.endswith(("_proj", "lm_head"))}
    assert linear and all(m[0] in ("MLXAffineLinearMethod", "MLXAffineEmbeddingMethod")
                          for m in linear.values()), linear
    assert methods["model.embed_tokens"][0] == "MLXAffineEmbeddingMethod"
    if arch == "MixtralForCausalLM":
        experts = [methods[f"model.layers.{i}.block_sparse_moe.experts.routed_experts"]
                   for i in (0, 1)]
        assert all(m[0] == "MLXQuantizedMoEMethod" for m in experts), experts
        assert methods["model.layers.0.block_sparse_moe.gate"][0] == "MLXAffineLinearMethod"
    if recipe is None:
        assert {tuple(s) for _, specs in methods.values() if specs for s in specs} == \
            {(bits, group_size)}
    elif arch == "MixtralForCausalLM":  # mixed_3_6: layer 1's experts' down projection 6 bits
        assert [m[1] for m in experts] == [[[3, 64], [3, 64]], [[3, 64], [6, 64]]]
    else:  # mlx_lm's mixed_3_6: layer 1's v_proj (merged into qkv_proj) and down_proj at 6 bits
        assert methods["model.layers.1.self_attn.qkv_proj"][1] == [[3, 64], [3, 64], [6, 64]]
        assert methods["model.layers.1.mlp.down_proj"][1] == [[6, 64]]
        assert methods["model.layers.0.mlp.down_proj"][1] == [[3, 64]]
    # packed in memory: the parameters are the files' size (10%), and what loading the model
    # took from MLX's allocator is that plus the model's buffers (rotary cos/sin caches)
    files = _files_size(path)
    assert abs(summary["weights_bytes"] - files) <= 0.1 * files, (summary, files)
    assert summary["loaded_bytes"] <= 1.1 * files + summary["buffers_bytes"], (summary, files)


def test_old_config_without_quantization_config(quantized_dir, tmp_path):
    # mlx_lm before 2024 wrote only "quantization"; vLLM's detection never sees it
    src = quantized_dir("LlamaForCausalLM", 4, 64)
    path = tmp_path / "old-style"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    _generate_and_compare(str(path), prompts=PROMPTS[:3])


def test_unsupported_mlx_mode_fails_at_start(quantized_dir, tmp_path):
    src = quantized_dir("LlamaForCausalLM", 4, 64)
    path = tmp_path / "mxfp4"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config[key]["mode"] = "mxfp4"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="mode 'mxfp4' is not supported on mlx"):
        vllm.LLM(model=str(path), max_model_len=256)


def test_other_quantization_formats_fail_at_start(model_dir, tmp_path):
    path = tmp_path / "fp8"
    shutil.copytree(model_dir("LlamaForCausalLM"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="'fp8'.*not supported on mlx"):
        vllm.LLM(model=str(path), max_model_len=256)


# ---- the ops on their own: against MLX's reference (dequantize, then multiply)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_matmul_op(bits, group_size):
    from vllm_metal.ops.quantized import quantized_embedding_op, quantized_matmul_op
    import torch_mlx

    mx.random.seed(bits * 1000 + group_size)
    w = mx.random.normal((96, 256))
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    dense = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    params = [torch_mlx.from_mlx(a) for a in (wq, scales, biases)]
    for m in (1, 3, 17, 80):  # 80 rows: dequantized once, then BLAS (on MLX's CPU backend)
        x = mx.random.normal((m, 256))
        got = quantized_matmul_op(torch_mlx.from_mlx(x), *params, group_size, bits)
        assert got.shape == (m, 96) and got.dtype == torch.float32
        expected = torch.from_numpy(__import__("numpy").array(x @ dense.T))
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[0, 5, 95], [7, 7, 1]]).to("mlx")
    rows = quantized_embedding_op(ids, *params, group_size, bits)
    expected = torch.from_numpy(__import__("numpy").array(dense))[ids.cpu()]
    torch.testing.assert_close(rows.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_cpu_kernels_share_rows_across_threads(bits):
    # torch_mlx's CPU kernels (csrc/quantized_cpu.cpp) over enough rows for several of the thread
    # pool's chunks, every row-block shape of the AVX-512 kernel (1..4 rows of x, odd N), half
    # precision scales and x, against MLX's own kernels
    from torch_mlx import _C

    mx.random.seed(bits)
    w = mx.random.normal((2051, 512))
    for dtype in (mx.float32, mx.bfloat16):
        wq, scales, biases = mx.quantize(w.astype(dtype), group_size=64, bits=bits)
        for m in (1, 2, 3, 4, 5, 7, 9):
            x = mx.random.normal((m, 512)).astype(dtype)
            got = _C.affine_quantized_matmul(x, wq, scales, biases, 64, bits)
            ref = mx.quantized_matmul(x.astype(mx.float32), wq, scales.astype(mx.float32),
                                      biases.astype(mx.float32), group_size=64, bits=bits)
            assert got.dtype == dtype and got.shape == (m, 2051)
            tol = 1e-3 if dtype == mx.float32 else 0.1
            assert mx.allclose(got.astype(mx.float32), ref, rtol=tol, atol=tol).item(), (dtype, m)
        dense = _C.affine_dequantize(wq, scales, biases, 64, bits)
        ref = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32),
                            group_size=64, bits=bits)
        assert dense.dtype == mx.float32
        assert mx.allclose(dense, ref, rtol=1e-6, atol=1e-6).item()


def test_cpu_kernels_read_strides_at_evaluation():
    # Inside an MLX graph (a compiled forward) the kernel's inputs are lazy: their layout is only
    # known when evaluated. A gathered, transposed or 3-D strided x and strided weight views must
    # be read by their strides then (a GPTQ act-order gather of x once gave wrong numbers).
    from torch_mlx import _C

    # the reference is MLX's own kernel on its CPU stream, which reads any strides (its GPU
    # kernels want the weights' rows contiguous)
    def reference(x, w, scales, biases):
        return mx.quantized_matmul(x, w, scales, biases, group_size=32, bits=4, stream=mx.cpu)

    w = mx.random.normal((64, 256))
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    order = mx.random.permutation(256)
    x = mx.random.normal((3, 256))

    def gathered(x):
        return _C.affine_quantized_matmul(mx.take(x, order, axis=1), wq, s, b, 32, 4)

    ref = reference(mx.take(x, order, axis=1), wq, s, b)
    for f in (gathered, mx.compile(gathered)):
        assert mx.allclose(f(x), ref, rtol=1e-4, atol=1e-4).item()
    xt = mx.random.normal((256, 3))
    ref = reference(xt.T, wq, s, b)
    got = mx.compile(lambda a: _C.affine_quantized_matmul(a.T, wq, s, b, 32, 4))(xt)
    assert mx.allclose(got, ref, rtol=1e-4, atol=1e-4).item()
    x3 = mx.random.normal((2, 5, 256)).transpose(1, 0, 2)
    ref = reference(x3, wq, s, b)
    assert mx.allclose(_C.affine_quantized_matmul(x3, wq, s, b, 32, 4), ref, rtol=1e-4,
                       atol=1e-4).item()
    ref = reference(x, wq[::2], s[::2], b[::2])
    got = _C.affine_quantized_matmul(x, wq[::2], s[::2], b[::2], 32, 4)
    assert mx.allclose(got, ref, rtol=1e-4, atol=1e-4).item()
    dense = _C.affine_dequantize(wq[::2], s[::2], b[::2], 32, 4)
    assert mx.allclose(dense, mx.dequantize(wq[::2], s[::2], b[::2], group_size=32, bits=4,
                                            stream=mx.cpu), rtol=1e-6, atol=1e-6).item()


def test_quantized_matmul_compiles():
    # the op inside torch.compile(backend="mlx"): the same lowering in the MLX graph
    import torch_mlx
    import torch_mlx.compile  # noqa: F401
    from vllm_metal.ops.quantized import quantized_matmul_op

    w = mx.random.normal((64, 128))
    params = [torch_mlx.from_mlx(a) for a in mx.quantize(w, group_size=64, bits=4)]

    def f(x):
        return torch.relu(quantized_matmul_op(x * 2, *params, 64, 4)) + 1

    x = torch.randn(5, 128).to("mlx")
    torch.testing.assert_close(torch.compile(f, backend="mlx", dynamic=True)(x).cpu(),
                               f(x).cpu())


def test_vllm_serve_quantized_directory(quantized_dir):
    # `vllm serve DIR`, engine in its own (spawned) process as a user's server runs it
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from serving import Server

    path = quantized_dir("LlamaForCausalLM", 4, 64)
    with Server(path, name="q", extra_args=("--max-model-len", "512"),
                env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) as server:
        client = server.client()
        for prompt in PROMPTS[:3]:
            r = client.completions.create(model="q", prompt=prompt, max_tokens=MAX_TOKENS,
                                          temperature=0.0, extra_body={
                                              "min_tokens": MAX_TOKENS,
                                              "return_token_ids": True})
            choice = r.choices[0]
            expected, gaps = mlx_reference.greedy(path, list(choice.prompt_token_ids),
                                                  MAX_TOKENS)
            problem = mlx_reference.compare(list(choice.token_ids), expected, gaps)
            assert problem is None, problem
        chat = client.chat.completions.create(
            model="q", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
            extra_body={"min_tokens": 8})
        assert chat.usage.completion_tokens == 8
