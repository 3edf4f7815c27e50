"""Where a quantized model on the GPU parts from its reference: vLLM on "mlx" and mlx-lm, each
on MLX's GPU and on its CPU, on the same files.

    python3 tools/gpu_quantized_model_probe.py [--bits 4] [--group 64] [--json OUT]

On the H100 every quantized model of tests/vllm_metal diverged from mlx-lm, while
tools/gpu_quantized_probe.py found every ``mx.quantized_matmul`` result right against float64
(for the shapes it tries). This makes the tiny random Llama of the tests, quantizes it with
mlx_lm.convert, and runs greedy decoding with the top-5 log-probabilities at every step, each run
in its own subprocess, side by side (KINDS below). The float checkpoint goes through the same
runs as a control. For each pair (PAIRS) it reports how many prompts agree, where the first
divergence is with the reference's top-2 gap there, and how far the two runs' gaps between the
reference's top two tokens differ over the steps where both agree: the run that sits apart
from the others is the faulty one, and the variants say what makes it so (batching, the
compiled graph, TF32).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

# the runs: mlx-lm on the GPU (IEEE float32 GEMMs, as in a torch_mlx process; and with TF32),
# mlx-lm on MLX's CPU; vLLM compiled and batched (8 sequences), eager, one sequence at a time
# (decode rows M = 1, as mlx-lm's), and on MLX's CPU backend
KINDS = ("mlx_lm:gpu", "mlx_lm:gpu-tf32", "mlx_lm:cpu", "vllm", "vllm:eager", "vllm:seq1",
         "vllm:cpu")
# (run, reference): everything against mlx-lm on the CPU, then the GPU runs against each other
PAIRS = [(k, "mlx_lm:cpu") for k in KINDS if k != "mlx_lm:cpu"] + [
    ("vllm", "mlx_lm:gpu"), ("vllm:seq1", "mlx_lm:gpu"), ("vllm", "vllm:cpu")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 24


def _model_maker():
    spec = importlib.util.spec_from_file_location(
        "make_tiny_model", os.path.join(ROOT, "tools", "make_tiny_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_mlx_lm(model: str, device: str, prompts: list[list[int]]) -> list[dict]:
    import mlx.core as mx

    if device == "cpu":  # before mlx_lm's import: its generation stream is made on import
        mx.set_default_device(mx.cpu)
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    net, tokenizer = load(model)
    eos = sorted(tokenizer.eos_token_ids)

    def suppress_eos(tokens, logits):  # vLLM's min_tokens does the same
        logits[..., eos] = -float("inf")
        return logits

    out = []
    for ids in prompts:
        steps = []
        for token, logprobs in generate_step(mx.array(ids), net, max_tokens=MAX_TOKENS,
                                             logits_processors=[suppress_eos]):
            top = mx.argsort(-logprobs)[:5].tolist()
            steps.append({"token": int(token),
                          "top": {str(t): float(logprobs[t].item()) for t in top}})
        out.append(steps)
    return out


def child_vllm(model: str, variant: str, prompts: list[list[int]]) -> list[dict]:
    """variant: "" (batched, compiled), "eager", "seq1" (one sequence at a time, as mlx-lm
    decodes), "cpu" (MLX's CPU backend in the worker)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if variant == "cpu":
        os.environ["VLLM_MLX_DEVICE"] = "cpu"
    import vllm
    from vllm import SamplingParams

    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    # mlx-lm computes in the files' dtype; vLLM's "auto" would downcast float32 to bfloat16 on
    # a GPU (the platform's preferred type) and to nothing on MLX's CPU backend
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    llm = vllm.LLM(model=model, dtype=dtype, max_model_len=512,
                   max_num_seqs=1 if variant == "seq1" else 8, seed=0,
                   enforce_eager=variant in ("eager", "cpu"))
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0,
                            logprobs=5)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    out = []
    for r in results:
        completion = r.outputs[0]
        out.append([{"token": int(t), "top": {str(k): float(v.logprob) for k, v in lp.items()}}
                    for t, lp in zip(completion.token_ids, completion.logprobs)])
    return out


