"""The aten -> MLX lowering table, one module per op family.

Importing this package registers every lowering in ``registry.TABLE`` for the PrivateUse1
dispatch key, with in-place and out= variants derived by the adapter in ``registry``.
To add an op: write its lowering in the family module with ``@lowering("aten_name.overload")``.
"""
from . import registry
from . import creation, elementwise  # noqa: F401

_registrar = registry.Registrar()
_registrar.register_table()
for _name, _kernel in creation.OUT_KERNELS.items():
    _registrar.impl(_name, _kernel)
covered = _registrar.covered  # every aten overload with a PrivateUse1 kernel from this package
