"""Start and stop a real `vllm serve` on the Metal platform, for the demo, tests and benchmarks.

The server is vLLM's own (OpenAI-compatible API, scheduler, engine processes); nothing here
imports vllm_metal: vLLM picks the platform through the plugin entry point.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_tiny_model(arch: str = "LlamaForCausalLM", out: str | None = None) -> str:
    """A tiny random checkpoint of `arch` (tools/make_tiny_model.py), made once and reused."""
    out = out or os.path.join(ROOT, "models", f"tiny-{arch}")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"),
                        arch, out], check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve MODEL` on 127.0.0.1 in a subprocess (its own process group)."""

    def __init__(self, model: str, *, name: str = "tiny", api_key: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict | None = None,
                 log_path: str | None = None):
        self.model, self.name, self.api_key = model, name, api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--served-model-name", name, *extra_args]
        if api_key:
            self.args += ["--api-key", api_key]
        self.env = dict(os.environ, **(env or {}))
        self.log_path = log_path or os.path.join(ROOT, "out", f"server-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> "Server":
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; log:\n"
                                   + self.tail())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f}s; log:\n" + self.tail())

    def tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The server and every process it started (API server, engine core)."""
        import psutil

        if self.proc is None:
            return []
        root = psutil.Process(self.proc.pid)
        return [root.pid] + [c.pid for c in root.children(recursive=True)]

    def rss_bytes(self) -> int:
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "EMPTY",
                             max_retries=0, timeout=300)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "EMPTY",
                                  max_retries=0, timeout=300)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
