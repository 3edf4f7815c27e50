"""MetalModelRunner: vLLM's GPU model runner on device "mlx", as vLLM's CPU runner subclasses it.

What differs from the GPU runner, and why:
- host staging buffers and device buffers are one MLX allocation (unified_buffer.py), so the
  per-step host-to-device copies of token ids, block tables and slot mappings vanish;
- eager MLX work is launched when a torch op returns and a host read of "mlx" memory waits for
  it (torch_mlx's default on a GPU; on MLX's CPU backend, or with TORCH_MLX_ASYNC=0, it is
  complete when the op returns), so reading sampled tokens back needs no CUDA event;
- no CUDA graphs and no CUDA streams or events (the platform turns graphs off; async scheduling's
  copy stream and events are replaced, below);
- async scheduling (``async_scheduling=True``): the sampled ids stay an "mlx" tensor until the
  engine asks for them (``AsyncMLXModelRunnerOutput.get_output``), and the next step feeds them to
  the model on the device, as on CUDA. Staging buffers are not double-buffered: they are the
  device's buffers (unified_buffer.py), so before the host writes the next step's inputs into
  them it waits for the previous step's device work (``synchronize_input_prep``, where vLLM waits
  for its host-to-device copies). What overlaps the device is the engine's host work between two
  steps: reading the step before's output, the scheduler, the next step's start;
- each attention layer's KV cache is its own allocation (vLLM places all layers in one): an MLX
  op may write a buffer in place only when it holds the whole buffer (ops/cache.py's scatter
  path), and Metal caps the size of one buffer.
"""
from contextlib import contextmanager
from unittest import mock

import mlx.core as mx
import numpy as np
import torch
import vllm.v1.worker.gpu_model_runner as gpu_model_runner
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
from vllm.v1.outputs import AsyncModelRunnerOutput, LogprobsTensors, ModelRunnerOutput
from vllm.v1.sample.rejection_sampler import RejectionSampler
from vllm.v1.worker.utils import allocate_kv_cache
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from torch_mlx import _C

from .unified_buffer import UnifiedBuffer, unify_attributes

logger = init_logger(__name__)


