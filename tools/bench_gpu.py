"""Decode on MLX's GPU: vLLM with vllm_metal (offline LLM, compiled; vllm_metal_eager with
enforce_eager) and transformers' generate on "mlx" (eager and torch.compile(backend="mlx"))
against mlx-lm on the same MLX backend, with transformers on torch CUDA as a reference line.

    python3 tools/bench_gpu.py [--json OUT] [--tokens 128] [--repeats 3] [--layers 16]
                               [--hidden 1536] [--model DIR]

The model is a random ~0.5B Llama (hidden 1536, 16 layers, bf16), saved once. Every engine runs
in its own process. A decode rate is (N - 1) tokens over the time between generating N tokens
and 1 token after the same 31-token prompt, so prefill and set-up cancel; each rate is the best of
--repeats. The compiled run uses transformers' own compiled generation: a static KV cache and
``CompileConfig(backend="mlx")``, so each decode step is one captured graph of fixed shapes. Its
greedy tokens are compared with the eager run's (``compiled_matches_eager``). Without CUDA in
torch (MLX's CPU backend) the torch CUDA line is skipped and the rest still runs. vLLM's
``c32_tok_s`` (32 sequences decoded together) is set against mlx-lm's ``batch_tok_s``
(batch_generate of 32) in ``ratios``.
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

PROMPT = list(range(10, 41))  # 31 tokens

COMMON = """
import json, time, torch
PROMPT = {prompt!r}
def best_rate(generate, batch, n, repeats):
    generate(batch, 1), generate(batch, n)  # warm-up: compiles each shape the timing uses
    rates = []
    for _ in range(repeats):
        t1, tn = generate(batch, 1), generate(batch, n)
        rates.append(batch * (n - 1) / (tn - t1))
    return max(rates)
"""

MLX_LM = COMMON + """
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler
model, tokenizer = load({model!r})
def single(batch, tokens):
    start = time.perf_counter()
    for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens,
                             sampler=make_sampler(0.0)):
        pass
    return time.perf_counter() - start
def batched(batch, tokens):
    start = time.perf_counter()
    batch_generate(model, tokenizer, [PROMPT] * batch, max_tokens=tokens)
    return time.perf_counter() - start
print(json.dumps({{"device": str(mx.default_device()),
                  "batch1_tok_s": best_rate(single, 1, {n}, {repeats}),
                  "batch_tok_s": best_rate(batched, {batch}, {n}, {repeats})}}))
"""

TRANSFORMERS = COMMON + """
from transformers import AutoModelForCausalLM
from transformers.generation import CompileConfig
device, mode = {device!r}, {mode!r}
if device == "mlx":
    import torch_mlx  # noqa: F401  (also loaded by torch's autoload)
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.bfloat16).to(device).eval()
kwargs = dict(do_sample=False)
if mode == "compiled":
    if device == "mlx":
        config = CompileConfig(backend="mlx", fullgraph=False, dynamic=False, mode=None)
        config._compile_all_devices = True  # transformers compiles on its own devices only
    else:  # transformers' default: inductor, CUDA graphs ("reduce-overhead"), one full graph
        config = CompileConfig()
    kwargs.update(cache_implementation="static", compile_config=config)
else:
    kwargs.update(disable_compile=True)
def generate(batch, tokens, return_ids=False):
    ids = torch.tensor([PROMPT] * batch, device=device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, **kwargs)
    first = out[0, len(PROMPT):].tolist()  # a host read: the work is finished
    elapsed = time.perf_counter() - start
    return first if return_ids else elapsed
res = {{"batch1_tok_s": best_rate(generate, 1, {n}, {repeats}),
        "tokens": generate(1, 32, return_ids=True)}}
if {batch}:
    res["batch_tok_s"] = best_rate(generate, {batch}, {n}, {repeats})
print(json.dumps(res))
"""

# vLLM with this plugin, default settings (compiled; enforce_eager for the "_eager" engine): an
# offline LLM, greedy, the same prompt; "c32" is 32 sequences decoded together (#16's key).
VLLM_METAL = COMMON + """
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, dtype="bfloat16", max_model_len=1024, max_num_seqs=32,
          max_num_batched_tokens=1024, seed=0, enforce_eager={eager},
          async_scheduling={async_sched})
prompt = {{"prompt_token_ids": PROMPT}}
def generate(batch, tokens, return_ids=False):
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens,
                            ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt] * batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return list(out[0].outputs[0].token_ids) if return_ids else elapsed
