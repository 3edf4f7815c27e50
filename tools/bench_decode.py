"""Offline decode benchmark: vllm_metal vs mlx-lm on the same ~0.5B Llama weights and BLAS,
with transformers on torch CPU as a reference line, and the machine's memory-bandwidth bound.

Each engine runs in its own process (one MLX runtime per process). vllm_metal runs the
checkpoint in float32 like the others (vLLM's "auto" dtype would downcast a float32 checkpoint to
bfloat16, whose MLX CPU matmul is a single-threaded loop, not BLAS), with vLLM's default
compilation, and a 1024-token batch budget (vLLM's start-up profiling pass runs the forward once
at that size). Decode rates are measured as
(N - 1) extra tokens over the time difference between generating N tokens and 1 token, so
prefill and start-up costs cancel out; each rate is the best of --repeats such measurements (the
machine's speed drifts by more than the margins being measured).

A bandwidth probe reads the same 2 GiB three ways: torch's all-core sum in 4 KiB pages and in
2 MiB pages (a buffer from torch_mlx's allocator, which asks for huge pages as it does for the
weights and the KV cache), and MLX's matrix-vector product over the 2 MiB-page buffer (the decode
step's own read pattern); a probe reports the fastest: what the decode step's reads could get.
The machine's bandwidth can move by 2x from one minute to the next, so the vllm_metal process
probes right before and right after each batch-1 measurement (about a second each), and each
measurement is also compared with the bound of its own window: the faster of its two probes
(ratios.batch1_vs_bound_paired is the median of these). Separate processes probe before and after
all engines; the global bound (batch1_vs_bound) uses the fastest probe of the whole run.

With --quantized BITS the same model is converted by mlx_lm (``mlx_lm.convert -q``, group size
--group-size) and vllm_metal and mlx-lm run those files (transformers cannot read them, so that
line is left out); the bandwidth bound then counts the packed weights' bytes.

    python tools/bench_decode.py [--json OUT] [--tokens 32] [--repeats 3] [--model DIR]
                                 [--quantized BITS [--group-size 64]]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

# About 0.5B parameters, float32 (~2 GB): large enough that reading the weights dominates a step.
BENCH_CONFIG = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
                    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
                    rope_theta=10000.0, tie_word_embeddings=False)


def make_bench_model(out: str) -> str:
    if os.path.exists(os.path.join(out, "model.safetensors")) or \
            os.path.exists(os.path.join(out, "model.safetensors.index.json")):
        return out
    import torch
    import transformers
    from make_tiny_model import SPECIAL_TOKENS, build_tokenizer, save_tokenizer

    os.makedirs(out, exist_ok=True)
    tokenizer = build_tokenizer(0)
    save_tokenizer(tokenizer, out)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(),
                                      bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|eos|>"],
                                      pad_token_id=ids["<|pad|>"], **BENCH_CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(out)
    return out


def run_json(code: str, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=dict(os.environ, **(env or {})), timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(next(l for l in out.stdout.splitlines()[::-1] if l.startswith("{")))


# Defines make_probe(reads) for the VLLM and BANDWIDTH snippets; the buffers are allocated once
# (already faulted in when timed) and freed with the returned function.
PROBE = """
import os, time, torch, torch_mlx
import mlx.core as mx
def make_probe(reads):
    x = torch.ones(2**29)  # 2 GiB of float32 in 4 KiB pages (THP is opt-in here)
    # The same read over a buffer from torch_mlx's allocator, which asks for 2 MiB pages as it
    # does for the weights and the KV cache: the bandwidth the decode step's reads can get.
    y = torch.ones(2**29, device="mlx")
    y_cpu = torch_mlx._C.cpu_alias(y)
    # The same 2 MiB-page buffer read by MLX as one matrix-vector product (the decode step's own
    # access pattern, through the BLAS MLX uses): torch's sum is not always the fastest reader.
    w = torch_mlx.to_mlx(y).reshape(2**29 // 4096, 4096)
    v = mx.ones((1, 4096))
    def best_gb_s(read):
        times = []
        for _ in range(reads):
            start = time.perf_counter()
            read()
            times.append(time.perf_counter() - start)
        return 2**31 / min(times[1:]) / 1e9  # the first read is a warm-up
    def probe():
        # All cores for the sums, then back to the host process's own setting.
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count())
        res = {"4k_pages": best_gb_s(x.sum), "huge_pages": best_gb_s(y_cpu.sum),
               "gemv": best_gb_s(lambda: mx.eval(v @ w.T))}
        torch.set_num_threads(threads)
        return res
    return probe