class MetalModelRunner(GPUModelRunner):
    def __init__(self, vllm_config, device: torch.device):
        assert device.type == "mlx", device
        # vLLM's runner makes a CUDA copy stream and a CUDA event for async scheduling: "mlx" has
        # neither (see synchronize_input_prep and AsyncMLXModelRunnerOutput)
        with _no_cuda_streams():
            super().__init__(vllm_config, device)
        self.async_output_copy_stream = None
        self.prepare_inputs_event = None
        self._unify_block_tables()

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        from .ops.moe import prepare_moe_layers

        # MoE layers: their routing, and a forward that compiles into the step's graph
        prepare_moe_layers(self.compilation_config.static_forward_context)

    def _make_buffer(self, *size, dtype: torch.dtype, numpy: bool = True) -> UnifiedBuffer:
        return UnifiedBuffer(*size, dtype=dtype, device=self.device, with_numpy=numpy)

    def _unify_block_tables(self) -> None:
        # BlockTable builds plain CpuGpuBuffers with no override hook; swap them right after the
        # InputBatch that owns them is built.
        for block_table in self.input_batch.block_table.block_tables:
            unify_attributes(block_table)

    def may_reinitialize_input_batch(self, kv_cache_config) -> None:
        input_batch = self.input_batch
        super().may_reinitialize_input_batch(kv_cache_config)
        if self.input_batch is not input_batch:
            self._unify_block_tables()

    def initialize_kv_cache_tensors(self, kv_cache_config, kernel_block_sizes,
                                    kv_cache_allocation_context=None):
        # vLLM's method does the layer sharing and binding; only its allocation is replaced,
        # for the duration of the call
        with mock.patch.object(gpu_model_runner, "allocate_kv_cache", allocate_per_layer):
            return super().initialize_kv_cache_tensors(kv_cache_config, kernel_block_sizes,
                                                       kv_cache_allocation_context)

    @contextmanager
    def synchronize_input_prep(self):
        # vLLM's async path waits here for the previous step's host-to-device copies before
        # the host rewrites its staging buffers. On "mlx" the staging buffers are what the
        # previous step's launched forward (and its sampler) read, so the host waits for that
        # step's device work before writing the next step's inputs. With each result waited for
        # (TORCH_MLX_ASYNC=0, the CPU backend's default) it finished before its ops returned,
        # and this returns at once.
        if self.use_async_scheduling:
            self._wait_for_previous_step()
        yield

    def _wait_for_previous_step(self) -> None:
        torch.accelerator.synchronize()  # every launched array; waits with the GIL released

    def _get_or_create_async_output_copy_stream(self):
        return None  # no copy stream: AsyncMLXModelRunnerOutput reads the tokens where they are

    def sample_tokens(self, grammar_output):
        if not self.use_async_scheduling:
            return super().sample_tokens(grammar_output)
        # vLLM builds its AsyncGPUModelRunnerOutput inline; the MLX one stands in for it
        saved = gpu_model_runner.AsyncGPUModelRunnerOutput
        gpu_model_runner.AsyncGPUModelRunnerOutput = AsyncMLXModelRunnerOutput
        try:
            return super().sample_tokens(grammar_output)
        finally:
            gpu_model_runner.AsyncGPUModelRunnerOutput = saved

    def _sync_device(self) -> None:
        pass  # eager: every MLX computation finished before its torch op returned

    def _to_list(self, sampled_token_ids: torch.Tensor) -> list[list[int]]:
        # The GPU runner copies into pinned memory and waits on a CUDA event; here the tokens
        # are already in host-visible memory.
        return _C.cpu_alias(sampled_token_ids).tolist()

    def _zero_block_ids(self, block_ids: list[int]) -> None:
        from .ops.cache import zero_blocks

        seen: set[int] = set()
        for group in self.kv_cache_config.kv_cache_groups:
            if not isinstance(group.kv_cache_spec, FullAttentionSpec):
                continue
            for layer_name in group.layer_names:
                layer = self.compilation_config.static_forward_context.get(layer_name)
                kv_cache = getattr(layer, "kv_cache", None)
                if isinstance(kv_cache, torch.Tensor) and kv_cache.data_ptr() not in seen:
                    seen.add(kv_cache.data_ptr())
                    zero_blocks(kv_cache, block_ids)


@contextmanager
def _no_cuda_streams():
    """torch.cuda.Stream and torch.cuda.Event as inert stand-ins while vLLM's runner is built."""
    class _Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args, **kwargs):
            pass

    class _Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

    stream, event = torch.cuda.Stream, torch.cuda.Event
    torch.cuda.Stream, torch.cuda.Event = _Stream, _Event
    try:
        yield
    finally:
        torch.cuda.Stream, torch.cuda.Event = stream, event


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A CPU copy of an "mlx" tensor that waits only for the work producing it.

    torch_mlx's own host reads (``.cpu()``, ``cpu_alias``) wait for every launched array: with
    TORCH_MLX_ASYNC=1 that includes the next step, launched before this step's output is read.
    The MLX array over the tensor carries its producer's completion event; evaluating it waits
    for that alone (mx.eval releases the GIL while it waits)."""
    if t is None or t.device.type != "mlx":
        return t
    arr = _C.to_mlx(t)
    mx.eval(arr)
    return torch.from_numpy(np.array(arr, copy=True))


class _ReadyEvent:
    """Stands in for vLLM's copy-ready CUDA event: synchronize() waits for the sampled ids."""

    def __init__(self, output: "AsyncMLXModelRunnerOutput"):
        self._output = output

    def synchronize(self) -> None:
        self._output._host_ids()


class _HostIds:
    """The sampled ids as vLLM's input batch reads them (``tolist``), read on first use."""

    def __init__(self, output: "AsyncMLXModelRunnerOutput"):
        self._output = output
        self.shape = output._sampled_token_ids.shape

    def tolist(self) -> list:
        return self._output._host_ids().tolist()


