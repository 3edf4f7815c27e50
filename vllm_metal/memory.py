"""Device memory figures and the KV-cache budget (VLLM_METAL_MEMORY_FRACTION).

Memory is unified: weights, activations and the KV cache all come from MLX's allocator, so MLX's
own counters (active and peak bytes) measure what this process uses, and the device's total is
the machine's memory (on Apple silicon, the GPU's recommended working set).
"""
import torch

from . import envs


def device_total_memory() -> int:
    # torch_mlx's allocator (csrc/allocator.cpp) answers: MLX's reported size, else the RAM
    return torch.accelerator.get_memory_info("mlx")[1]


def kv_cache_budget(*, total: int, peak_in_use: int, needed_for_all_seqs: int,
                    gpu_memory_utilization: float) -> tuple[int, str]:
    """Bytes for the KV cache, and a sentence saying how they were chosen.

    ``peak_in_use``: the most memory this process held while profiling a full-size batch
    (weights, runner buffers, activations). ``needed_for_all_seqs``: KV bytes for max_num_seqs
    requests of max_model_len tokens. The result may be <= 0 or too small for one request; vLLM
    then raises its usual error."""
    fraction = envs.memory_fraction()
    if fraction is None:
        cap = int(total * gpu_memory_utilization) - peak_in_use
        budget = min(needed_for_all_seqs, cap)
        how = (f"VLLM_METAL_MEMORY_FRACTION=auto: {needed_for_all_seqs} bytes for max_num_seqs "
               f"full-length requests, capped at gpu_memory_utilization={gpu_memory_utilization} "
               f"of {total} bytes minus {peak_in_use} in use")
    else:
        budget = int(total * fraction) - peak_in_use
        how = (f"VLLM_METAL_MEMORY_FRACTION={fraction}: {fraction} of {total} bytes minus "
               f"{peak_in_use} in use")
    return budget, how


def check_fits_one_request(budget: int, how: str, *, per_request: int, peak_in_use: int,
                           total: int, max_model_len: int) -> None:
    """Refuse a KV budget that cannot hold one request of max_model_len tokens, with the
    variable to change and the size needed (vLLM's own check would name only its settings)."""
    if budget >= per_request:
        return
    needed = peak_in_use + per_request
    raise ValueError(
        f"The KV cache budget is {max(budget, 0)} bytes ({how}), but one request of "
        f"max_model_len={max_model_len} tokens needs {per_request} bytes of KV cache, on top of "
        f"the {peak_in_use} bytes in use: {needed} bytes of {total}. Set "
        f"VLLM_METAL_MEMORY_FRACTION to at least {needed / total:.6f} (or 'auto'), or lower "
        f"max_model_len.")
