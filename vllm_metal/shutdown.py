"""SIGTERM with requests in flight: every request in flight ends when the engine is shut down.

On SIGTERM vLLM's API server (``launchers/launcher.py`` ``serve_http``) shuts the engine client
down (``AsyncLLM.shutdown``: the engine core process is killed, the client's output task and
then its output handler are cancelled) and then lets uvicorn shut down, which waits, with no
time limit, for every open connection to finish its response. A streamed response finishes
when its request's output collector yields a final output or an error. The output handler is
what delivers that error (``EngineDeadError``, as when the engine dies on its own), and it does
so only if it runs before its own cancellation, which the shutdown thread schedules on the
event loop right after the engine's: a race. When the cancellation wins, every open stream
waits forever and uvicorn with it (here: 0.8 s in one run, "Waiting for connections to close"
past 10 s in a loaded one).

So when ``AsyncLLM.shutdown`` returns, the error is delivered on the event loop to every request
still in flight, as the handler would have delivered it: streams end with vLLM's error event,
and uvicorn's wait ends with them. vLLM 0.32 has no seam for this (no server argument bounds
uvicorn's graceful shutdown, and the launcher builds uvicorn's config itself), so the platform
wraps ``AsyncLLM.shutdown`` when it configures vLLM (``MetalPlatform.check_and_update_config``,
in the API server process). The wrapper only adds the delivery; installing it twice is a no-op.
It is the one place the plugin changes a vLLM method, for a vLLM race that is not
platform-specific; tests/vllm_metal/test_faults.py covers it.
"""
from __future__ import annotations

import functools
import threading
import weakref

_MARK = "_vllm_metal_fails_requests_in_flight"


def fail_requests_in_flight(llm) -> int:
    """Schedule EngineDeadError for every request of ``llm`` (an AsyncLLM) still in flight, on
    the event loop its output handler ran on. Returns how many requests it was scheduled for
    (0 when none is in flight, or the loop is gone)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    processor = getattr(llm, "output_processor", None)
    handler = getattr(llm, "output_handler", None)
    states = getattr(processor, "request_states", None)
    if not states or handler is None:
        return 0
    loop = handler.get_loop()
    if loop.is_closed():
        return 0
    loop.call_soon_threadsafe(processor.propagate_error, EngineDeadError())
    return len(states)


def install() -> None:
    """Wrap AsyncLLM.shutdown (idempotent)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.shutdown
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def shutdown(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            fail_requests_in_flight(self)

    setattr(shutdown, _MARK, True)
    AsyncLLM.shutdown = shutdown


# At interpreter exit. vLLM's engine client shuts down from a weakref.finalize run at exit
# (MPClient's ``resources``), which only signals its output thread ("EngineCoreOutputQueueThread",
# a daemon) to stop. The thread's frame still holds the last decoded outputs; for a pooling
# model they are tensors over the ZMQ frames (torch.frombuffer), whose deleter takes the GIL. When
# the thread ends while the interpreter is finalizing, that deleter is unwound by the thread's
# forced exit and the process aborts ("terminate called without an active exception", SIGABRT
# after the program's last line: 2 of 6 `LLM.embed` scripts here). Joining the thread before
# finalization lets it end, and free its outputs, normally. exit finalizers run newest first, so
# this one, made before the client's, runs after the client's has sent the stop.
_EXIT_SENTINEL = type("_ExitSentinel", (), {})()
_exit_join = None


def _join_output_threads(timeout: float = 5.0) -> None:
    for thread in threading.enumerate():
        if thread.name == "EngineCoreOutputQueueThread" and thread.is_alive():
            thread.join(timeout)


def join_output_threads_at_exit() -> None:
    """Make the exit finalizer above once (idempotent); call before an engine client exists."""
    global _exit_join
    if _exit_join is None:
        _exit_join = weakref.finalize(_EXIT_SENTINEL, _join_output_threads)
