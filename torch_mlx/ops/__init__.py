"""The aten -> MLX lowering table, one module per op family.

Importing this package registers every lowering in ``registry.TABLE`` (and the few torch-level
kernels in ``registry.TORCH_KERNELS``) for the PrivateUse1 dispatch key; in-place and out=
variants are derived by the adapter in ``registry``. To add an op: write its lowering in the
family module with ``@lowering("aten_name.overload")``.
"""
from . import registry
from . import (  # noqa: F401  (each module fills the table on import)
    creation,
    elementwise,
    fft,
    fused,
    indexing,
    linalg,
    nn,
    random,
    reduction,
    shape,
    sorting,
    views,
)
from . import decompositions  # noqa: F401,E402  (last: torch's decompositions fill the gaps)

_registrar = registry.Registrar()
_registrar.register_all()
covered = _registrar.covered  # every aten overload with a PrivateUse1 kernel from this package