"""

VLLM = """
import json, time
{probe}
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, dtype="float32", max_model_len=1024, max_num_seqs=32,
          max_num_batched_tokens=1024, seed=0)
prompt = {{"prompt_token_ids": list(range(10, 26))}}
def run(batch, tokens):
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([prompt] * batch, params, use_tqdm=False)
    return time.perf_counter() - start
def decode_rates(batch, n, probe=lambda: None):
    run(batch, 2)  # warm-up for this batch size
    rates = []
    for _ in range({repeats}):
        before = probe()
        t1, tn = run(batch, 1), run(batch, n)
        rates.append((batch * (n - 1) / (tn - t1), before, probe()))
    return rates
# Made after the engine process has started (MLX used here before would make vLLM spawn it
# instead of forking), freed before the batched runs.
bandwidth = make_probe(4)
pairs = [{{"decode_tok_s": r, "before_gb_s": b, "after_gb_s": a}}
         for r, b, a in decode_rates(1, {n}, lambda: max(bandwidth().values()))]
del bandwidth
res = {{"batch1_tok_s": max(p["decode_tok_s"] for p in pairs), "batch1_pairs": pairs,
        "c8_tok_s": max(r for r, _, _ in decode_rates(8, {n})),
        "c32_tok_s": max(r for r, _, _ in decode_rates(32, {n}))}}
long = {{"prompt_token_ids": [10 + i % 900 for i in range(512)]}}
llm.generate([long], SamplingParams(max_tokens=1), use_tqdm=False)
start = time.perf_counter()
llm.generate([long], SamplingParams(max_tokens=1), use_tqdm=False)
res["prefill_tok_s"] = 512 / (time.perf_counter() - start)
print(json.dumps(res))
"""

MLX_LM = """
import json, time
import torch_mlx  # the same BLAS selection as vllm_metal (torch_mlx.blas) before mlx loads
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler
model, tokenizer = load({model!r})
prompt = list(range(10, 26))
def single(tokens):
    start = time.perf_counter()
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens,
                             sampler=make_sampler(0.0)):
        pass
    return time.perf_counter() - start
def batched(batch, tokens):
    start = time.perf_counter()
    batch_generate(model, tokenizer, [prompt] * batch, max_tokens=tokens)
    return time.perf_counter() - start
def best(generate, batch, n, repeats):
    generate(batch, 2)  # warm-up
    rates = []
    for _ in range(repeats):
        t1, tn = generate(batch, 1), generate(batch, n)
        rates.append(batch * (n - 1) / (tn - t1))
    return max(rates)
def stepped(batch, n, repeats):
    # 32 sequences decoding, timed per step after every sequence has its first token (one
    # prefill, of 2-token prompts: mlx-lm's CPU prefill of 32 x 16 tokens at 4 bits takes many
    # minutes, and the context length hardly changes a decode step here)
    from mlx_lm.generate import BatchGenerator
    rates = []
    for _ in range(repeats):
        gen = BatchGenerator(model, stop_tokens=None)
        gen.insert([prompt[:2]] * batch, [n + 64] * batch)
        seen = set()
        while len(seen) < batch:
            seen.update(r.uid for r in gen.next_generated())
        start = time.perf_counter()
        for _ in range(n - 1):
            assert len(gen.next_generated()) == batch
        rates.append(batch * (n - 1) / (time.perf_counter() - start))
    return max(rates)
