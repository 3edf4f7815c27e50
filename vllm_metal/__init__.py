"""vllm_metal: the vLLM platform plugin that runs vLLM's own model code on device "mlx".

``register`` is the ``vllm.platform_plugins`` entry point (declared in setup.py). It returns the
platform's qualified class name when the platform can run here, else None.
"""


def register():
    # The platform itself lands with the vLLM plugin issue; until then vLLM keeps its own choice.
    return None
