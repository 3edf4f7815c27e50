"""MetalWorker: vLLM's GPU worker on device "mlx".

The GPU worker's device set-up, memory profiling and warm-up are CUDA-specific; this worker
replaces those three and keeps the rest (model loading, KV-cache initialisation, execution).
"""
import time
from contextlib import nullcontext

import mlx.core as mx
import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.utils.torch_utils import set_random_seed
from vllm.v1.core.kv_cache_utils import (_max_memory_usage_bytes_from_groups,
                                         _pool_bytes_per_block, get_kv_cache_groups)
from vllm.v1.worker.gpu_worker import Worker, init_worker_distributed_environment
from vllm.v1.worker.worker_base import CompilationTimes

# vllm_metal's custom-op overrides, registered in this (the engine) process at the worker's
# import, before any layer is built: check_and_update_config registers them only in the process
# that made the config, and here the first thing to import them would otherwise be the first
# layer's attention, after that layer's rotary embedding was built (and cached by get_rope)
from . import envs, ops  # noqa: F401
from .memory import check_fits_one_request, device_total_memory, kv_cache_budget
from .model_runner import MetalModelRunner

logger = init_logger(__name__)


class MetalWorker(Worker):
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method,
                 is_driver_worker=False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method,
                         is_driver_worker=is_driver_worker)
        self.parallel_config.disable_custom_all_reduce = True

    def init_device(self) -> None:
        device = envs.mlx_device()
        if device is not None:
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        self.device = torch.device("mlx:0")
        init_worker_distributed_environment(self.vllm_config, self.rank,
                                            self.distributed_init_method, self.local_rank,
                                            current_platform.dist_backend)
        set_random_seed(self.model_config.seed)
        self._init_workspace_and_model_runner()

    def _make_model_runner(self) -> MetalModelRunner:
        if self.use_v2_model_runner:
            raise NotImplementedError("vllm_metal runs vLLM's V1 model runner; unset "
                                      "VLLM_USE_V2_MODEL_RUNNER")
        return MetalModelRunner(self.vllm_config, self.device)

    def _maybe_get_memory_pool_context(self, tag: str):
        return nullcontext()  # no CuMem pools: MLX's allocator serves everything

    @torch.inference_mode()
    def determine_available_memory(self) -> int:
        explicit = self.cache_config.kv_cache_memory_bytes
        if explicit is not None:
            logger.info("KV cache: %d bytes, as set by kv_cache_memory_bytes", explicit)
            return explicit
        mx.synchronize()
        mx.reset_peak_memory()
        start = time.perf_counter()
        self.model_runner.profile_run()
        logger.info("vllm_metal: profiling run took %.2f s (%d tokens)",
                    time.perf_counter() - start, self.scheduler_config.max_num_batched_tokens)
        peak = mx.get_peak_memory()
        mx.clear_cache()
        # Sized as vLLM's own admission check sizes them (get_kv_cache_configs), from the
        # layers' cache groups: a hybrid model's groups share one pool whose blocks hold a
        # layer of each group at a unified page size (attention blocks grow to a Mamba state's
        # bytes), so a request needs more than the sum of its layers' own needs.
        groups = get_kv_cache_groups(self.vllm_config, self.model_runner.get_kv_cache_spec())
        # vLLM's block pool holds one block back for good (its null block): budget it too, or
        # "auto" leaves room for one block less than max_num_seqs full-length requests
        null_block = _pool_bytes_per_block(self.vllm_config, groups)
        per_request = _max_memory_usage_bytes_from_groups(self.vllm_config, groups) + null_block
        total = device_total_memory()
        budget, how = kv_cache_budget(
            total=total,
            peak_in_use=peak,
            needed_for_all_seqs=(per_request - null_block) * self.scheduler_config.max_num_seqs
            + null_block,
            gpu_memory_utilization=self.cache_config.gpu_memory_utilization,
        )
        check_fits_one_request(budget, how, per_request=per_request, peak_in_use=peak,
                               total=total, max_model_len=self.model_config.max_model_len)
        logger.info("KV cache: %d bytes (%s)", budget, how)
        return budget

    def initialize_from_config(self, kv_cache_config) -> None:
        start = time.perf_counter()
        super().initialize_from_config(kv_cache_config)
        # the tensors' backing size (vLLM's one allocation; one per layer here, same total:
        # model_runner.allocate_per_layer)
        nbytes = max((t.size for t in kv_cache_config.kv_cache_tensors), default=0)
        logger.info("vllm_metal: KV cache allocated (%d bytes, %d blocks) in %.2f s", nbytes,
                    kv_cache_config.num_blocks, time.perf_counter() - start)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        # The model was compiled (if it is) at its first forward, the profiling run in
        # determine_available_memory; there are no CUDA graphs to capture. Reset the seed so
        # profiling's random draws do not shift the first request's samples.
        set_random_seed(self.model_config.seed, self.parallel_config.data_parallel_index)
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def sleep(self, level: int = 1) -> None:
        logger.warning("sleep mode is not supported on mlx; ignored")

    def wake_up(self, tags=None) -> None:
        logger.warning("sleep mode is not supported on mlx; ignored")
