"""TORCH_MLX_ASYNC=1 (csrc/launch.h): eager ops and compiled forwards are launched without
waiting, and the host waits where it reads "mlx" memory. The switch is read once per process,
so each check runs in a child. On MLX's CPU backend the streams run on threads of their own, so
a missing wait shows up here as wrong numbers, as it would on a GPU."""
import os
import subprocess
import sys
import textwrap

import pytest

ASYNC_ENV = dict(os.environ, TORCH_MLX_ASYNC="1", TORCH_DEVICE_BACKEND_AUTOLOAD="1")
PRELUDE = """
import math, time
import mlx.core as mx
import torch, torch_mlx
from torch_mlx import _C

def chain(a, steps):
    y = a
    for _ in range(steps):
        y = y @ a
    return y

def launched_products():
    # a random a (waited for), then a @ a @ ... launched and not waited for: work that keeps
    # MLX busy while a check runs. MLX's CPU backend takes a few hundred ms for 8 products of
    # 512 squares; an H100 finishes those before the host reaches the check, so on a GPU the
    # squares are 6144 wide and as many as take about half a second (at most 64: 9 GiB)
    a = torch.randn(512, 512, device="mlx") / 23
    steps = 8
    if mx.default_device() == mx.gpu:
        a = torch.randn(6144, 6144, device="mlx") / 78
        chain(a, 2).cpu()  # kernels ready
        t0 = time.perf_counter()
        chain(a, 4).cpu()
        steps = max(8, min(64, math.ceil(0.5 / ((time.perf_counter() - t0) / 4))))
    torch.mlx.synchronize()
    return a, chain(a, steps), steps

def expected_products(a, steps):
    # the product of steps + 1 factors: torch's CPU on MLX's CPU backend; on a GPU (a CPU
    # product of 6144 squares takes seconds) the same kernels again, once all launched work has
    # finished: what the check read while the chain ran must equal what it reads after
    if mx.default_device() != mx.gpu:
        return torch.linalg.matrix_power(a.cpu(), steps + 1)
    torch.mlx.synchronize()
    return chain(a, steps).cpu()

def check_products(a, y, steps):
    torch.testing.assert_close(y.cpu(), expected_products(a, steps), rtol=1e-3, atol=1e-5)
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
    # torch.mlx.synchronize() (like torch.accelerator.synchronize() and an event's record) waits
    # for launched results, also those launched on another thread's MLX streams; with nothing
    # running it does not wait
    "synchronize_waits_for_launches": """
import threading
x = torch.ones(1 << 16, device="mlx")
out = {}
def work():
    y = x
    for _ in range(50):
        y = y * 1.0001
    out["y"] = y
t = threading.Thread(target=work); t.start(); t.join()
_C.host_wait_stats(True)
torch.mlx.synchronize()
evals, _, waits, _ = _C.host_wait_stats(True)
assert evals == 0 and waits == 1, (evals, waits)
torch.mlx.synchronize()
assert _C.host_wait_stats(True)[2] == 0
torch.testing.assert_close(out["y"].cpu(), torch.full((1 << 16,), 1.0001 ** 50))
z = x * 3
_C.host_wait_stats(True)
torch.Event(device="mlx", enable_timing=True).record()
assert _C.host_wait_stats(True)[2] == 1
""",
    # host writes into fresh storages (arange, zeros, a copy from the CPU) do not wait for
    # launched work: no kernel can read bytes MLX never had an array over; a host write into a
    # storage launched work reads still waits, and every value is right
    "fresh_storage_host_writes_do_not_wait": """
a, y, steps = launched_products()
_C.host_wait_stats(True)
r = torch.arange(1000, device="mlx")
z = torch.zeros(300, device="mlx")
c = torch.full((7,), 2.5).to("mlx")
assert _C.host_wait_stats(True)[2] == 0
torch.testing.assert_close(r.cpu(), torch.arange(1000))
assert z.cpu().eq(0).all() and c.cpu().eq(2.5).all()
w = r * 2  # launched: reads r
_C.cpu_alias(r).fill_(7)  # so a host write into r waits for it
assert _C.host_wait_stats(True)[2] == 1
torch.testing.assert_close(w.cpu(), torch.arange(1000) * 2)
check_products(a, y, steps)
""",
    # eager casts, clones and .contiguous() of launched results are MLX ops, launched like any
    # other: none waits for its input (through host memory each waited, and the CPU copied);
    # a strided copy, a CPU -> "mlx" copy and a copy to the CPU still go through host memory
    "copies_and_casts_are_launched": """
