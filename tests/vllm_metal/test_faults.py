"""`vllm serve` on "mlx" under faults: the engine process dies while requests are in flight
(clients get errors, the server exits within bounded time, nothing hangs), SIGTERM with streams
in flight (the server and its engine are gone within 10 s), and overload (the scheduler
preempts, and no output changes)."""
import os
import signal
import sys
import threading
import time

import psutil
import pytest
import requests

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from serving import Server, ensure_tiny_model  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def model():
    return ensure_tiny_model("LlamaForCausalLM")


def _start(model):
    return Server(model, name=NAME,
                  extra_args=("--max-model-len", "512", "--max-num-seqs", "8")).start()


def _streams_in_flight(server, n):
    """n long streamed completions in threads; returns (threads, outcomes, first-token event)."""
    outcomes, started = [], threading.Event()

    def one(i):
        client = server.client()
        try:
            tokens = 0
            stream = client.completions.create(model=NAME, prompt=f"Story {i}:", max_tokens=400,
                                               extra_body={"min_tokens": 400}, temperature=0.0,
                                               stream=True)
            for _ in stream:
                tokens += 1
                started.set()
            outcomes.append(("finished", tokens))
        except Exception as exc:  # noqa: BLE001  (the point is that it is an error)
            started.set()
            outcomes.append(("error", type(exc).__name__))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, outcomes, started


def _engine_core(server) -> psutil.Process:
    for pid in server.pids()[1:]:
        proc = psutil.Process(pid)
        if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError(f"no engine core process among {server.pids()}")


def test_engine_death_fails_requests_and_the_server_exits(model):
    server = _start(model)
    try:
        threads, outcomes, started = _streams_in_flight(server, 4)
        assert started.wait(120), "no stream produced a token"
        _engine_core(server).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # vLLM's launcher (platform-independent code: launcher.terminate_if_errored) stops
        # uvicorn with should_exit once the engine is dead, so the exit status is uvicorn's
        # normal 0 on every platform; what matters is that it exits, promptly
        rc = server.proc.wait(timeout=30)  # raises TimeoutExpired: a hang
        exit_s = time.monotonic() - killed
        for t in threads:
            t.join(timeout=30)
        assert len(outcomes) == 4
        assert all(kind == "error" or tokens < 400 for kind, tokens in outcomes), outcomes
        print(f"server exited with {rc} {exit_s:.1f} s after the engine was killed")
    finally:
        server.stop()


def test_sigterm_with_streams_in_flight_shuts_down_within_10_s(model):
    server = _start(model)
    try:
        threads, outcomes, started = _streams_in_flight(server, 4)
        assert started.wait(120), "no stream produced a token"
        children = [psutil.Process(p) for p in server.pids()[1:]]
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        server.proc.wait(timeout=10)  # raises TimeoutExpired: too slow or hung
        _, alive = psutil.wait_procs(children, timeout=max(0.1, 10 - (time.monotonic() - sent)))
        assert not alive, f"processes left after SIGTERM: {alive}"
        for t in threads:
            t.join(timeout=30)
        assert len(outcomes) == 4
        assert all(kind == "error" or tokens < 400 for kind, tokens in outcomes), outcomes
        print(f"shut down in {time.monotonic() - sent:.1f} s")
    finally:
        server.stop()


def test_engine_shutdown_ends_every_request_in_flight():
    # The race behind a SIGTERM hang, made deterministic (vllm_metal/shutdown.py): the API server
    # shuts the engine client down from an executor thread; AsyncLLM.shutdown cancels the output
    # handler that would have failed the requests in flight. Here the handler never delivers
    # anything (it is cancelled first, the losing side of the race); the request must still end,
    # with vLLM's EngineDeadError, instead of waiting forever.
    import asyncio
    import types

    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

    from vllm_metal import shutdown

    shutdown.install()
    shutdown.install()  # idempotent

    async def scenario():
        llm = object.__new__(AsyncLLM)  # no engine: shutdown has only the handler to cancel
        collector = RequestOutputCollector(RequestOutputKind.DELTA, "request-0")
        processor = types.SimpleNamespace(
            request_states={"request-0": types.SimpleNamespace(queue=collector)})
        processor.propagate_error = lambda e: OutputProcessor.propagate_error(processor, e)
        llm.output_processor = processor
        llm.output_handler = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown, 0)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(collector.get(), timeout=10)
        await asyncio.sleep(0)
        assert llm.output_handler.cancelled()

    asyncio.run(scenario())


def test_overload_preempts_and_every_output_equals_the_request_alone(model):
    # 64 concurrent greedy requests of 96 new tokens need ~6.5K tokens of KV; the cache holds
    # 320 (20 blocks of 16). The scheduler admits short prompts a block each, then runs out as
    # they grow, so it must preempt and recompute. Every request completes, and its tokens are
    # those of the same request run alone.
    import asyncio

    server = Server(model, name=NAME, extra_args=(
        "--max-model-len", "256", "--max-num-seqs", "64",
        "--kv-cache-memory-bytes", str(320 * 1024))).start()
    try:
        prompts = [f"Number {i}" for i in range(64)]

        async def one(client, prompt):
            r = await client.completions.create(model=NAME, prompt=prompt, max_tokens=96,
                                                extra_body={"min_tokens": 96}, temperature=0.0)
            return r.choices[0].text

        async def together():
            client = server.async_client()
            return await asyncio.gather(*(one(client, p) for p in prompts))

        concurrent = asyncio.run(together())
        metrics = requests.get(server.url + "/metrics", timeout=30).text
        preemptions = sum(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith("vllm:num_preemptions_total"))
        client = server.client()
        alone = [client.completions.create(model=NAME, prompt=p, max_tokens=96,
                                           extra_body={"min_tokens": 96},
                                           temperature=0.0).choices[0].text for p in prompts]
        assert preemptions > 0, "the cache never ran out: no preemption"
        assert concurrent == alone
        print(f"{preemptions:.0f} preemptions")
    finally:
        server.stop()


_EXIT_ORDER = """
import threading, time, weakref
from vllm_metal import shutdown

shutdown.join_output_threads_at_exit()  # as the platform does, before any engine client
stop = threading.Event()

def output_thread():  # vLLM's: stops when the client's exit finalizer signals it
    stop.wait()
    time.sleep(0.3)  # its last outputs being freed
    print("output thread ended", flush=True)

threading.Thread(target=output_thread, name="EngineCoreOutputQueueThread", daemon=True).start()

class Client:
    pass

client = Client()  # alive until exit, like an LLM held by a script
weakref.finalize(client, stop.set)
print("script done", flush=True)
"""


def test_engine_output_thread_ends_before_the_interpreter_finalizes():
    # A pooling script (LLM.embed) aborted after its last line in 2 of 6 runs: vLLM's output
    # thread, stopped at exit, freed its torch.frombuffer outputs while the interpreter was
    # finalizing. The platform's exit finalizer joins it after the client's has stopped it.
    import subprocess

    done = subprocess.run([sys.executable, "-c", _EXIT_ORDER], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == "script done output thread ended".split(), done.stdout
