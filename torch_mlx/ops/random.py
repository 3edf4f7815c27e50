"""Random ops, drawn from the "mlx" generator so torch.manual_seed reproduces them.

The "mlx" default generator (``torch.mlx.default_generator()``) runs torch's CPU algorithm
(mt19937 plus torch's CPU sampling transforms) placed on device mlx. A random op here hands a
CPU generator carrying the same state to torch's own CPU kernel, which writes into a zero-copy
CPU alias of the "mlx" tensor (memory is unified), then stores the advanced state back. So
for the same seed an op on "mlx" gives exactly the numbers the CPU gives, and the stream of a
program does not depend on which device its tensors are on.

Why not ``mx.random``: MLX draws from a counter-based (threefry) key whose numbers and
consumption differ from torch's; neither ``torch.manual_seed`` reproducibility nor equality
with the CPU would hold. These kernels are torch-level (``torch_kernel``), not MLX lowerings:
a compiled graph runs them eagerly between its MLX partitions.
"""
import contextlib

import torch

from .. import _C
from .. import device as _device
from .registry import torch_kernel


@contextlib.contextmanager
def _cpu_generator(generator):
    """A CPU generator with the state of ``generator`` (the "mlx" default one when None);
    whatever it draws advances ``generator`` by the same amount."""
    source = generator if generator is not None else _device.default_generator()
    cpu = torch.Generator()
    cpu.set_state(source.get_state())
    try:
        yield cpu
    finally:
        source.set_state(cpu.get_state())


def _alias(x):
    return _C.cpu_alias(x) if isinstance(x, torch.Tensor) and x.device.type == "mlx" else x


def _inplace(method: str):
    """``self.method(*args)`` run by the CPU kernel on the alias of ``self``."""

    def kernel(self, *args, generator=None):
        with _cpu_generator(generator) as gen:
            getattr(_alias(self), method)(*[_alias(a) for a in args], generator=gen)
        return self

    kernel.__name__ = f"mlx_{method}"
    return kernel


for _name in ("normal_", "uniform_", "exponential_", "geometric_", "log_normal_", "cauchy_"):
    torch_kernel(_name)(_inplace(_name))
torch_kernel("bernoulli_.float", "bernoulli_.Tensor")(_inplace("bernoulli_"))
torch_kernel("random_", "random_.from", "random_.to")(_inplace("random_"))


def _functional(op):
    """A random op returning a new tensor: computed by the CPU kernel from aliases of the
    inputs, then moved to "mlx"."""

    def kernel(*args, **kwargs):
        generator = kwargs.pop("generator", None)
        if args and (args[-1] is None or isinstance(args[-1], torch.Generator)) and \
                op._schema.arguments[len(args) - 1].name == "generator":
            *args, generator = args  # a positional generator argument
        with _cpu_generator(generator) as gen:
            result = op(*[_alias(a) for a in args], generator=gen,
                        **{k: _alias(v) for k, v in kwargs.items()})
        return result.to("mlx")

    return kernel


def _out(op):
    """An out= random op: the CPU kernel fills a CPU tensor shaped like ``out`` (resizing it,
    or raising, as it would a CPU ``out``), which is then written into ``out``."""

    def kernel(*args, generator=None, out, **kwargs):
        cpu_out = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype)
        with _cpu_generator(generator) as gen:
            op(*[_alias(a) for a in args], generator=gen, out=cpu_out,
               **{k: _alias(v) for k, v in kwargs.items()})
        torch._refs._maybe_resize_out(out, cpu_out.shape)
        return out.copy_(cpu_out)

    return kernel


_aten = torch.ops.aten
for _name in ("multinomial", "normal.Tensor_float", "normal.float_Tensor", "normal.Tensor_Tensor",
              "poisson", "binomial", "_standard_gamma", "_sample_dirichlet"):
    _base, _, _ovl = _name.partition(".")
    torch_kernel(_name)(_functional(getattr(getattr(_aten, _base), _ovl or "default")))


torch_kernel("multinomial.out")(_out(_aten.multinomial.out))
torch_kernel("bernoulli.out")(_out(_aten.bernoulli.out))
torch_kernel("randperm.generator_out")(_out(_aten.randperm.generator_out))
for _name in ("Tensor_float_out", "float_Tensor_out", "Tensor_Tensor_out"):
    torch_kernel(f"normal.{_name}")(_out(getattr(_aten.normal, _name)))
