"""Time vllm_metal's KV-cache write (write_kv_slots) into a 64 MiB and a 1 GiB cache.

The write stores only the new tokens' keys and values, in place, so its time must not grow with
the cache: the acceptance bound is a 1 GiB / 64 MiB time ratio <= 1.5. For contrast it also times
the functional MLX scatter (a new array: the whole cache copied), which grows with the cache.
The write path is VLLM_METAL_KV_WRITE's (scatter on a GPU, rows on the CPU backend by default;
``writes`` counts which ran). Prints JSON; --json OUT also writes it to a file.
"""
import argparse
import json
import time

import mlx.core as mx
import torch

import torch_mlx
from vllm_metal import envs
from vllm_metal.ops.cache import WRITES, write_kv_slots

KV_HEADS, BLOCK_SIZE, HEAD_SIZE = 8, 16, 128
DTYPE = torch.float16
BLOCK_BYTES = KV_HEADS * BLOCK_SIZE * 2 * HEAD_SIZE * 2  # keys and values, float16


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def make_cache(nbytes: int) -> torch.Tensor:
    # vLLM's token-major (LBNHC) layout seen through the logical [B, H, N, K|V] view.
    num_blocks = nbytes // BLOCK_BYTES
    physical = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, 2 * HEAD_SIZE, dtype=DTYPE,
                           device="mlx")
    return physical.transpose(1, 2)


def write_inputs(cache: torch.Tensor, num_tokens: int, generator: torch.Generator):
    num_slots = cache.shape[0] * BLOCK_SIZE
    slots = torch.randperm(num_slots, generator=generator)[:num_tokens]
    key = torch.randn(num_tokens, KV_HEADS, HEAD_SIZE, generator=generator).to(DTYPE)
    value = torch.randn(num_tokens, KV_HEADS, HEAD_SIZE, generator=generator).to(DTYPE)
    return key.to("mlx"), value.to("mlx"), slots.to("mlx")


def functional_scatter(cache: mx.array, key: mx.array, slots: mx.array) -> None:
    """What an MLX scatter into the cache array costs: a new array the size of the cache."""
    flat = cache.reshape(-1, KV_HEADS, 2 * HEAD_SIZE)
    mx.eval(flat.at[slots].add(mx.concatenate([key, key], axis=-1)))


def measure(nbytes: int, num_tokens: int, repeats: int, scatter_repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    cache = make_cache(nbytes)
    key, value, slots = write_inputs(cache, num_tokens, generator)
    storage = cache.untyped_storage().data_ptr()
    write = median_time(lambda: write_kv_slots(cache, key, value, slots), repeats)
    assert cache.untyped_storage().data_ptr() == storage  # written in place
    physical = torch_mlx.to_mlx(cache.transpose(1, 2))
    scatter = median_time(lambda: functional_scatter(physical, torch_mlx.to_mlx(key),
                                                     torch_mlx.to_mlx(slots)), scatter_repeats)
    return {"cache_bytes": nbytes, "num_tokens": num_tokens, "write_us": write * 1e6,
            "mlx_functional_scatter_us": scatter * 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--scatter-repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    # vLLM's worker serves with one torch thread ("Reducing Torch threads ... for serving"); the
    # write's CPU indexing runs under the same setting here.
    torch.set_num_threads(1)
    results = []
    for num_tokens in (8, 512):  # a decode step of 8 requests; a 512-token prefill chunk
        small = measure(64 << 20, num_tokens, args.repeats, args.scatter_repeats)
        large = measure(1 << 30, num_tokens, args.repeats, args.scatter_repeats)
        results.append({
            "num_tokens": num_tokens, "small": small, "large": large,
            "write_ratio_1GiB_vs_64MiB": large["write_us"] / small["write_us"],
            "scatter_ratio_1GiB_vs_64MiB": (large["mlx_functional_scatter_us"]
                                            / small["mlx_functional_scatter_us"]),
        })
    report = {
        "device": str(mx.default_device()),
        "cache_layout": "LBNHC float16, 8 kv heads x 128, 16-token blocks",
        "torch_threads": torch.get_num_threads(),
        "kv_write": envs.kv_write(),
        "writes": dict(WRITES),
        "results": results,
        "max_write_ratio": max(r["write_ratio_1GiB_vs_64MiB"] for r in results),
        "bound": 1.5,
    }
    # the path asked for wrote every time (the scatter path falls back to rows where it cannot)
    report["ok"] = (report["max_write_ratio"] <= report["bound"]
                    and WRITES["rows" if report["kv_write"] == "scatter" else "scatter"] == 0)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
