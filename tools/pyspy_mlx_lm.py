"""mlx-lm's batch-1 decode with its native stacks sampled by py-spy after a warm-up: the peer's
host profile beside tools/profile_decode.py --pyspy (device kit ``profile:pyspy``).

    python tools/pyspy_mlx_lm.py --model DIR --out pyspy_mlx_lm.txt [--pyspy-bin py-spy]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyspy_self  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--pyspy-bin", default="py-spy")
    args = parser.parse_args()
    model, tokenizer = load(args.model)

    def generate(tokens):
        last = None
        for last in stream_generate(model, tokenizer, "hello world", max_tokens=tokens):
            pass
        return last

    generate(64)  # warm-up: MLX CUDA's JIT and cuDNN plans for these shapes
    with pyspy_self.sampled(args.out, args.pyspy_bin):
        start = time.perf_counter()
        last = generate(args.tokens)
        wall = time.perf_counter() - start
    print(f"mlx-lm under py-spy: {last.generation_tokens} tokens, "
          f"{last.generation_tps:.1f} tok/s ({wall:.1f} s with the prompt)")


if __name__ == "__main__":
    main()