res = {{"batch1_tok_s": best_rate(generate, 1, {n}, {repeats}),
        "tokens": generate(1, 32, return_ids=True)}}
if {batch}:
    res["c32_tok_s"] = best_rate(generate, {batch}, {n}, {repeats})
print(json.dumps(res))
"""

BENCH_LLAMA = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
                   rope_theta=10000.0, tie_word_embeddings=False)


def make_model(out: str, layers: int, hidden: int) -> str:
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers
    from make_tiny_model import SPECIAL_TOKENS, build_tokenizer, save_tokenizer

    os.makedirs(out, exist_ok=True)
    tokenizer = build_tokenizer(0)
    save_tokenizer(tokenizer, out)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    shape = dict(BENCH_LLAMA, num_hidden_layers=layers, hidden_size=hidden,
                 intermediate_size=hidden * 8 // 3 // 64 * 64 or 64)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(),
                                      bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|eos|>"],
                                      pad_token_id=ids["<|pad|>"], **shape)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(out)
    return out


def run_engine(code: str, timeout: float, env: dict | None = None) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr[-3000:]}
    return json.loads(next(l for l in done.stdout.splitlines()[::-1] if l.startswith("{")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="batched generation (0: skip)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--model", help="checkpoint folder (made if missing)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds, each engine")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds for the whole run (0: none): an engine gets what is left, "
                             "later ones are reported as skipped; the JSON is rewritten after "
                             "each engine, so a device visit cut short keeps what finished")
    parser.add_argument("--engines", default="mlx_lm,vllm_metal,torch_cuda,mlx_eager,mlx_compiled",
                        help="comma-separated; each runs torch_mlx's default launch mode "
                             "(TORCH_MLX_ASYNC=auto: launched, not waited for, on a GPU) unless "
                             "named for one: mlx_compiled_sync / vllm_metal_sync wait for each "
                             "result (=0), mlx_compiled_async / vllm_metal_async launch (=1); also "
                             "vllm_metal_eager, vllm_metal_async_sched (vLLM's async scheduling "
                             "with TORCH_MLX_ASYNC=1); mlx_compiled_nopatterns: "
                             "TORCH_MLX_COMPILE_PATTERNS=0; mlx_compiled_nokernel: "
                             "TORCH_MLX_DECODE_KERNEL=0")
    args = parser.parse_args()

    import torch

    model = make_model(args.model or os.path.join(ROOT, "models", f"bench-llama-{args.layers}x"
                                                  f"{args.hidden}-bf16"), args.layers, args.hidden)
    fmt = dict(model=model, n=args.tokens, repeats=args.repeats, batch=args.batch, prompt=PROMPT)
    engines = {
        "mlx_lm": MLX_LM.format(**fmt),
        "torch_cuda": TRANSFORMERS.format(device="cuda", mode="eager", **fmt),
        # the same compiled generate on torch CUDA: what transformers' own loop allows there
        "torch_cuda_compiled": TRANSFORMERS.format(device="cuda", mode="compiled",
                                                   **dict(fmt, batch=0)),
        "mlx_eager": TRANSFORMERS.format(device="mlx", mode="eager", **dict(fmt, batch=0)),
        "mlx_compiled": TRANSFORMERS.format(device="mlx", mode="compiled", **dict(fmt, batch=0)),
        # the graph lowered op by op, as traced (torch_mlx.compile_patterns off): the A/B of
        # the rewrites of written-out RMSNorm, rotary, repeated KV heads
        "mlx_compiled_nopatterns": TRANSFORMERS.format(device="mlx", mode="compiled",
                                                       **dict(fmt, batch=0)),
        # the masked decode attention as MLX's fallback composition (on MLX CUDA), not the
        # kernel of torch_mlx/kernels/decode_attention.py
        "mlx_compiled_nokernel": TRANSFORMERS.format(device="mlx", mode="compiled",
                                                     **dict(fmt, batch=0)),
        # transformers' eager ops around the compiled step (~500 a step) launched unwaited
        "mlx_compiled_async": TRANSFORMERS.format(device="mlx", mode="compiled",
                                                  **dict(fmt, batch=0)),
        "vllm_metal": VLLM_METAL.format(eager=False, async_sched=False, **fmt),
        "vllm_metal_eager": VLLM_METAL.format(eager=True, async_sched=False, **fmt),
        # each eager result (and the compiled forward) waited for: the default before the ninth
        # GPU visit, and still on MLX's CPU backend
        "vllm_metal_sync": VLLM_METAL.format(eager=False, async_sched=False, **fmt),
        "mlx_compiled_sync": TRANSFORMERS.format(device="mlx", mode="compiled",
                                                 **dict(fmt, batch=0)),
        # eager ops launched without waiting for the GPU (csrc/launch.h)
        "vllm_metal_async": VLLM_METAL.format(eager=False, async_sched=False, **fmt),
        # and vLLM's async scheduling: the engine's host work between steps overlaps the device
        "vllm_metal_async_sched": VLLM_METAL.format(eager=False, async_sched=True, **fmt),
    }
    env = {"vllm_metal_async": {"TORCH_MLX_ASYNC": "1"},
           "vllm_metal_sync": {"TORCH_MLX_ASYNC": "0"},
           "mlx_compiled_sync": {"TORCH_MLX_ASYNC": "0"},
           "mlx_compiled_async": {"TORCH_MLX_ASYNC": "1"},
           "mlx_compiled_nopatterns": {"TORCH_MLX_COMPILE_PATTERNS": "0"},
           "mlx_compiled_nokernel": {"TORCH_MLX_DECODE_KERNEL": "0"},
           "vllm_metal_async_sched": {"TORCH_MLX_ASYNC": "1"}}
    result = {"model": model, "tokens": args.tokens, "prompt_tokens": len(PROMPT)}
    end = time.monotonic() + args.deadline if args.deadline else None
    for name in args.engines.split(","):
        left = args.timeout if end is None else min(args.timeout, end - time.monotonic())
        if name.startswith("torch_cuda") and not torch.cuda.is_available():
            result[name] = {"skipped": "torch has no CUDA device here"}
        elif left < 30:
            result[name] = {"skipped": f"--deadline {args.deadline:.0f} s reached"}
        else:
            result[name] = run_engine(engines[name], left, env.get(name))
        print(name, json.dumps(result[name])[:400], flush=True)
        summarize(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=1))
    return 0 if all("error" not in v for v in result.values() if isinstance(v, dict)) else 1


def summarize(result: dict) -> None:
    """Token agreement between engines and tok/s ratios against mlx-lm, of what has run."""
    eager, compiled, peer = (result.get(k, {}) for k in ("mlx_eager", "mlx_compiled", "mlx_lm"))
    if "tokens" in eager and "tokens" in compiled:
        result["compiled_matches_eager"] = eager["tokens"] == compiled["tokens"]
    if "tokens" in result.get("vllm_metal", {}) and "tokens" in result.get(
            "vllm_metal_async_sched", {}):
        result["async_sched_matches_vllm_metal"] = (result["vllm_metal"]["tokens"]
                                                    == result["vllm_metal_async_sched"]["tokens"])
    if "tokens" in eager and "tokens" in result.get("vllm_metal", {}):
        result["vllm_metal_matches_mlx_eager"] = eager["tokens"] == result["vllm_metal"]["tokens"]
    if "batch1_tok_s" in peer:
        result["ratios"] = {f"{k}_vs_mlx_lm_batch1": round(result[k]["batch1_tok_s"]
                                                           / peer["batch1_tok_s"], 3)
                            for k in ("mlx_eager", "mlx_compiled", "mlx_compiled_nopatterns",
                                      "mlx_compiled_nokernel",
                                      "mlx_compiled_async",
                                      "mlx_compiled_sync", "torch_cuda", "torch_cuda_compiled",
                                      "vllm_metal",
                                      "vllm_metal_eager", "vllm_metal_async", "vllm_metal_sync",
                                      "vllm_metal_async_sched")
                            if "batch1_tok_s" in result.get(k, {})}
        for k in ("vllm_metal", "vllm_metal_eager", "vllm_metal_async", "vllm_metal_sync",
                  "vllm_metal_async_sched"):  # #16: 32 sequences vs mlx-lm batched
            if "c32_tok_s" in result.get(k, {}) and "batch_tok_s" in peer:
                result["ratios"][f"{k}_c32_vs_mlx_lm_batch"] = round(
                    result[k]["c32_tok_s"] / peer["batch_tok_s"], 3)

if __name__ == "__main__":
    sys.exit(main())
