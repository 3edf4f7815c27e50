"""Does a small in-place write on "mlx" cost O(bytes written) or O(destination)?

    .venv/bin/python tools/bench_inplace.py [--repeats N] [--json OUT]

Times the same 4 KiB write (1024 float32 elements) into a 1 MiB and into a 256 MiB destination
on "mlx", for index_put_ (1024 scattered elements), copy_ into a row slice and masked_fill_ on
a one-row view. Each timing is the median of --repeats writes, each followed by
torch.mlx.synchronize() so MLX's lazy work is inside the measurement. A write that copied or
rewrote the whole storage would take ~256x longer into the large destination; the goal (issue 4)
is a ratio of at most 3. Prints JSON: per write, both times and the ratio, plus the worst ratio.
"""
import argparse
import json
import statistics
import time

import torch

ROW = 1024  # float32 elements per row: 4 KiB, also the size of every write
SIZES_MIB = (1, 256)
GOAL_RATIO = 3.0


def _writes(rows: int):
    """name -> (destination, write()) for a destination of ``rows`` x ROW float32 on "mlx"."""
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(ROW, generator=gen).to("mlx")
    row = torch.rand(ROW, generator=gen).to("mlx")
    # 1024 distinct positions spread over the first 1 MiB (valid in both destinations)
    index = torch.randperm(256 * ROW, generator=gen)[:ROW].to("mlx")
    mask = (torch.rand(1, ROW, generator=gen) < 0.5).to("mlx")
    middle = rows // 2

    def make(write):
        dest = torch.zeros(rows, ROW, device="mlx")
        return dest, lambda: write(dest)

    return {
        "index_put_": make(lambda d: d.view(-1).index_put_((index,), values)),
        "copy_into_slice": make(lambda d: d[middle].copy_(row)),
        "masked_fill_": make(lambda d: d[middle:middle + 1].masked_fill_(mask, 1.0)),
    }


def _median_seconds(write, repeats: int) -> float:
    for _ in range(3):  # warm-up: first-use costs are not what is measured
        write()
    torch.mlx.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        write()
        torch.mlx.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", metavar="OUT", help="also write the result here")
    args = parser.parse_args()

    seconds = {}
    for mib in SIZES_MIB:
        rows = mib * 2**20 // (4 * ROW)
        for name, (dest, write) in _writes(rows).items():
            seconds.setdefault(name, {})[mib] = _median_seconds(write, args.repeats)
            del dest
    small, large = SIZES_MIB
    result = {"write_bytes": 4 * ROW, "destinations_mib": list(SIZES_MIB), "writes": {}}
    for name, by_size in seconds.items():
        result["writes"][name] = {
            f"{small}MiB_us": round(by_size[small] * 1e6, 1),
            f"{large}MiB_us": round(by_size[large] * 1e6, 1),
            "ratio": round(by_size[large] / by_size[small], 2),
        }
    result["worst_ratio"] = max(w["ratio"] for w in result["writes"].values())
    result["goal_ratio"] = GOAL_RATIO
    result["meets_goal"] = result["worst_ratio"] <= GOAL_RATIO
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
