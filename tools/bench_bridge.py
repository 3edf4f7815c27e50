"""Time torch_mlx.to_mlx / from_mlx for a 1 KiB and a 1 GiB tensor.

A zero-copy bridge costs the same at any size: the 1 GiB / 1 KiB time ratio should be about 1
(the acceptance bound is 2). Prints JSON; --json OUT also writes it to a file.
"""
import argparse
import json
import time

import mlx.core as mx
import torch

import torch_mlx


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def measure(nbytes: int, repeats: int) -> dict:
    t = torch.empty(nbytes // 4, dtype=torch.float32, device="mlx")
    a = mx.zeros((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    return {
        "bytes": nbytes,
        "to_mlx_us": median_time(lambda: torch_mlx.to_mlx(t), repeats) * 1e6,
        "from_mlx_us": median_time(lambda: torch_mlx.from_mlx(a), repeats) * 1e6,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    small = measure(1 << 10, args.repeats)
    large = measure(1 << 30, args.repeats)
    result = {
        "1KiB": small,
        "1GiB": large,
        "to_mlx_ratio": large["to_mlx_us"] / small["to_mlx_us"],
        "from_mlx_ratio": large["from_mlx_us"] / small["from_mlx_us"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