a, y, steps = launched_products()
_C.host_wait_stats(True)
h = y.to(torch.bfloat16)
f = h.float()
c = y.clone()
t = y.t().contiguous()
i = (y * 100).to(torch.int32)
assert _C.host_wait_stats(True)[2] == 0
assert c.data_ptr() != y.data_ptr() and t.is_contiguous() and h.dtype == torch.bfloat16
expected = expected_products(a, steps)
torch.testing.assert_close(c.cpu(), expected, rtol=1e-3, atol=1e-5)
torch.testing.assert_close(t.cpu(), expected.t(), rtol=1e-3, atol=1e-5)
torch.testing.assert_close(f.cpu(), expected.bfloat16().float(), rtol=1e-2, atol=1e-3)
torch.testing.assert_close(i.cpu(), (y.cpu() * 100).to(torch.int32))
""",
    # copy_ and fill_ into "mlx" storages that launched work still reads (or writes), where a
    # host write would wait: written on the device, in the storage's own buffer, after the
    # kernels launched before (csrc/bridge.h write_in_place); an in-place op is its functional
    # result copied into self. Where the buffer cannot be lent (a strided view, another dtype, a
    # from_mlx storage whose array is still held) the host writes, after waiting
    "device_writes": """
import mlx.core as mx
x = torch.arange(4096, dtype=torch.float32, device="mlx")
k = torch.zeros((), dtype=torch.int64, device="mlx")
b = torch.ones(3, dtype=torch.bfloat16, device="mlx") * 2
r = torch.arange(100, dtype=torch.float32, device="mlx") * 1
s = torch.arange(100, dtype=torch.float32, device="mlx") * 1
z = torch.ones(64, dtype=torch.bool, device="mlx")
# a compiled graph's output that is a slice of a value computed in the graph: its array starts
# 160 bytes into its buffer, and its storage (the whole buffer) at the buffer's first byte
c = torch.compile(lambda v: (v * 1)[40:], backend="mlx")(torch.arange(64.0, device="mlx"))
assert c.storage_offset() == 40
held = mx.arange(8).astype(mx.float32) * 1
t = torch_mlx.from_mlx(held)
torch.mlx.synchronize()
a, y, steps = launched_products()
u = x * 2  # launched: reads x before the writes below
_C.host_wait_stats(True)
_C.device_write_count(True)
x.add_(1)  # add(x, 1), then its copy into x
k.copy_(y.sum().isfinite().long() + 6)  # one element: the buffer is lent as bytes
b.mul_(torch.tensor(1.5, device="mlx").bfloat16())
r[10:20].fill_(-1)  # a range of the storage: lent whole, written where the view is
s[90:].zero_()
z.logical_not_()
c.add_(100)  # lent from the buffer's first byte, written at the view's offset
assert _C.host_wait_stats(True)[2] == 0
assert _C.device_write_count(True) == 7
r[::2].copy_(torch.zeros(50, device="mlx"))  # strided: the host writes, after waiting
t.copy_(torch.full((8,), 3.0, device="mlx") + 0)  # `held` shares the buffer: the host writes
assert _C.device_write_count(True) == 0 and held.tolist() == [3.0] * 8
x.mul_(2).sub_(1)  # chained: each write after the one before, on the device or the host
expected = (torch.arange(4096, dtype=torch.float32) + 1) * 2 - 1
torch.testing.assert_close(x.cpu(), expected)
torch.testing.assert_close(u.cpu(), torch.arange(4096, dtype=torch.float32) * 2)
expected = torch.arange(100, dtype=torch.float32)
expected[10:20] = -1
expected[::2] = 0
torch.testing.assert_close(r.cpu(), expected)
assert s.cpu()[89].item() == 89 and s.cpu()[90:].eq(0).all()
assert k.item() == 7 and b.cpu().tolist() == [3.0, 3.0, 3.0] and not z.cpu().any()
torch.testing.assert_close(c.cpu(), torch.arange(40.0, 64.0) + 100)
check_products(a, y, steps)
""",
    # a read-only host alias (cpu_alias(t, writes=False)) does not wait for launched kernels
    # that only read t; one of a tensor still being computed waits for it, and a writable
    # alias still waits for t's readers
    "read_only_alias_waits_only_for_the_writer": """
t = torch.arange(1 << 16, dtype=torch.float32, device="mlx")
a, y, steps = launched_products()
u = t * 2  # launched: reads t
_C.host_wait_stats(True)
assert _C.cpu_alias(t, writes=False)[7].item() == 7.0
assert _C.host_wait_stats(True)[2] == 0
assert _C.cpu_alias(u, writes=False)[7].item() == 14.0  # u's own writer: waited for
assert _C.host_wait_stats(True)[2] == 1
v = t + 1
_C.cpu_alias(t)  # may be written: waits for v, which reads t
assert _C.host_wait_stats(True)[2] == 1
check_products(a, y, steps)
""",
    # a stream query answers from the launched results, without waiting: not done while a chain
    # of products runs, done once it has finished
    "stream_query_sees_launches": """
