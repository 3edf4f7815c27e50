"""Quantized checkpoints on mlx: which formats load, and how they are recognised with no flag.

``mlx`` (mlx_affine.py): checkpoints made by ``mlx_lm.convert -q``, the format Mac users
download. Importing this package registers it with vLLM (``register_quantization_config``).

``mlx_gptq`` / ``mlx_awq`` (gptq_awq.py): GPTQ and AWQ checkpoints whose layout maps exactly
onto MLX's affine format, repacked at load.

Detection. vLLM recognises a checkpoint's format while it builds its ModelConfig, from
config.json's ``quantization_config``, by asking every registered method's
``override_quantization_method``. mlx_lm writes its settings as ``"quantization"`` and, since
2024, copies them to ``"quantization_config"`` (with no ``quant_method``). The platform plugin
cannot register the method before that first ModelConfig is built (vLLM resolves the platform
lazily, from inside its own config code); ``register``, a general plugin, does, in every vLLM
process. For the old key, and where the package was installed without that entry point,
``enable_for_checkpoint``, called by
``MetalPlatform.check_and_update_config``, finishes the job on the finished VllmConfig: it
recognises either key, sets the model's quantization to ``mlx`` and builds the quantization
config vLLM would have built. In a process where this package is already imported (the engine
process, a second ``LLM``), vLLM's own detection finds it first and this is a no-op.
"""
from .gptq_awq import AWQConfig, GPTQConfig
from .mlx_affine import NAME as MLX, MLXQuantConfig, is_mlx_quantization

__all__ = ["MLX", "MLXQuantConfig", "GPTQConfig", "AWQConfig", "enable_for_checkpoint",
           "register"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point (setup.py): vLLM loads general plugins in every
    process before it reads a model's config, so the methods above are registered when its own
    detection runs, and a GPTQ/AWQ checkpoint resolves to ``mlx_gptq``/``mlx_awq`` before vLLM's
    CUDA methods are tried. Only on the mlx platform: elsewhere vLLM keeps its own."""
    from vllm.platforms import current_platform

    if getattr(current_platform, "device_type", None) == "mlx":
        from . import gptq_awq, mlx_affine  # noqa: F401  (imported above: registered)


def _mlx_settings(hf_config) -> dict | None:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for config in (hf_config, text):
        for key in ("quantization_config", "quantization"):
            settings = getattr(config, key, None)
            if is_mlx_quantization(settings):
                return settings
    return None


def enable_for_checkpoint(vllm_config) -> None:
    """Make vLLM load an mlx_lm-quantized checkpoint it did not recognise (see above)."""
    from vllm.config import VllmConfig

    model_config = vllm_config.model_config
    if model_config is None or model_config.quantization is not None:
        return
    settings = _mlx_settings(model_config.hf_config)
    if settings is None:
        return
    # where get_quant_config reads it, with the method's name (old mlx_lm wrote only
    # "quantization")
    model_config.hf_config.quantization_config = dict(settings, quant_method=MLX)
    model_config.quantization = MLX
    vllm_config.quant_config = VllmConfig._get_quantization_config(model_config,
                                                                   vllm_config.load_config)
