"""Plugin registration, environment variables, platform configuration and bad configurations."""
import gc
import os

import pytest
import torch
import vllm

import vllm_metal
from vllm_metal import envs

pytestmark = pytest.mark.usefixtures("in_process_engine")


def test_register_names_the_platform_when_mlx_imports():
    assert vllm_metal.register() == "vllm_metal.platform.MetalPlatform"


def test_register_stays_out_when_switched_off(monkeypatch):
    monkeypatch.setenv("VLLM_METAL_USE_MLX", "0")
    assert vllm_metal.register() is None


def test_vllm_uses_its_v1_runner_and_no_triton_on_mlx(monkeypatch):
    # On a CUDA host Triton imports, and vLLM would pick its V2 model runner and Triton kernels
    # (top-k/top-p sampling) that cannot take "mlx" tensors; on a Mac neither is picked.
    import sys
    import types

    from vllm_metal.kernel_overrides import triton_off

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    vllm_metal.register()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # the user's explicit choice stays
    vllm_metal.register()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"

    reader = types.ModuleType("vllm.some_triton_reader")
    reader.HAS_TRITON = True
    outsider = types.ModuleType("not_vllm_triton_reader")
    outsider.HAS_TRITON = True
    monkeypatch.setitem(sys.modules, reader.__name__, reader)
    monkeypatch.setitem(sys.modules, outsider.__name__, outsider)
    triton_off()
    assert reader.HAS_TRITON is False and outsider.HAS_TRITON is True


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.platform_plugins") if e.name == "metal"]
    assert plugin.value == "vllm_metal:register"


def test_defaults(monkeypatch):
    for name in envs.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert envs.use_mlx() is True
    assert envs.memory_fraction() is None  # auto
    assert envs.block_size() == 16
    assert envs.mlx_device() is None
    assert envs.debug() is False
    envs.validate()


@pytest.mark.parametrize("name,value,parse,expected", [
    ("VLLM_METAL_MEMORY_FRACTION", "0.25", envs.memory_fraction, 0.25),
    ("VLLM_METAL_MEMORY_FRACTION", "1", envs.memory_fraction, 1.0),
    ("VLLM_METAL_MEMORY_FRACTION", "AUTO", envs.memory_fraction, None),
    ("VLLM_METAL_BLOCK_SIZE", "32", envs.block_size, 32),
    ("VLLM_MLX_DEVICE", "cpu", envs.mlx_device, "cpu"),
    ("VLLM_METAL_DEBUG", "1", envs.debug, True),
])
def test_valid_values(monkeypatch, name, value, parse, expected):
    monkeypatch.setenv(name, value)
    assert parse() == expected


@pytest.mark.parametrize("name,value", [
    ("VLLM_METAL_MEMORY_FRACTION", "1.5"), ("VLLM_METAL_MEMORY_FRACTION", "abc"),
    ("VLLM_METAL_MEMORY_FRACTION", "0"), ("VLLM_METAL_MEMORY_FRACTION", "nan"),
    ("VLLM_METAL_BLOCK_SIZE", "0"), ("VLLM_METAL_BLOCK_SIZE", "sixteen"),
    ("VLLM_MLX_DEVICE", "tpu"), ("VLLM_METAL_USE_MLX", "maybe"), ("VLLM_METAL_DEBUG", "2"),
])
def test_invalid_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be .*{value!r}"):
        envs.validate()


@pytest.mark.parametrize("value", ["1.5", "abc"])
def test_llm_refuses_a_bad_memory_fraction_at_start(monkeypatch, model_dir, value):
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", value)
    with pytest.raises(ValueError, match="VLLM_METAL_MEMORY_FRACTION must be 'auto' or a "
                                         r"number in \(0, 1\]"):
        vllm.LLM(model=model_dir("LlamaForCausalLM"), dtype="float32", max_model_len=512)


def test_too_small_kv_budget_gives_vllms_error(model_dir):
    # 64 KiB of cache holds 64 tokens of the tiny Llama (1 KiB per token): not one request of
    # max_model_len 512. vLLM's own check must explain that, not a crash.
    with pytest.raises(ValueError, match=r"max seq len \(512\).*larger than the available KV "
                                         "cache memory"):
        vllm.LLM(model=model_dir("LlamaForCausalLM"), dtype="float32", max_model_len=512,
                 kv_cache_memory_bytes=64 * 1024)
    gc.collect()