s = torch.accelerator.current_stream("mlx")
a, y, steps = launched_products()
s.synchronize()
assert s.query()
y = chain(a, steps)
_C.host_wait_stats(True)
assert not s.query()
assert _C.host_wait_stats(True)[2] == 0  # the query did not wait
deadline = time.monotonic() + 60
while not s.query():
    assert time.monotonic() < deadline, "the stream never reported done"
    time.sleep(0.001)
check_products(a, y, steps)
""",
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_async_launch_reads_finished_results(name):
    code = PRELUDE + textwrap.dedent(CHECKS[name]) + "\nprint('ok')\n"
    done = subprocess.run([sys.executable, "-c", code], env=ASYNC_ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_gradients_on_the_autograd_thread():
    # backward runs on torch's autograd thread, whose MLX default stream is not the main
    # thread's: the wait before a host read must cover its launches too (wrong gradients, a
    # different case each run, before). test_ops_linalg's own gradient test, with the switch on.
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(os.path.dirname(__file__), "test_ops_linalg.py"),
                           "-k", "test_gradients_match_cpu"],
                          env=ASYNC_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]  # rc 5: none ran


def test_inplace_suites_with_device_writes():
    # the in-place write tests and the training loops (optimizer steps: in-place updates of
    # every parameter) with the switch on, where copy_ / fill_ into storages that launched work
    # still uses are written on the device (write_in_place); some must have been
    here = os.path.dirname(__file__)
    code = f"""
import sys, pytest, torch, torch_mlx
rc = pytest.main(["-q", "-p", "no:cacheprovider", {os.path.join(here, "test_inplace_writes.py")!r},
                  {os.path.join(here, "test_training.py")!r}])
print("device writes", torch_mlx._C.device_write_count())
sys.exit(int(rc))
"""
    done = subprocess.run([sys.executable, "-c", code], env=ASYNC_ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]  # rc 5: none ran
    writes = int(done.stdout.split("device writes")[-1].split()[0])
    assert writes > 0, done.stdout[-2000:]


def test_host_wait_stats_count_what_the_host_waits_for():
    # profile_decode's split of host time: results evaluated one by one (the default mode: each
    # eager op) and, with TORCH_MLX_ASYNC=1, host waits for launched work (reads)
    code = PRELUDE + """
x = torch.ones(1000, device="mlx")
_C.host_wait_stats(True)
for _ in range(5):
    x = x * 2
x.cpu()
print(*_C.host_wait_stats(True))
print(*_C.host_wait_stats(False))
"""
    runs = {}
    for mode in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(ASYNC_ENV, TORCH_MLX_ASYNC=mode), timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        first, after_reset = [line.split() for line in done.stdout.split("\n")[:2]]
        assert [float(v) for v in after_reset] == [0, 0, 0, 0]
        runs[mode] = (int(first[0]), float(first[1]), int(first[2]), float(first[3]))
    evals, eval_s, waits, wait_s = runs["0"]
    assert evals == 5 and eval_s > 0 and waits == 0
    evals, eval_s, waits, wait_s = runs["1"]
    assert evals == 0 and waits >= 1 and wait_s >= 0


@pytest.mark.parametrize("value", ["", "auto", "1", "0", "yes"])
def test_switch_values_and_default(value):
    # unset / auto: launched where MLX has a GPU (measured faster on the H100), waited for on the
    # CPU-only backend (measured faster there); anything but 1 / 0 / auto is refused by name
    code = PRELUDE + """
import mlx.core as mx
try:
    y = (torch.ones(3, device="mlx") * 2).sum().item()
except ValueError as e:
    print("refused:", e)
else:
    print(_C.async_launch(), mx.is_available(mx.gpu), y)
"""
    env = dict(ASYNC_ENV)
    if value:
        env["TORCH_MLX_ASYNC"] = value
    else:
        env.pop("TORCH_MLX_ASYNC")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.strip().splitlines()[-1]
    if value == "yes":
        assert out.startswith("refused: TORCH_MLX_ASYNC=yes: use 1") and "auto" in out
        return
    launched, has_gpu, y = out.split()
    assert float(y) == 6.0
    assert launched == {"1": "True", "0": "False"}.get(value, has_gpu)