res = {{"batch1_tok_s": best(lambda batch, tokens: single(tokens), 1, {n}, {repeats})}}
res["batch_tok_s"] = (stepped(32, {n_batched}, {repeats_batched}) if {stepped}
                      else best(batched, 32, {n_batched}, {repeats_batched}))
print(json.dumps(res))
"""

HF = """
import json, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
ids = torch.arange(10, 26).unsqueeze(0)
def run(tokens):
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - start
run(2)
rates = []
for _ in range({repeats}):
    t1, tn = run(1), run({n})
    rates.append(({n} - 1) / (tn - t1))
print(json.dumps({{"batch1_tok_s": max(rates)}}))
"""

BANDWIDTH = PROBE + """
import json
res = make_probe(6)()
print(json.dumps({"bandwidth_gb_s": max(res.values()),
                  "bandwidth_4k_pages_gb_s": res["4k_pages"],
                  "bandwidth_huge_pages_gb_s": res["huge_pages"],
                  "bandwidth_gemv_gb_s": res["gemv"]}))
"""


def make_quantized_model(float_dir: str, bits: int, group_size: int) -> str:
    out = f"{float_dir}-{bits}bit-g{group_size}"
    if not os.path.exists(os.path.join(out, "config.json")):
        from mlx_lm.convert import convert

        convert(float_dir, out, quantize=True, q_bits=bits, q_group_size=group_size)
    return out


DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1}


def bytes_per_step(model_dir: str, context: int) -> float:
    """Bytes read per decode step at batch 1: every weight except the input embedding table
    (only one row is read), plus the float32 KV cache of `context` tokens."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                for key in f.keys():
                    if "embed_tokens" not in key:
                        t = f.get_slice(key)
                        n = 1
                        for s in t.get_shape():
                            n *= s
                        total += n * DTYPE_BYTES[t.get_dtype()]
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4 * context
    return total + kv


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "bench-llama-0.5b"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="decode rates are the best of this many measurements")
    parser.add_argument("--json")
    parser.add_argument("--quantized", type=int, choices=[2, 3, 4, 5, 6, 8],
                        help="run an mlx_lm.convert -q copy of the model at this many bits")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--mlx-lm-batched-tokens", type=int,
                        help="tokens per sequence for mlx-lm's 32-sequence rate (default --tokens; "
                        "4, measured once, with --quantized: MLX's CPU quantized matmul takes "
                        "tens of seconds per 32-sequence step there, so that rate is then timed "
                        "per decode step after one prefill of 2-token prompts)")
    args = parser.parse_args()
    model = make_bench_model(args.model)
    engines = (("vllm_metal", VLLM), ("mlx_lm", MLX_LM), ("hf_torch_cpu", HF))
    if args.quantized:
        model = make_quantized_model(model, args.quantized, args.group_size)
        engines = engines[:2]  # transformers cannot read mlx_lm's packed format
    n = args.tokens
    n_batched = args.mlx_lm_batched_tokens or (4 if args.quantized else n)
    repeats_batched = 1 if args.quantized and not args.mlx_lm_batched_tokens else args.repeats
    result = {"model": model, "mlx_lm_batched_tokens": n_batched}
    import torch_mlx  # noqa: F401  (for blas_info)
    import torch

    result["blas"] = torch.mlx.blas_info()
    probe_start = run_json(BANDWIDTH)["bandwidth_gb_s"]
    for key, code in engines:
        start = time.monotonic()
        try:
            result[key] = run_json(code.format(model=model, n=n, repeats=args.repeats,
                                               probe=PROBE, n_batched=n_batched,
                                               repeats_batched=repeats_batched,
                                               stepped=bool(args.quantized)))
        except Exception as e:  # noqa: BLE001  (reported in the output, not hidden)
            result[key] = {"error": str(e)[-2000:]}
        result[key]["wall_s"] = time.monotonic() - start
        if args.json:  # what is measured so far survives a later engine's failure or timeout
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    result.update(run_json(BANDWIDTH))  # the per-reader keys are the end probe's
    result["bandwidth_probe_start_gb_s"] = probe_start
    result["bandwidth_probe_end_gb_s"] = result["bandwidth_gb_s"]
    vm, ml = result["vllm_metal"], result["mlx_lm"]
    pairs = vm.get("batch1_pairs", [])
    probes = [probe_start, result["bandwidth_gb_s"]] + \
        [p[k] for p in pairs for k in ("before_gb_s", "after_gb_s")]
    result["bandwidth_gb_s"] = max(probes)
    per_step = bytes_per_step(model, 16 + n // 2)
    result["bytes_per_step"] = per_step
    result["bandwidth_bound_tok_s"] = result["bandwidth_gb_s"] * 1e9 / per_step
    for p in pairs:
        window_bound = max(p["before_gb_s"], p["after_gb_s"]) * 1e9 / per_step
        p["vs_bound"] = p["decode_tok_s"] / window_bound
    if "batch1_tok_s" in vm and "batch1_tok_s" in ml:
        result["ratios"] = {
            "batch1_vs_mlx_lm": vm["batch1_tok_s"] / ml["batch1_tok_s"],
            "c32_vs_mlx_lm_batch1": vm["c32_tok_s"] / ml["batch1_tok_s"],
            "c32_vs_mlx_lm_batched": vm["c32_tok_s"] / ml["batch_tok_s"],
            "batch1_vs_bound": vm["batch1_tok_s"] / result["bandwidth_bound_tok_s"],
        }
    if pairs:
        result.setdefault("ratios", {})["batch1_vs_bound_paired"] = \
            statistics.median(p["vs_bound"] for p in pairs)
    print(f"{'engine':14} {'batch1':>8} {'c8':>8} {'c32/batch':>10} {'prefill':>9}  tok/s")
    for key, _ in engines:
        r = result[key]
        print(f"{key:14} {r.get('batch1_tok_s', float('nan')):8.2f} "
              f"{r.get('c8_tok_s', float('nan')):8.2f} "
              f"{r.get('c32_tok_s', r.get('batch_tok_s', float('nan'))):10.2f} "
              f"{r.get('prefill_tok_s', float('nan')):9.1f}"
              + (f"  ERROR {r['error'][-200:]}" if "error" in r else ""))
    for i, p in enumerate(pairs, 1):
        print(f"vllm_metal batch 1, repeat {i}: {p['decode_tok_s']:.2f} tok/s between probes of "
              f"{p['before_gb_s']:.1f} and {p['after_gb_s']:.1f} GB/s -> "
              f"{p['vs_bound']:.0%} of that window's bound")
    print(f"bandwidth probes {min(probes):.1f}..{max(probes):.1f} GB/s over the run (start "
          f"{probe_start:.1f}, end {result['bandwidth_probe_end_gb_s']:.1f}: sum in 4 KiB pages "
          f"{result['bandwidth_4k_pages_gb_s']:.1f}, in 2 MiB pages "
          f"{result['bandwidth_huge_pages_gb_s']:.1f}, GEMV {result['bandwidth_gemv_gb_s']:.1f})"
          f" -> bound {result['bandwidth_bound_tok_s']:.2f} tok/s at batch 1 from the fastest; "
          f"BLAS {result['blas']}")
    if pairs:
        print(f"vllm_metal batch 1 vs bound: "
              f"{vm['batch1_tok_s'] / result['bandwidth_bound_tok_s']:.0%} (best rate, fastest "
              f"probe), {result['ratios']['batch1_vs_bound_paired']:.0%} paired (median)")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
