"""Sample this process's own stacks with py-spy over a block of code (steady state only).

Running a whole program under ``py-spy record --native`` spent its samples on start-up: vLLM's
engine took over 200 s to start under native unwinding on the H100 (tenth visit), and mlx-lm's
short generation was mostly MLX CUDA's first-use JIT. Attaching after a warm-up samples only
the decode loop:

    with pyspy_self.sampled("out.txt", spy="/path/to/py-spy", rate=100):
        generate(...)

py-spy writes its raw (collapsed) stacks when it gets SIGINT (SIGTERM writes nothing); the
summary is tools/pyspy_summary.py.
"""
import contextlib
import os
import signal
import subprocess
import time


@contextlib.contextmanager
def sampled(out: str, spy: str, rate: int = 50, native: bool = True):
    cmd = [spy, "record", "--pid", str(os.getpid()), "-r", str(rate), "-f", "raw", "-o", out]
    if native:
        cmd.append("--native")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached before the code runs
    if proc.poll() is not None:
        raise RuntimeError(f"py-spy exited at once: {proc.stderr.read()[-2000:]}")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
