"""vllm_metal: the vLLM platform plugin that runs vLLM's own model code on device "mlx".

``register`` is the ``vllm.platform_plugins`` entry point (declared in setup.py): vLLM calls it in
every process when it resolves ``current_platform``, so nothing needs importing in user code.
"""
import logging
import os

logger = logging.getLogger(__name__)


class _ThroughVllm(logging.Handler):
    """Hands vllm_metal's log records to the "vllm" logger's handlers, as they are when a record
    is made: vLLM configures its logging (handler, level, format) after plugins are imported, and
    gives a handler to its own logger only, so the plugin's INFO lines (the KV-cache budget,
    start-up timings) would otherwise reach none. VLLM_METAL_DEBUG=1 lets DEBUG records through
    too."""

    def emit(self, record: logging.LogRecord) -> None:
        theirs = logging.getLogger("vllm")
        debug = logger.level == logging.DEBUG  # set by the platform for VLLM_METAL_DEBUG=1
        if record.levelno < theirs.getEffectiveLevel() and not debug:
            return
        for handler in theirs.handlers:
            if record.levelno >= handler.level or debug:
                handler.handle(record)


logger.addHandler(_ThroughVllm())
logger.setLevel(logging.DEBUG - 1)  # every record is made; emit() decides what is shown
logger.propagate = False

PLATFORM = "vllm_metal.platform.MetalPlatform"


def register() -> str | None:
    """The platform's qualified class name when it can run here, else None (reason at debug)."""
    from . import envs

    try:
        if not envs.use_mlx():
            logger.debug("vllm_metal inactive: VLLM_METAL_USE_MLX=0")
            return None
    except ValueError as e:  # reported again, as an error, by check_and_update_config
        logger.debug("vllm_metal: %s", e)
    try:
        import mlx.core  # noqa: F401
        import torch_mlx  # noqa: F401
    except ImportError as e:
        logger.debug("vllm_metal inactive: %s", e)
        return None
    # vLLM picks its V2 model runner by default wherever Triton imports (a CUDA image has it);
    # this platform's runner is the V1 one. Set here, before any VllmConfig reads it; an explicit
    # VLLM_USE_V2_MODEL_RUNNER=1 is refused by the worker with a message.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # vLLM turns "breakable CUDA graphs" on by default for some architectures (DeepSeek-V3.2),
    # which turns torch.compile off and sets the variable in os.environ, so every later engine
    # of the process would run uncompiled too. mlx has no CUDA graphs: keep vLLM's compilation.
    os.environ.setdefault("VLLM_USE_BREAKABLE_CUDAGRAPH", "0")
    return PLATFORM