def compare(a: list[list[dict]], b: list[list[dict]]) -> dict:
    """b is the reference: first divergence per prompt (with b's top-2 gap there) and the
    largest difference of b's top-2 gap as the two runs see it, over the agreeing steps."""
    agree, firsts, max_diff = 0, [], 0.0
    for pa, pb in zip(a, b):
        first = None
        for i, (sa, sb) in enumerate(zip(pa, pb)):
            # the reference's top-1 minus top-2 in both runs: free of each run's normalisation
            # (mlx-lm's log-softmax leaves the suppressed EOS out, vLLM's raw logprobs keep it)
            t1, t2 = sorted(sb["top"], key=sb["top"].get, reverse=True)[:2]
            if t1 in sa["top"] and t2 in sa["top"]:
                max_diff = max(max_diff, abs((sa["top"][t1] - sa["top"][t2])
                                             - (sb["top"][t1] - sb["top"][t2])))
            if sa["token"] != sb["token"]:
                vals = sorted(sb["top"].values(), reverse=True)
                first = {"step": i, "got": sa["token"], "ref": sb["token"],
                         "ref_top2_gap": round(vals[0] - vals[1], 5)}
                break
        agree += first is None
        firsts.append(first)
    return {"prompts_agreeing": f"{agree}/{len(b)}", "max_top2_gap_diff": round(max_diff, 6),
            "divergences": [f for f in firsts if f]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--json")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds each run may take (the report names the ones cut off)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "PROMPTS_JSON"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, prompts_file = args.child
        with open(prompts_file) as f:
            prompts = json.load(f)
        engine, _, variant = kind.partition(":")
        result = child_vllm(model, variant, prompts) if engine == "vllm" else \
            child_mlx_lm(model, variant, prompts)
        print("RESULT " + json.dumps(result))
        return

    maker = _model_maker()
    work = tempfile.mkdtemp(prefix="qmodel-probe-")
    float_dir = maker.make_model("LlamaForCausalLM", os.path.join(work, "float"), seed=0)
    quant_dir = os.path.join(work, f"q{args.bits}g{args.group}")
    from mlx_lm.convert import convert
    convert(float_dir, quant_dir, quantize=True, q_bits=args.bits, q_group_size=args.group)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(float_dir)
    sentences = maker.training_text(0)[3000:]
    texts = ["Hello", "Hello, how are you today?"] + [
        " ".join(sentences[a:b]) for a, b in [(0, 1), (1, 3), (3, 6), (6, 11), (11, 19)]]
    prompts_file = os.path.join(work, "prompts.json")
    with open(prompts_file, "w") as f:
        json.dump([tok(t)["input_ids"] for t in texts], f)

    runs = {(m, k): None for m in ("float", "quantized") for k in KINDS}

    def run(key):
        model = float_dir if key[0] == "float" else quant_dir
        env = dict(os.environ)
        # mlx-lm on the GPU: in float32 GEMM mode as torch_mlx sets it (IEEE, its default), and
        # with MLX's own default (TF32), to see what TF32 alone moves
        env["MLX_ENABLE_TF32"] = "1" if key[1] == "mlx_lm:gpu-tf32" else "0"
        try:
            p = subprocess.run([sys.executable, __file__, "--child", key[1], model, prompts_file],
                               capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return key, {"error": f"timed out after {args.timeout} s"}
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return key, json.loads(line[7:])
        return key, {"error": (p.stderr or p.stdout)[-3000:]}

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        for key, result in pool.map(run, list(runs)):
            runs[key] = result
    report = {"bits": args.bits, "group": args.group}
    for m in ("float", "quantized"):
        r = {k: runs[(m, k)] for k in KINDS}
        report[m] = {k: {"error": v["error"]} for k, v in r.items() if isinstance(v, dict)}
        ok = {k: v for k, v in r.items() if not isinstance(v, dict)}
        for a, b in PAIRS:
            if a in ok and b in ok:
                report[m][f"{a} vs {b}"] = compare(ok[a], ok[b])
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
