"""vllm_metal: the vLLM platform plugin that runs vLLM's own model code on device "mlx".

``register`` is the ``vllm.platform_plugins`` entry point (declared in setup.py): vLLM calls it in
every process when it resolves ``current_platform``, so nothing needs importing in user code.
"""
import logging
import os

logger = logging.getLogger(__name__)

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
    return PLATFORM
