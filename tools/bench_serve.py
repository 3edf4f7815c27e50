"""Serving benchmark: vllm_metal (`vllm serve`) against `mlx_lm.server` on the same weights.

For each server and concurrency level (1, 8, 32) it sends streaming completions and measures
requests/s, output tokens/s, time to first token and inter-token latency (p50 / p99). Both
servers run in this one invocation on the same machine, so the ratios compare like with like.
Token counts are streamed chunks with text (one token per chunk for both servers).

    python tools/bench_serve.py [--model DIR] [--max-tokens 64] [--json OUT]
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import Server, ensure_tiny_model, free_port  # noqa: E402

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "MLX is an array framework",
           "In the beginning", "Numbers: 1 2 3", "Dear reader,", "The weather today is"]


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client, model, prompt, max_tokens):
    start = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    ttft = stamps[0] - start if stamps else None
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tokens": len(stamps), "ttft": ttft, "itl": itl}


async def run_level(make_client, model, concurrency, max_tokens):
    client = make_client()  # one client per event loop: httpx pools are bound to their loop
    n = max(2 * concurrency, 8)
    queue = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    results = []

    async def worker():
        while queue:
            results.append(await one_request(client, model, queue.pop(), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    itls = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": n, "requests_per_s": n / elapsed,
            "output_tok_s": tokens / elapsed, "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
            "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
            "itl_p50_ms": 1e3 * percentile(itls, 50) if itls else None,
            "itl_p99_ms": 1e3 * percentile(itls, 99) if itls else None}


def bench(make_client, model, levels, max_tokens):
    asyncio.run(run_level(make_client, model, 1, 4))  # warm-up
    return [asyncio.run(run_level(make_client, model, c, max_tokens)) for c in levels]


class MlxLmServer:
    def __init__(self, model):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", model,
                                      "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2)
                return self
            except OSError:
                time.sleep(1)
        raise TimeoutError("mlx_lm.server did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="EMPTY", timeout=600)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = args.model or ensure_tiny_model("LlamaForCausalLM")
    levels = [int(x) for x in args.levels.split(",")]
    result = {"model": model, "max_tokens": args.max_tokens}
    with Server(model, name="m", extra_args=("--max-num-seqs", str(max(levels)))) as srv:
        result["vllm_metal"] = bench(srv.async_client, "m", levels, args.max_tokens)
    with MlxLmServer(model) as srv:
        result["mlx_lm"] = bench(srv.async_client, model, levels, args.max_tokens)
    print(f"{'server':10} {'conc':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>7} "
          f"{'ITL p50':>8} {'p99':>7}  (ms)")
    for name in ("vllm_metal", "mlx_lm"):
        for r in result[name]:
            print(f"{name:10} {r['concurrency']:>4} {r['requests_per_s']:7.2f} "
                  f"{r['output_tok_s']:8.1f} {r['ttft_p50_ms']:9.1f} {r['ttft_p99_ms']:7.1f} "
                  f"{r['itl_p50_ms'] or 0:8.1f} {r['itl_p99_ms'] or 0:7.1f}")
    result["tok_s_ratio_vs_mlx_lm"] = {
        str(a["concurrency"]): a["output_tok_s"] / b["output_tok_s"]
        for a, b in zip(result["vllm_metal"], result["mlx_lm"])}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
