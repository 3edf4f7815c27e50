"""Every environment variable vllm_metal reads, parsed and validated in this one place.

| variable | default | meaning |
|---|---|---|
| VLLM_METAL_USE_MLX | 1 | 1: the plugin activates when mlx and torch_mlx import; 0: it stays out and vLLM picks its own platform |
| VLLM_METAL_MEMORY_FRACTION | auto | KV-cache budget. auto: enough for max_num_seqs requests of max_model_len tokens, capped by vLLM's gpu_memory_utilization of device memory; a number f in (0, 1]: this instance may use f of device memory for weights, activations and KV cache together, the rest goes to the KV cache |
| VLLM_METAL_BLOCK_SIZE | 16 | tokens per KV-cache block (when the user does not pass block_size) |
| VLLM_MLX_DEVICE | (MLX's default) | gpu or cpu: MLX's default device in the worker |
| VLLM_METAL_KV_WRITE | auto | how new keys/values enter the cache. scatter: an MLX scatter on the default device, in place (the cache's buffer lent to it); rows: torch_mlx's row write on MLX's CPU stream; auto: scatter on a GPU, rows on the CPU backend |
| VLLM_METAL_DEBUG | 0 | 1: debug logging for vllm_metal |

Values are read when asked for (not at import), so a test or a launcher may set them late. A bad
value raises ValueError naming the variable; MetalPlatform.check_and_update_config calls
``validate()`` so that happens when vLLM builds its config, before any worker starts.
"""
import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

VARIABLES = (
    "VLLM_METAL_USE_MLX",
    "VLLM_METAL_MEMORY_FRACTION",
    "VLLM_METAL_BLOCK_SIZE",
    "VLLM_MLX_DEVICE",
    "VLLM_METAL_KV_WRITE",
    "VLLM_METAL_DEBUG",
)


def _raw(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _flag(name: str, default: bool) -> bool:
    value = _raw(name, "1" if default else "0").lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


def use_mlx() -> bool:
    return _flag("VLLM_METAL_USE_MLX", True)


def debug() -> bool:
    return _flag("VLLM_METAL_DEBUG", False)


def memory_fraction() -> float | None:
    """None for "auto", else the fraction of device memory, in (0, 1]."""
    value = _raw("VLLM_METAL_MEMORY_FRACTION", "auto")
    if value.lower() == "auto":
        return None
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0.0 < fraction <= 1.0:  # also rejects nan
        raise ValueError(
            "VLLM_METAL_MEMORY_FRACTION must be 'auto' or a number in (0, 1], got "
            f"{os.environ['VLLM_METAL_MEMORY_FRACTION']!r}")
    return fraction


def block_size() -> int:
    value = _raw("VLLM_METAL_BLOCK_SIZE", "16")
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"VLLM_METAL_BLOCK_SIZE must be a positive integer, got "
                         f"{os.environ['VLLM_METAL_BLOCK_SIZE']!r}")
    return int(value)


def mlx_device() -> str | None:
    """"gpu", "cpu", or None to keep MLX's own default."""
    value = _raw("VLLM_MLX_DEVICE", "").lower()
    if value in ("", "gpu", "cpu"):
        return value or None
    raise ValueError(f"VLLM_MLX_DEVICE must be 'gpu' or 'cpu', got {os.environ['VLLM_MLX_DEVICE']!r}")


def kv_write() -> str:
    """"scatter" or "rows" ("auto" resolved against MLX's default device)."""
    value = _raw("VLLM_METAL_KV_WRITE", "auto").lower()
    if value == "auto":
        import mlx.core as mx

        return "scatter" if mx.default_device() == mx.gpu else "rows"
    if value in ("scatter", "rows"):
        return value
    raise ValueError("VLLM_METAL_KV_WRITE must be 'auto', 'scatter' or 'rows', got "
                     f"{os.environ['VLLM_METAL_KV_WRITE']!r}")


def validate() -> None:
    """Parse every variable once, raising on the first bad value."""
    use_mlx()
    debug()
    memory_fraction()
    block_size()
    mlx_device()
    kv_write()
