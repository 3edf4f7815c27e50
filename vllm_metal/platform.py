"""MetalPlatform: vLLM's view of device "mlx" (torch_mlx's PrivateUse1 backend)."""
import dataclasses
import logging
import multiprocessing
import os

import torch
from vllm.logger import init_logger
from vllm.platforms.interface import Platform, PlatformEnum

from . import envs

logger = init_logger(__name__)


ATTENTION_BACKEND = "vllm_metal.attention.backend.MLXAttentionBackend"
MLA_BACKEND = "vllm_metal.attention.mla.MLXMLABackend"
SPARSE_MLA_BACKEND = "vllm_metal.attention.sparse_mla.MLXSparseMLABackend"
WORKER = "vllm_metal.worker.MetalWorker"
# vLLM attention ops with an MLX lowering (ops/attention.py): they stay inside compiled graphs
LOWERED_ATTENTION_OPS = ("vllm::unified_attention_with_output",
                         "vllm::unified_mla_attention_with_output")
# ops that run eagerly between compiled pieces besides vLLM's own (_attention_ops): the sparse
# indexer, whose top-k buffer the next piece's MLA attention reads (ops/sparse_indexer.py)
EAGER_SPLITTING_OPS = ("vllm_metal::sparse_attn_indexer",)
# SchedulerConfig attribute holding async_scheduling as the user gave it (record_async_request)
ASYNC_REQUESTED = "_vllm_metal_async_requested"


def record_async_request() -> None:
    """Keep the user's async_scheduling on each SchedulerConfig as it is built. vLLM resolves an
    unset value (None) to its default before the platform's hook sees the config, so the hook
    could not otherwise tell a request from the default. (Installed from
    pre_register_and_update, which vLLM calls before it builds the scheduler config: when the
    plugin is registered, vllm.config may be half imported.)"""
    from vllm.config import SchedulerConfig

    post_init = SchedulerConfig.__post_init__
    if getattr(post_init, "_vllm_metal", False):
        return

    def __post_init__(self, *args, **kwargs):
        object.__setattr__(self, ASYNC_REQUESTED, self.async_scheduling)
        post_init(self, *args, **kwargs)

    __post_init__._vllm_metal = True
    SchedulerConfig.__post_init__ = __post_init__


class MetalPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "mlx"
    device_type: str = "mlx"
    dispatch_key: str = "PrivateUse1"
    dist_backend: str = "gloo"  # one device per process; groups of size 1 need only gloo
    # torch.compile of vLLM's small helper functions (no inductor for "mlx")
    simple_compile_backend: str = "eager"
    # Quantized checkpoints that run here (vllm_metal/quantization): vLLM checks every method it
    # detects or is given against this list at start-up, through verify_quantization.
    supported_quantization: list[str] = ["mlx", "mlx_gptq", "mlx_awq"]

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        # vLLM's "auto" dtype downcasts a float32 checkpoint to the first entry. On Metal that is
        # bfloat16; MLX's CPU backend multiplies float32 through BLAS but half types in a
        # single-threaded loop (10x and more slower), so there float32 comes first.
        if _mlx_runs_on_cpu():
            return [torch.float32, torch.bfloat16, torch.float16]
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        import mlx.core as mx

        return f"mlx ({mx.default_device()}, {mx.device_info().get('device_name', 'unknown')})"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        from .memory import device_total_memory

        return device_total_memory()

    @classmethod
    def get_current_memory_usage(cls, device=None) -> float:
        import mlx.core as mx

        return float(mx.get_active_memory())

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        torch.mlx.set_device(device)

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        torch.mlx.manual_seed_all(seed)

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False  # unified memory: there is nothing to pin

    @classmethod
    def check_if_supports_dtype(cls, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{dtype} is not supported on mlx; use float32, float16 or bfloat16")

    @classmethod
    def verify_quantization(cls, quant: str) -> None:
        if quant not in cls.supported_quantization:
            raise ValueError(
                f"quantization method {quant!r} (the checkpoint's format, or the quantization "
                f"argument) is not supported on mlx: its kernels are CUDA/ROCm ones. Supported: "
                f"{', '.join(sorted(set(cls.supported_quantization)))} ('mlx' is what "
                f"mlx_lm.convert -q writes; GPTQ and AWQ checkpoints whose layout maps onto it "
                f"run as mlx_gptq / mlx_awq)")

    @classmethod
    def get_compile_backend(cls) -> str:
        # vLLM's compilation (CompilationMode.VLLM_COMPILE) hands the model forward (or, with
        # splitting ops, each piece between them) to this compiler: one lazy MLX graph.
        return "vllm_metal.compiler.MlxCompiler"

    @classmethod
    def opaque_attention_op(cls) -> bool:
        # Attention (and its KV-cache write) is one opaque torch op in a compiled graph; its MLX
        # lowering (ops/attention.py) runs inside the step's graph on the step's metadata.
        return True

    @classmethod
    def import_kernels(cls) -> None:
        pass  # vllm._C holds CUDA/CPU kernels; none of them runs on "mlx"

    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        from . import kernel_overrides

        kernel_overrides.register()

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if attn_selector_config.use_sparse:
            if not attn_selector_config.use_mla:
                raise NotImplementedError("sparse attention without MLA is not supported on mlx")
            return SPARSE_MLA_BACKEND  # DeepSeek-V3.2's indexer + top-k MLA
        if attn_selector_config.use_mla:
            # MLA layers resolve their backend by this path, not through the registry's
            # CUSTOM slot (which stays bound to the MLX attention backend)
            return MLA_BACKEND
        if selected_backend is not None and selected_backend.name != "CUSTOM":
            logger.info("Attention backend %s is not available on mlx; using MLX attention",
                        selected_backend.name)
        # vLLM names a layer's backend by enum member; CUSTOM is the member for out-of-tree
        # backends, bound here to the MLX one.
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CUSTOM, ATTENTION_BACKEND)
        return ATTENTION_BACKEND

    @classmethod
    def get_mla_prefill_backend_cls(cls, mla_selector_config):
        from .attention.mla import MLXMLAPrefillBackend

        return MLXMLAPrefillBackend

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        from vllm.config import CompilationMode, CUDAGraphMode

        envs.validate()
        if envs.debug():
            logging.getLogger("vllm_metal").setLevel(logging.DEBUG)
        from . import ops  # noqa: F401  (registers the MLX custom-op overrides)
        from .kernel_overrides import triton_off
        from .quantization import enable_for_checkpoint

        triton_off()  # in this (the front-end) process; the worker does the same at its start

        enable_for_checkpoint(vllm_config)
        if isinstance(vllm_config.additional_config, dict):
            # part of VllmConfig.compute_hash, which keys vLLM's on-disk AOT-compiled forwards
            from .compiler import source_hash

            vllm_config.additional_config.setdefault("vllm_metal_source", source_hash())

        parallel = vllm_config.parallel_config
        if parallel.world_size > 1:
            raise NotImplementedError("mlx has one device: tensor/pipeline parallelism is "
                                      f"not supported (world size {parallel.world_size})")
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER
        parallel.disable_custom_all_reduce = True

        cache = vllm_config.cache_config
        if not cache.user_specified_block_size:
            cache.block_size = envs.block_size()
        if cache.mamba_cache_mode != "none":
            # Prefix caching of Mamba state ("align": a state per block, prefill checkpoints)
            # is not implemented by ops/mamba.py; without it a request's state is one block.
            logger.warning("prefix caching of Mamba state (mamba_cache_mode=%r) is not "
                           "supported on mlx; prefix caching is turned off for this model",
                           cache.mamba_cache_mode)
            cache.enable_prefix_caching = False
            cache.mamba_cache_mode = "none"
            cache.mamba_block_size = vllm_config.model_config.max_model_len

        compilation = vllm_config.compilation_config
        if compilation.mode == CompilationMode.DYNAMO_TRACE_ONCE:
            # vLLM saves that mode's graph as an AOT artifact, which only inductor's output
            # supports; VLLM_COMPILE also traces once and runs the same MLX functions.
            logger.warning("compilation mode DYNAMO_TRACE_ONCE runs as VLLM_COMPILE on mlx")
            compilation.mode = CompilationMode.VLLM_COMPILE
        if compilation.mode == CompilationMode.VLLM_COMPILE and compilation.backend == "inductor":
            logger.warning("inductor cannot compile for mlx; using the MLX compiler")
            compilation.backend = cls.get_compile_backend()
        if compilation.mode == CompilationMode.VLLM_COMPILE and compilation.splitting_ops is None:
            # The whole forward is one graph: vLLM's attention op is an MLX call inside it
            # (ops/attention.py), so a step is one lazy MLX graph, evaluated once. Splitting ops
            # the user names still split it, into pieces with eager attention between them.
            # The state-space mixers (Mamba, short conv, linear attention) have no lowering:
            # they run eagerly between compiled pieces, as on vLLM's other platforms.
            compilation.splitting_ops = [op for op in compilation._attention_ops
                                         if op not in LOWERED_ATTENTION_OPS]
            compilation.splitting_ops += EAGER_SPLITTING_OPS
        elif compilation.mode == CompilationMode.STOCK_TORCH_COMPILE \
                and compilation.backend in ("", "inductor", cls.get_compile_backend()):
            # torch.compile of the whole model with a dynamo backend: torch_mlx's "mlx"
            import torch_mlx.compile  # noqa: F401  (registers the backend with dynamo)

            compilation.backend = "mlx"
        # vLLM's graph passes fuse CUDA/ROCm custom kernels (quantisation, all-reduce, AITER);
        # none of those kernels exists on mlx, and MLX fuses elementwise work itself.
        passes = compilation.pass_config
        for field in dataclasses.fields(passes):
            if field.name.startswith("fuse_") or field.name.endswith("_fusion"):
                setattr(passes, field.name, False)
        if "VLLM_USE_MEGA_AOT_ARTIFACT" not in os.environ:
            # vLLM's AOT compile cache (on by default) saves the dynamo-traced forward, so a later
            # start with the same model and settings skips dynamo. Its default "mega artifact"
            # form stores inductor's compiled code, which MlxCompiler does not make: saving it
            # fails, after seconds of pickling, at every start. The plain form stores the traced
            # graph and hands it to MlxCompiler when loaded, which is what mlx needs. (Set in the
            # environment so the engine process, spawned later, reads the same.)
            os.environ["VLLM_USE_MEGA_AOT_ARTIFACT"] = "0"
        if compilation.compile_sizes is None:
            # no sizes compiled ahead: one MLX function per piece serves every batch size (MLX
            # retraces a piece for a new shape in milliseconds)
            compilation.compile_sizes = []
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        compilation.cudagraph_capture_sizes = []
        # Async scheduling (model_runner.py: AsyncMLXModelRunnerOutput, synchronize_input_prep)
        # runs when asked for (async_scheduling=True, --async-scheduling). Off unless asked: vLLM
        # would turn it on by default, but its gain on a GPU (the engine's host work between
        # steps overlapping the device, with TORCH_MLX_ASYNC=1) has not been measured yet, and
        # on MLX's CPU backend, whose device work takes the same cores, it gains nothing.
        scheduler = vllm_config.scheduler_config
        if getattr(scheduler, ASYNC_REQUESTED, None) is not True:
            scheduler.async_scheduling = False

        cls._choose_worker_start_method()
        # SIGTERM with streams in flight: the API server's shutdown must end them (shutdown.py)
        from . import shutdown

        shutdown.install()
        # at exit, the engine client's output thread ends before the interpreter finalizes
        shutdown.join_output_threads_at_exit()

    @classmethod
    def update_block_size_for_backend(cls, vllm_config) -> None:
        # vLLM would reset an unspecified block size to its own default (16) here; the MLX
        # backend accepts any size, so VLLM_METAL_BLOCK_SIZE stands.
        cache = vllm_config.cache_config
        if not cache.user_specified_block_size:
            cache.block_size = envs.block_size()
        model_config = vllm_config.model_config
        if model_config is not None and model_config.is_hybrid:
            # attention and Mamba layers share one block pool: vLLM's alignment makes an
            # attention block at least a Mamba state's size and pads the state to it
            backends = cls._find_non_ssm_backends(vllm_config)
            if backends:
                cls._align_hybrid_block_size(vllm_config, backends[0])

    @classmethod
    def _choose_worker_start_method(cls) -> None:
        """vLLM starts its engine core (and workers) with multiprocessing, by default by fork.
        A fork copies only the calling thread, so a child forked from a process whose other
        threads hold state can block forever: after MLX's first evaluation (its stream thread)
        the child hangs at its own first evaluation, and after any parallel CPU op of torch
        (its OpenMP pool, e.g. transformers' generate) the child blocks in libgomp. Neither can
        be detected reliably, so the processes are always spawned, as on vLLM's CPU platform.
        A spawned child re-imports the user's script; one without an
        ``if __name__ == "__main__":`` guard stops with an error that says so (below)."""
        if getattr(multiprocessing.current_process(), "_inheriting", False):  # spawned child
            raise RuntimeError(
                "vLLM on mlx starts its engine in a spawned process, which imports your script "
                "again; this script builds the engine at import time. Put that code under "
                'if __name__ == "__main__": (see vLLM\'s troubleshooting guide, "Python '
                'multiprocessing")')
        if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") != "spawn":
            logger.info("vllm_metal: setting VLLM_WORKER_MULTIPROC_METHOD=spawn (a forked "
                        "engine process could hang on MLX's or OpenMP's threads)")
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        super().pre_register_and_update(parser)
        record_async_request()

    @classmethod
    def validate_environ(cls, hard_fail: bool) -> None:
        # vLLM flags VLLM_* variables it does not know; vllm_metal's are read in envs.py.
        from vllm import envs as vllm_envs

        for name in os.environ:
            if (name.startswith("VLLM_") and name not in vllm_envs.environment_variables
                    and name not in envs.VARIABLES):
                if hard_fail:
                    raise ValueError(f"Unknown vLLM environment variable detected: {name}")
                logger.warning("Unknown vLLM environment variable detected: %s", name)

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        return True

    @classmethod
    def check_runner_kv_caches_multi_layer(cls) -> None:
        pass  # the runner is vLLM's own; it binds caches per layer name


def _mlx_runs_on_cpu() -> bool:
    """Whether the worker's MLX default device is the CPU (VLLM_MLX_DEVICE, else MLX's GPU,
    Metal or CUDA, if present). Reads device facts only: no stream, thread or allocation."""
    import mlx.core as mx

    device = envs.mlx_device()
    if device is not None:
        return device == "cpu"
    return not mx.is_available(mx.gpu)