class AsyncMLXModelRunnerOutput(AsyncModelRunnerOutput):
    """vLLM's AsyncGPUModelRunnerOutput for "mlx": the step's sampled ids (and logprobs) stay
    "mlx" tensors, launched but maybe not finished, until get_output reads them to the host.
    Same constructor as vLLM's; the copy stream is unused (there is no copy to start)."""

    def __init__(self, model_runner_output: ModelRunnerOutput, sampled_token_ids: torch.Tensor,
                 logprobs_tensors: LogprobsTensors | None, invalid_req_indices: list[int],
                 async_output_copy_stream, vocab_size: int, check_ep_fault: bool = False,
                 num_nans: torch.Tensor | None = None):
        if check_ep_fault:
            raise NotImplementedError("expert-parallel fault checks do not exist on mlx")
        self._model_runner_output = model_runner_output
        self._invalid_req_indices = invalid_req_indices
        self._sampled_token_ids = sampled_token_ids
        self._logprobs_tensors = logprobs_tensors
        self._num_nans = num_nans
        self.vocab_size = vocab_size
        self._host: torch.Tensor | None = None
        # what vLLM's input batch keeps to repair output ids for penalties / logits processors
        self.sampled_token_ids_cpu = _HostIds(self)
        self.async_copy_ready_event = _ReadyEvent(self)

    def _host_ids(self) -> torch.Tensor:
        if self._host is None:
            self._host = _to_host(self._sampled_token_ids)
        return self._host

    def get_output(self) -> ModelRunnerOutput:
        sampled = self._host_ids()
        logprobs = self._logprobs_tensors
        if logprobs is not None:
            logprobs = LogprobsTensors(_to_host(logprobs.logprob_token_ids),
                                       _to_host(logprobs.logprobs),
                                       _to_host(logprobs.selected_token_ranks),
                                       logprobs.cu_num_generated_tokens,
                                       _to_host(logprobs.cu_num_generated_tokens_tensor))
        num_nans = _to_host(self._num_nans)
        self._sampled_token_ids = self._logprobs_tensors = self._num_nans = None
        if sampled.shape[-1] == 1:
            token_ids = sampled.tolist()
            for i in self._invalid_req_indices:
                token_ids[i].clear()
            logprobs_lists = logprobs.tolists() if logprobs is not None else None
        else:
            token_ids, logprobs_lists = RejectionSampler.parse_output(
                sampled, self.vocab_size, self._invalid_req_indices, logprobs_tensors=logprobs)
        output = self._model_runner_output
        output.sampled_token_ids = token_ids
        output.logprobs = logprobs_lists
        if num_nans is not None:
            output.num_nans_in_logits = gpu_model_runner.nans_to_dict(num_nans.tolist(),
                                                                      output.req_id_to_index)
            if gpu_model_runner.envs.VLLM_RAISE_ON_LOGIT_NANS:
                gpu_model_runner.raise_if_nan_logits(output.num_nans_in_logits)
        return output


def allocate_per_layer(kv_cache_config, device, layout, kernel_block_sizes=None):
    """vllm.v1.worker.utils.allocate_kv_cache's views, each layer in an allocation of its own.

    Applies where layers do not share bytes: one cache group whose tensors keep each layer's
    blocks together (layer-outermost: layer stride = blocks x block stride). Anything else
    (overlaid groups of hybrid models, block-outermost layouts) keeps vLLM's one allocation."""
    groups = kv_cache_config.kv_cache_groups
    tensors = kv_cache_config.kv_cache_tensors
    if len(groups) != 1 or not tensors or not all(
            t.layer_stride == t.block_stride * kv_cache_config.num_blocks_of(t) for t in tensors):
        return allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes)
    spec = groups[0].kv_cache_spec
    if not getattr(spec, "has_layer_views", False) or hasattr(spec, "kv_cache_specs"):
        return allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes)
    kernel_block_size = kernel_block_sizes[0] if kernel_block_sizes else None
    kv_caches: dict[str, torch.Tensor] = {}
    for tensor in tensors:
        num_blocks = kv_cache_config.num_blocks_of(tensor)
        for name in tensor.layers:
            raw = torch.zeros(tensor.layer_stride, dtype=torch.int8, device=device)
            own = KVCacheTensor(size=tensor.layer_stride, layers=[name],
                                layer_stride=tensor.layer_stride,
                                block_stride=tensor.block_stride)
            (kv_caches[name],) = create_kv_cache_views(raw, spec, num_blocks, layout, own,
                                                       kernel_block_size=kernel_block_size)
    return kv_caches
