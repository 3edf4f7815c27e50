"""Soak test of `vllm serve` on the Metal platform: many sequential requests, memory must stay
flat. Reports the server's RSS (all its processes: API server and engine core; on Linux MLX's
buffers are host memory, so RSS includes them) after warm-up and at the end, requests served
and errors. Also drops a few streams mid-way to check the engine survives disconnects.

    python tools/soak.py [--requests 500] [--model DIR] [--json OUT]
"""
import argparse
import json
import os
import sys
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import Server, ensure_tiny_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    model = args.model or ensure_tiny_model("LlamaForCausalLM")
    errors, served, dropped = [], 0, 0
    with Server(model, name="m", extra_args=("--max-model-len", "512")) as srv:
        client = srv.client()
        for i in range(args.warmup):
            client.completions.create(model="m", prompt=f"warm up {i}", max_tokens=16)
        rss_start = srv.rss_bytes()
        start = time.monotonic()
        for i in range(args.requests):
            try:
                if i % 50 == 25:  # a client that disconnects mid-stream
                    with requests.post(srv.url + "/v1/completions", stream=True, timeout=120,
                                       json={"model": "m", "prompt": "drop me",
                                             "max_tokens": 64, "stream": True}) as r:
                        next(r.iter_lines())
                    dropped += 1
                else:
                    client.completions.create(model="m", prompt=f"request {i}: tell me",
                                              max_tokens=16, temperature=0.7, seed=i)
                    served += 1
            except Exception as e:  # noqa: BLE001  (every failure is counted and reported)
                errors.append(f"{i}: {type(e).__name__}: {e}")
        elapsed = time.monotonic() - start
        rss_end = srv.rss_bytes()
    result = {"requests_served": served, "streams_dropped": dropped, "errors": len(errors),
              "first_errors": errors[:5], "rss_start_mb": rss_start / 2**20,
              "rss_end_mb": rss_end / 2**20, "rss_growth": (rss_end - rss_start) / rss_start,
              "seconds": elapsed}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if not errors and result["rss_growth"] < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
