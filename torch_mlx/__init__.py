"""torch_mlx: a PyTorch device, "mlx", whose tensors live in MLX buffers.

Importing this package (done automatically by ``import torch`` through the ``torch.backends``
entry point) renames PrivateUse1 to "mlx", loads the C++ runtime (allocator, guard, hooks, memory
ops), installs ``torch.mlx`` and registers the aten -> MLX lowering table. Nothing here starts an
MLX stream or allocates: that happens on the first use of the device.
"""


def _autoload():
    """Entry point of the ``torch.backends`` group: importing this package did the work.

    Defined before ``import torch``: when a program imports torch_mlx first, torch's autoload
    finds this module half-initialised and calls this function; the import then completes."""


import torch  # noqa: E402

if torch._C._get_privateuse1_backend_name() != "mlx":
    torch.utils.rename_privateuse1_backend("mlx")

from . import blas  # noqa: E402

blas.select()  # must precede the first import of mlx.core (see torch_mlx/blas.py)

from . import _C  # noqa: E402  (C++ runtime; imports mlx.core)

blas.install_first_use_hook(_C)
from . import precision  # noqa: E402  (sets MLX_ENABLE_TF32 before MLX's first product)
from . import device as _device_module  # noqa: E402

torch._register_device_module("mlx", _device_module)
torch.utils.generate_methods_for_privateuse1_backend(
    for_tensor=True, for_module=True, for_storage=True, for_packed_sequence=True
)

precision.install_backend_module()
from . import _patches  # noqa: E402

_patches.apply()

from .bridge import from_mlx, to_mlx  # noqa: E402
from .fallback import fallback_enabled, set_fallback  # noqa: E402
from . import ops  # noqa: E402,F401  (registers the lowerings)

__all__ = ["to_mlx", "from_mlx", "set_fallback", "fallback_enabled"]
