"""Device "mlx": storage, native memory ops, torch.mlx, autoload."""
import io
import os
import subprocess
import sys
import time

import mlx.core as mx

import pytest
import torch

import torch_mlx


def test_fresh_interpreter_autoloads_the_device():
    code = ("import torch, sys; x = torch.arange(6., device='mlx').reshape(2, 3); "
            "print(x.device, x.cpu().tolist(), 'torch_mlx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "mlx:0 [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] True"


def test_importing_torch_mlx_before_torch_works():
    code = "import torch_mlx, torch; print(torch.ones(2, device='mlx').cpu().tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1.0, 1.0]"


def test_autoload_can_be_disabled():
    code = "import torch, sys; print('torch_mlx' in sys.modules)"
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == "False"


def test_autoload_starts_no_mlx_thread_and_allocates_nothing():
    # vLLM forks worker processes after `import torch`: autoload must leave MLX untouched.
    code = ("import os; n = len(os.listdir('/proc/self/task')); import torch, mlx.core as mx; "
            "import torch_mlx; x = torch.empty(0, device='mlx'); "
            "print(len(os.listdir('/proc/self/task')) - n, mx.get_active_memory())")
    # the baseline imports MLX too: MLX's CUDA backend may start driver threads on import
    base = ("import os; n = len(os.listdir('/proc/self/task')); import torch, mlx.core; "
            "print(len(os.listdir('/proc/self/task')) - n)")
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    torch_threads = int(subprocess.run([sys.executable, "-c", base], capture_output=True,
                                       text=True, check=True, env=env).stdout)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    threads, active = map(int, out.stdout.split())
    assert threads == torch_threads
    assert active == 0


def test_device_module():
    assert torch.mlx.is_available() and torch.mlx.device_count() == 1
    assert torch.mlx.current_device() == 0
    torch.mlx.set_device(0)
    with pytest.raises(ValueError):
        torch.mlx.set_device(1)
    torch.mlx.synchronize()
    x = torch.ones(3).mlx()
    assert x.is_mlx and x.device == torch.device("mlx", 0)
    assert torch.nn.Linear(2, 2).mlx().weight.is_mlx


def test_memory_stats_follow_mlx_allocator():
    torch.mlx.empty_cache()
    before = torch.mlx.memory_allocated()
    x = torch.empty(1 << 20, device="mlx")
    assert torch.mlx.memory_allocated() >= before + (4 << 20)
    assert torch.mlx.max_memory_allocated() >= torch.mlx.memory_allocated()
    torch.mlx.reset_peak_memory_stats()  # the peak restarts at the current usage
    assert torch.mlx.max_memory_allocated() == torch.mlx.memory_allocated()
    del x
    assert torch.mlx.memory_allocated() == before
    assert mx.get_active_memory() == before


def test_torch_accelerator_memory_api():
    # torch_mlx's allocator is a c10::DeviceAllocator and registers a host allocator, so
    # torch.accelerator's generic memory API works for "mlx" (vLLM calls empty_cache and
    # empty_host_cache) and reports MLX's allocator counters.
    assert torch.accelerator.current_accelerator().type == "mlx"
    torch.accelerator.empty_cache()
    before = torch.accelerator.memory_allocated()
    assert before == mx.get_active_memory()
    x = torch.empty(1 << 20, device="mlx")
    assert torch.accelerator.memory_allocated() == mx.get_active_memory() >= before + (4 << 20)
    stats = torch.accelerator.memory_stats()
    assert stats["allocated_bytes.all.current"] == torch.accelerator.memory_allocated()
    assert stats["reserved_bytes.all.current"] >= stats["allocated_bytes.all.current"]
    torch.accelerator.reset_peak_memory_stats()  # the peak restarts at the current usage
    assert torch.accelerator.max_memory_allocated() == torch.accelerator.memory_allocated()
    y = torch.empty(1 << 20, device="mlx")
    assert torch.accelerator.max_memory_allocated() >= torch.accelerator.memory_allocated()
    del x, y
    assert torch.accelerator.memory_allocated() == before
    free, total = torch.accelerator.get_memory_info()
    assert 0 < free <= total
    torch.accelerator.empty_cache()
    assert mx.get_cache_memory() == 0
    if hasattr(torch.accelerator, "empty_host_cache"):  # torch 2.13 (the GPU image has 2.11)
        torch.accelerator.empty_host_cache()  # no pinned-host cache under unified memory


def test_events_and_the_stream():
    # one in-order stream; an event is complete once recorded, and timing events measure the
    # interval between their records
    stream = torch.accelerator.current_stream()
    assert stream.device.type == "mlx"
    event = torch.Event(device="mlx")
    event.record()
    event.synchronize()
    assert event.query()
    event.wait(stream)
    stream.synchronize()
    start = torch.Event(device="mlx", enable_timing=True)
    end = torch.Event(device="mlx", enable_timing=True)
    start.record()
    time.sleep(0.05)
    end.record()
    end.synchronize()
    assert 45 <= start.elapsed_time(end) < 5000


def test_rng_state_api():
    torch.mlx.manual_seed(123)
    assert torch.mlx.initial_seed() == 123
    state = torch.mlx.get_rng_state()
    torch.mlx.seed()
    torch.mlx.set_rng_state(state)
    assert torch.equal(torch.mlx.get_rng_state(), state)
    torch.manual_seed(7)  # torch.manual_seed seeds every device, mlx included
    assert torch.mlx.initial_seed() == 7
    g = torch.Generator(device="mlx")
    assert g.device.type == "mlx"


def test_copies_between_devices():
    cpu = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    x = cpu.to("mlx")
    assert torch.equal(x.cpu(), cpu)
    # non-contiguous and dtype-converting copies, all directions
    assert torch.equal(x.t().cpu(), cpu.t())
    assert torch.equal(cpu.t().to("mlx").cpu(), cpu.t())
    assert torch.equal(x.to(torch.int32).cpu(), cpu.to(torch.int32))
    y = torch.empty(6, 4, dtype=torch.float16, device="mlx")
    y.copy_(x.t())
    assert torch.equal(y.cpu(), cpu.t().half())
    z = torch.zeros(4, 6, device="mlx")
    z[1:3, ::2].copy_(x[1:3, ::2])
    expected = torch.zeros(4, 6)
    expected[1:3, ::2] = cpu[1:3, ::2]
    assert torch.equal(z.cpu(), expected)


def test_views_resize_set_and_scalars():
    x = torch.arange(12, dtype=torch.float32, device="mlx")
    v = x.view(3, 4)
    assert v.data_ptr() == x.data_ptr() and v[1, 2].item() == 6.0
    r = x.reshape(2, 6)
    assert r.data_ptr() == x.data_ptr()
    s = torch.as_strided(x, (2, 2), (1, 4), 1)
    assert s.cpu().tolist() == [[1, 5], [2, 6]]
    x.resize_(20)
    assert x.shape == (20,) and x[:12].cpu().tolist() == list(range(12))
    y = torch.empty(0, device="mlx")
    y.set_(x)
    assert y.data_ptr() == x.data_ptr()
    y.set_(x.untyped_storage(), 4, (2, 2), (2, 1))
    assert y.cpu().tolist() == [[4, 5], [6, 7]]
    y.set_()
    assert y.numel() == 0
    z = torch.zeros(3, device="mlx")
    z.fill_(2.5)
    assert z.cpu().tolist() == [2.5] * 3
    z.zero_()
    assert z.cpu().tolist() == [0.0] * 3
    z.fill_(torch.tensor(4.0))
    assert z.cpu().tolist() == [4.0] * 3


def test_repr():
    x = torch.tensor([1.5, -2.0, float("inf"), 0.0], device="mlx")
    assert repr(x) == repr(x.cpu())[:-1] + ", device='mlx:0')"


def test_save_load():
    x = torch.arange(4, dtype=torch.float32, device="mlx")
    buf = io.BytesIO()
    torch.save(x, buf)
    buf.seek(0)
    y = torch.load(buf)
    assert y.device.type == "mlx" and torch.equal(y.cpu(), x.cpu())
    buf.seek(0)
    assert torch.equal(torch.load(buf, map_location="cpu"), x.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_unsupported_dtypes_raise_type_error(dtype):
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        torch.ones(3, dtype=dtype).to("mlx")
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        torch.empty(3, dtype=dtype, device="mlx")


def test_unlowered_op_names_itself_and_the_switch():
    x = torch.ones(4, device="mlx")
    torch_mlx.set_fallback(False)
    with pytest.raises(NotImplementedError, match=r"aten::glu_jvp.*TORCH_MLX_FALLBACK"):
        torch.ops.aten.glu_jvp(torch.nn.functional.glu(x), x, x, 0)


HUGE_PAGE_PROBE = r"""
import json, torch
t = torch.empty(64 << 20, dtype=torch.uint8, device="mlx")
t.fill_(1)  # first touch: the kernel backs advised ranges with 2 MiB pages
begin, end, huge = t.data_ptr(), t.data_ptr() + t.numel(), 0
with open("/proc/self/smaps") as smaps:  # the advice splits the buffer's mapping: sum them
    inside = False
    for line in smaps:
        fields = line.split()
        if "-" in fields[0] and len(fields) > 4:
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            inside = start < end and begin < stop
        elif inside and fields[0] == "AnonHugePages:":
            huge += int(fields[1]) << 10
print(json.dumps({"huge_bytes": huge}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or mx.default_device() == mx.gpu,
                    reason="Linux CPU backend (MLX's GPU allocates through its GPU driver)")
def test_large_buffers_ask_for_huge_pages():
    # Weights and the KV cache are streamed every decode step; 2 MiB pages cut TLB misses.
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        mode = f.read().split("[")[1].split("]")[0]

    def huge_bytes(**env):
        out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], capture_output=True,
                             text=True, check=True, env=dict(os.environ, **env))
        return __import__("json").loads(out.stdout.strip().splitlines()[-1])["huge_bytes"]

    advised, off = huge_bytes(), huge_bytes(TORCH_MLX_HUGEPAGES="0")
    if mode == "never":  # the kernel refuses; the advice must change nothing
        assert advised == off == 0
    else:  # 64 MiB: all but the unaligned ends of the buffer
        assert advised >= 60 << 20, advised
    if mode == "madvise":  # without the advice the buffer stays in 4 KiB pages
        assert off == 0, off


ZERO_PAGES_PROBE = r"""
import json, torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
torch.empty(1, device="mlx")
before = rss()
z = torch.zeros(256 << 20, dtype=torch.int8, device="mlx")  # a fresh 256 MiB buffer
fresh = rss() - before
ok = bool(z[::4093].cpu().eq(0).all()) and bool(z[-3:].cpu().eq(0).all())
z.fill_(5)
z[1:-1].zero_()  # written, then zeroed: resident pages by memset, unaligned ends too
c = z.cpu()
ok = ok and c[0].item() == 5 and c[-1].item() == 5 and bool(c[1:-1].eq(0).all())
f = torch.empty(9 << 20, device="mlx")  # float32, 36 MiB: a third written (resident pages),
f[: 3 << 20].fill_(2.5)                  # the rest as allocated
f.zero_()
ok = ok and bool(f.cpu().eq(0).all())
print(json.dumps({"fresh_bytes": fresh, "ok": ok}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or mx.default_device() != mx.cpu,
                    reason="zeroing by pages is for MLX's Linux CPU backend (malloc'd memory); "
                           "CUDA managed memory and Metal buffers are filled")
def test_zeros_of_a_large_buffer_commit_no_memory():
    # vLLM's KV cache is torch.zeros of gigabytes: zeroed by pages, it costs nothing at start-up
    # and is committed as it is written (csrc/allocator.cpp zero_by_pages)
    out = subprocess.run([sys.executable, "-c", ZERO_PAGES_PROBE], capture_output=True,
                         text=True, check=True)
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"], result
    assert result["fresh_bytes"] < 32 << 20, result
