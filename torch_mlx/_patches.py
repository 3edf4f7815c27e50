"""The few places where torch has no seam for a device without float64, patched in one place.

Each patch says which torch behaviour it changes and why.
"""
import torch
import torch._tensor_str


def _patch_tensor_str():
    # torch's repr formats values in float64 except on MPS/XPU-without-fp64/MAIA, by moving the
    # tensor to float64 on its device. "mlx" has no float64 (MLX's GPU lacks it), so, like MPS,
    # it formats in float32; without this, printing an "mlx" tensor raises TypeError.
    original = torch._tensor_str.tensor_totype

    def tensor_totype(t):
        if t.device.type == "mlx":
            return t.to(dtype=torch.float)
        return original(t)

    torch._tensor_str.tensor_totype = tensor_totype


def apply():
    _patch_tensor_str()
