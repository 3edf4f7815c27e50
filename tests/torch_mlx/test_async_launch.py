"""TORCH_MLX_ASYNC=1 (csrc/launch.h): eager ops and compiled forwards are launched without
waiting, and the host waits where it reads "mlx" memory. The switch is read once per process,
so each check runs in a child. On MLX's CPU backend the streams run on threads of their own, so
a missing wait shows up here as wrong numbers, as it would on a GPU."""
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import torch, torch_mlx
from torch_mlx import _C
"""

CHECKS = {
    # a compiled forward's outputs are launched from Python (mx.async_eval) before they become
    # storages: reading one must wait for it (the first call, which also compiles, read garbage)
    "forward_outputs": """
import torch.fx as fx
from torch_mlx.compile import MlxGraph
from torch_mlx.ops import registry
op = torch.ops.aten.hypot.default
x = torch.randn(64, 33)
expected = op(torch.tensor(1.0), x)
graph = fx.Graph()
ph = graph.placeholder("x"); ph.meta["val"] = x
node = graph.call_function(op, (True, ph)); node.meta["val"] = expected
graph.output(node)
g = MlxGraph(fx.GraphModule(torch.nn.Module(), graph))
registry.compile_allowed = lambda: False
for _ in range(3):
    torch.testing.assert_close(g(x.to("mlx"))[0].cpu(), expected)
""",
    # backward runs on torch's autograd thread, whose MLX default stream is not the main
    # thread's: the wait before a host read must cover that stream too
    "autograd_thread": """
torch.manual_seed(0)
a = torch.randn(3, 4, 4) + 4 * torch.eye(4)
b = torch.randn(3, 4, 2)
for fn in (lambda a, b: torch.linalg.solve(a, b), lambda a, b: torch.linalg.inv(a) @ b,
           lambda a, b: torch.cdist(a, b.mT)):
    grads = []
    for device in ("cpu", "mlx"):
        x, y = (t.to(device).requires_grad_() for t in (a, b))
        out = fn(x, y)
        grads.append([g.cpu() for g in torch.autograd.grad(out, (x, y), torch.ones_like(out))])
    torch.testing.assert_close(grads[1], grads[0])
""",
    # a chain of eager ops whose results are read on the host only at the end, and host writes
    # (fill_, copy_ from the CPU) into a storage that launched work still reads
    "eager_chain_and_host_writes": """
x = torch.arange(4096, dtype=torch.float32)
m = x.to("mlx")
y = m
for _ in range(20):
    y = y * 1.5 - m
z = m + 1
m.fill_(2.0)  # launched work above still reads m: the fill must wait for it
w = m * 3
expected = x
for _ in range(20):
    expected = expected * 1.5 - x
torch.testing.assert_close(y.cpu(), expected)
torch.testing.assert_close(z.cpu(), x + 1)
torch.testing.assert_close(w.cpu(), torch.full_like(x, 6.0))
assert _C.cpu_alias(w)[5].item() == 6.0
""",
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_async_launch_reads_finished_results(name):
    env = dict(os.environ, TORCH_MLX_ASYNC="1", TORCH_DEVICE_BACKEND_AUTOLOAD="1")
    code = PRELUDE + textwrap.dedent(CHECKS[name]) + "\nprint('ok')\n"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
