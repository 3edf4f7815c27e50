"""Start-up time of `vllm serve` on the Metal platform: launch to the first answer of /v1/models,
and where the time goes.

Runs `vllm serve MODEL` with default settings (plus any arguments after ``--``), polls
/v1/models every 0.1 s, and timestamps every log line as it arrives, so the phases come from the
server's own log: process start and imports, engine-core spawn, model construction and weight
load, torch.compile's trace and the MLX compiler, the profiling forward at
max_num_batched_tokens, the KV-cache allocation, the API server's start. The model defaults to
the 0.5B float32 benchmark Llama of tools/bench_decode.py (made locally when missing).

    python tools/bench_startup.py [--model DIR] [--runs 1] [--json OUT] [-- SERVE ARGS...]

Prints one JSON object per run (wall seconds to the answer, the CPU seconds the server's
processes used by then, the load average, the phases) and a summary; exit status 1 when a run
took longer than ``--limit`` seconds (default 60) or failed. The CPU seconds say how much work
start-up is when the machine is shared: wall time then also counts other programs' turns.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from serving import free_port  # noqa: E402

# (phase name, regular expression of the log line that ends it); the first match counts
MARKERS = [
    ("api_process_up", r"vLLM API server version|non-default args"),
    ("engine_core_started", r"Initializing a V1 LLM engine|EngineCore.*Initializing"),
    ("model_loading_started", r"Starting to load model"),
    ("weights_loaded", r"Loading weights took|Model loading took"),
    ("dynamo_traced", r"Dynamo bytecode transform time"),
    ("graph_compiled", r"torch\.compile takes|Compiling a graph for"),
    ("profile_done", r"vllm_metal: profiling run took|KV cache: \d+ bytes"),
    ("kv_cache_allocated", r"vllm_metal: KV cache allocated|init engine \(profile"),
    ("engine_ready", r"init engine \(profile, create kv cache, warmup model\) took"),
    ("api_listening", r"Starting vLLM server on|Application startup complete"),
]


def ensure_bench_model(path: str) -> str:
    from bench_decode import make_bench_model

    return make_bench_model(path)


def tree_cpu_seconds(pid: int) -> dict:
    """CPU seconds of the server and every process it started (the finished children it waited
    for included), user and system: start-up's own work, whatever else the machine runs."""
    import psutil

    user = system = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
        except psutil.NoSuchProcess:
            pass
    return {"user": round(user, 1), "system": round(system, 1)}


def one_run(model: str, serve_args: list[str], timeout: float, log_path: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/models"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
           "--host", "127.0.0.1", "--port", str(port), *serve_args]
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def reader():
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    answered = cpu = None
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    answered = time.monotonic() - t0
                    cpu = tree_cpu_seconds(proc.pid)
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.1)
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    thread.join(timeout=10)
    with open(log_path, "w") as f:
        f.writelines(f"{t:8.2f} {line}\n" for t, line in lines)
    phases = {}
    for name, pattern in MARKERS:
        hit = next((t for t, line in lines if re.search(pattern, line)), None)
        if hit is not None:
            phases[name] = round(hit, 2)
    # figures vLLM and vllm_metal print themselves
    figures = {}
    for key, pattern in [("weights_s", r"Loading weights took ([\d.]+) seconds"),
                         ("model_load_s", r"Model loading took [\d.]+ \w+ and ([\d.]+) seconds"),
                         ("dynamo_s", r"Dynamo bytecode transform time: ([\d.]+) s"),
                         ("compile_total_s", r"torch\.compile takes ([\d.]+) s in total"),
                         ("profile_s", r"vllm_metal: profiling run took ([\d.]+) s"),
                         ("kv_alloc_s", r"vllm_metal: KV cache allocated .* in ([\d.]+) s"),
                         ("init_engine_s", r"init engine \(profile, create kv cache, warmup "
                                           r"model\) took ([\d.]+) seconds"),
                         ("kv_bytes", r"KV cache: (\d+) bytes")]:
        m = next((re.search(pattern, line) for _, line in lines if re.search(pattern, line)),
                 None)
        if m:
            figures[key] = float(m.group(1))
    return {"answered_s": None if answered is None else round(answered, 2), "cpu_s": cpu,
            "load_avg_1m": os.getloadavg()[0],
            "exit_code": proc.returncode, "phases_s": phases, "figures": figures,
            "log": log_path}


def main() -> int:
    argv = sys.argv[1:]
    serve_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, serve_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(ROOT, "models", "bench-llama-0.5b"))
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--limit", type=float, default=60)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model = ensure_bench_model(args.model)
    os.makedirs(os.path.join(ROOT, "out"), exist_ok=True)
    results = []
    for i in range(args.runs):
        log = os.path.join(ROOT, "out", f"startup-{int(time.time())}-{i}.log")
        r = one_run(model, serve_args, args.timeout, log)
        print(json.dumps(r), flush=True)
        results.append(r)
    times = [r["answered_s"] for r in results]
    ok = all(t is not None and t <= args.limit for t in times)
    summary = {"model": model, "serve_args": serve_args, "answered_s": times,
               "limit_s": args.limit, "ok": ok, "runs": results}
    print(f"/v1/models answered after {times} s (limit {args.limit} s); CPU seconds "
          f"{[r['cpu_s'] for r in results]}; load average {[r['load_avg_1m'] for r in results]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
