"""Host/device buffer pairs that are one allocation under unified memory.

vLLM's runner keeps its per-step inputs (token ids, block tables, slot mappings, query offsets) in
``CpuGpuBuffer``s: a CPU tensor the scheduler output is written into with numpy, and a device
tensor the model reads, joined by a host-to-device copy every step. On "mlx" both sides can be
the same bytes: the device tensor owns an MLX buffer and the CPU tensor and numpy array are
zero-copy aliases of it (``torch_mlx._C.cpu_alias``), so the copies disappear.

MLX must own the memory (it cannot adopt foreign memory on every backend), so the device side is
allocated first and the host side aliases it, not the other way round. Eager MLX work has
finished before a torch op returns, so a host write is never concurrent with a device read.
"""
import torch
from vllm.v1.utils import CpuGpuBuffer

from torch_mlx import _C


class UnifiedBuffer(CpuGpuBuffer):
    """A CpuGpuBuffer whose ``cpu``, ``np`` and ``gpu`` views share one MLX allocation."""

    def __init__(self, *size, dtype: torch.dtype, device: torch.device, with_numpy: bool = True):
        # These buffers are runtime state mutated in place, never inference tensors.
        with torch.inference_mode(False):
            self.gpu = torch.zeros(*size, dtype=dtype, device=device)
        self.cpu = _C.cpu_alias(self.gpu)
        if with_numpy:
            if dtype == torch.bfloat16:
                raise ValueError("numpy cannot view bfloat16; pass with_numpy=False")
            self.np = self.cpu.numpy()

    def copy_to_gpu(self, n: int | None = None) -> torch.Tensor:
        return self.gpu if n is None else self.gpu[:n]

    def copy_to_cpu(self, n: int | None = None) -> torch.Tensor:
        return self.cpu if n is None else self.cpu[:n]

    @classmethod
    def replace(cls, buffer: CpuGpuBuffer) -> "UnifiedBuffer":
        """A unified buffer with ``buffer``'s shape, dtype, device and host contents."""
        unified = cls(*buffer.cpu.shape, dtype=buffer.cpu.dtype, device=buffer.gpu.device,
                      with_numpy=hasattr(buffer, "np"))
        unified.cpu.copy_(buffer.cpu)
        return unified


def unify_attributes(owner: object) -> None:
    """Replace every CpuGpuBuffer attribute of ``owner`` by a UnifiedBuffer (contents kept).

    For objects vLLM builds with plain CpuGpuBuffers (block tables); call before anything takes a
    reference to the old buffers' tensors."""
    for name, value in list(vars(owner).items()):
        if isinstance(value, CpuGpuBuffer) and not isinstance(value, UnifiedBuffer):
            setattr(owner, name, UnifiedBuffer.replace(value))
