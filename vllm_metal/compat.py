"""The one place where vllm_metal patches code it does not own, each patch with its reason.

Installed by MetalPlatform.check_and_update_config (the process that builds the engine) and by
MetalWorker.init_device (the worker's process); every patch leaves other devices' behaviour
unchanged.
"""
import torch

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _route_accelerator_cache_calls()


def _on_mlx() -> bool:
    accelerator = torch.accelerator.current_accelerator()
    return accelerator is not None and accelerator.type == "mlx"


def _route_accelerator_cache_calls() -> None:
    """vLLM calls ``torch.accelerator.empty_cache()`` (runner clean-up, shutdown) and
    ``torch.accelerator.empty_host_cache()`` (distributed shutdown). torch implements the first
    only for allocators derived from ``c10::DeviceAllocator`` (torch_mlx's is a plain
    ``c10::Allocator``: internal assert) and the second through a registered host allocator
    (torch_mlx registers none: segfault). For the "mlx" accelerator, empty_cache goes to
    ``torch.mlx.empty_cache`` (MLX's buffer cache) and empty_host_cache does nothing: under
    unified memory there is no separate pinned-host cache."""
    empty_cache, empty_host_cache = torch.accelerator.empty_cache, torch.accelerator.empty_host_cache

    def routed_empty_cache() -> None:
        torch.mlx.empty_cache() if _on_mlx() else empty_cache()

    def routed_empty_host_cache() -> None:
        if not _on_mlx():
            empty_host_cache()

    torch.accelerator.empty_cache = routed_empty_cache
    torch.accelerator.empty_host_cache = routed_empty_host_cache
