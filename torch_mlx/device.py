"""``torch.mlx``: the device module of "mlx" (what ``torch.cuda`` is to CUDA).

MLX has one device per process (the GPU on Apple silicon, the CPU elsewhere) and one in-order
stream; memory figures come from MLX's allocator.
"""
import mlx.core as mx
import torch

from . import _C

_default_generator = None


def _generator() -> torch.Generator:
    global _default_generator
    if _default_generator is None:
        _default_generator = _C.default_generator()
    return _default_generator


def is_available() -> bool:
    return True


def is_initialized() -> bool:
    return True


def _lazy_init() -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device) -> None:
    index = torch.device(device).index if not isinstance(device, int) else device
    if index not in (None, 0):
        raise ValueError(f"mlx has a single device, mlx:0; got {device!r}")


class device:
    """Context manager selecting an "mlx" device; there is only mlx:0, so it only validates."""

    def __init__(self, device):
        if device is not None and not (isinstance(device, int) and device in (0, -1)):
            set_device(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def get_device_name(device=None) -> str:
    return f"MLX ({mx.default_device()})"


def blas_info() -> dict:
    """Which BLAS MLX's CPU backend uses (Linux: "openblas" through torch_mlx.blas, or
    "reference", the netlib BLAS bundled with the mlx-cpu wheel) and why."""
    from . import blas

    return blas.info()


def synchronize(device=None) -> None:
    """Wait for all MLX work torch ops queued: results launched without waiting (the GPU
    default, csrc/launch.h), on whichever thread's streams they run, then MLX's default stream
    (csrc/launch.cpp synchronize_all, which torch.accelerator.synchronize() also runs)."""
    _C.synchronize()


def get_amp_supported_dtype():
    return [torch.float16, torch.bfloat16]


# Random state: torch's CPU generator algorithm, placed on device mlx.
def default_generator() -> torch.Generator:
    return _generator()


def manual_seed(seed: int) -> None:
    _generator().manual_seed(int(seed))


manual_seed_all = manual_seed


def seed() -> None:
    _generator().seed()


seed_all = seed


def initial_seed() -> int:
    return _generator().initial_seed()


def get_rng_state(device="mlx") -> torch.Tensor:
    return _generator().get_state()


def set_rng_state(new_state: torch.Tensor, device="mlx") -> None:
    _generator().set_state(new_state)


def get_rng_state_all():
    return [get_rng_state()]


def set_rng_state_all(states) -> None:
    set_rng_state(states[0])


# Memory: the C++ allocator's statistics (MLX's allocator counters), shared with
# torch.accelerator's memory API.
def memory_allocated(device=None) -> int:
    return torch.accelerator.memory_allocated("mlx")


def max_memory_allocated(device=None) -> int:
    return torch.accelerator.max_memory_allocated("mlx")


def reset_peak_memory_stats(device=None) -> None:
    torch.accelerator.reset_peak_memory_stats("mlx")


def memory_reserved(device=None) -> int:
    return torch.accelerator.memory_reserved("mlx")


def empty_cache() -> None:
    mx.clear_cache()