def test_auto_budget_holds_max_num_seqs_full_requests(model_dir):
    # "auto" sizes the cache for max_num_seqs requests of max_model_len tokens; vLLM's pool
    # also keeps one block back for good (its null block), which the budget must include: with
    # max_num_seqs=1 a budget without it started at all only with max_model_len one block
    # shorter (240 of 256)
    llm = vllm.LLM(model=model_dir("LlamaForCausalLM"), dtype="float32", max_model_len=256,
                   max_num_seqs=1, seed=0)
    assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == 256 // 16 + 1
    out = llm.generate([{"prompt_token_ids": list(range(10, 250))}],
                       vllm.SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6))
    assert len(out[0].outputs[0].token_ids) == 6
    del llm
    gc.collect()


def test_memory_fraction_too_small_names_the_variable_and_the_size(monkeypatch, model_dir):
    # A fraction of memory below what the weights and activations already use leaves no KV
    # budget at all: start-up stops with the variable to raise and the bytes one request needs.
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.0000001")
    with pytest.raises(ValueError, match=r"one request of max_model_len=512 tokens needs \d+ "
                                         r"bytes.*Set VLLM_METAL_MEMORY_FRACTION to at least"):
        vllm.LLM(model=model_dir("LlamaForCausalLM"), dtype="float32", max_model_len=512)
    gc.collect()


def test_budget_that_holds_no_full_request_is_refused():
    from vllm_metal.memory import check_fits_one_request

    check_fits_one_request(4096, "x", per_request=4096, peak_in_use=10, total=10**6,
                           max_model_len=64)  # exactly one request fits
    with pytest.raises(ValueError, match=r"needs 4096 bytes.*at least 0\.004106"):
        check_fits_one_request(4095, "VLLM_METAL_MEMORY_FRACTION=0.004", per_request=4096,
                               peak_in_use=10, total=10**6, max_model_len=64)


def test_block_size_comes_from_the_environment(monkeypatch, model_dir):
    monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "32")
    llm = vllm.LLM(model=model_dir("LlamaForCausalLM"), dtype="float32", max_model_len=512,
                   max_num_seqs=4)
    config = llm.llm_engine.vllm_config
    assert config.cache_config.block_size == 32
    assert config.parallel_config.worker_cls == "vllm_metal.worker.MetalWorker"
    assert config.compilation_config.cudagraph_mode.name == "NONE"
    # vLLM's on-disk compiled forwards are keyed by the config: the plugin's code is part of it
    from vllm_metal.compiler import source_hash
    assert config.additional_config["vllm_metal_source"] == source_hash()
    assert llm.collective_rpc(lambda worker: worker.model_runner.kv_caches[0].shape[2])[0] == 32
    del llm
    gc.collect()


def test_compile_cache_key_follows_the_code(tmp_path):
    from vllm_metal.compiler import tree_digest

    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    module = tmp_path / "pkg" / "ops.py"
    module.write_text("x = 1\n")
    first = tree_digest([str(tmp_path / "pkg")], "mlx 1")
    (tmp_path / "pkg" / "__pycache__" / "ops.cpython-311.pyc").write_bytes(b"bytecode")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert tree_digest([str(tmp_path / "pkg")], "mlx 1") == first
    module.write_text("x = 2\n")
    assert tree_digest([str(tmp_path / "pkg")], "mlx 1") != first
    module.write_text("x = 1\n")
    assert tree_digest([str(tmp_path / "pkg")], "mlx 2") != first


def test_auto_dtype_of_a_float32_checkpoint_follows_the_mlx_device(model_dir):
    # vLLM downcasts a float32 checkpoint to the platform's first dtype: bfloat16 on MLX's GPU; on
    # MLX's CPU backend float32, the one its BLAS multiplies (half types run a single-threaded
    # loop there).
    import mlx.core as mx
    from vllm.platforms import current_platform

    expected = torch.bfloat16 if mx.is_available(mx.gpu) else torch.float32
    assert current_platform.supported_dtypes[0] == expected
    llm = vllm.LLM(model=model_dir("LlamaForCausalLM"), max_model_len=256, max_num_seqs=2,
                   enforce_eager=True)
    assert llm.llm_engine.vllm_config.model_config.dtype == expected
    del llm
    gc.collect()
