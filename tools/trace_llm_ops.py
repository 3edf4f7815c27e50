"""Find the aten ops that vLLM's stock models and sampler call; write tests/torch_mlx/llm_ops.py.

    .venv/bin/python tools/trace_llm_ops.py [--out tests/torch_mlx/llm_ops.py]

Three traces, each recording every op that reaches torch's dispatcher (a TorchDispatchMode sees
ops after autograd and after CompositeImplicitAutograd decompositions, i.e. what a backend must
implement):

1. vLLM (CPU, torch_mlx not loaded): the model classes vLLM picks for tiny checkpoints made by
   tools/make_tiny_model.py (Llama, Qwen2, Qwen3, Mistral, Gemma; seed 0, in a temporary
   directory), loaded by vLLM's own loader, in float32 and
   bfloat16: a prefill of two sequences, the runner's selection of the last token of each
   (hidden_states[logits_indices]), compute_logits, and a decode step. Custom ops run their
   forward_native (the vllm_metal platform may override some with MLX kernels, but the native
   path is the reference and the fallback). The platform is vLLM's CPU platform presented as an
   out-of-tree one, so the code takes the branches a non-CPU, non-CUDA platform such as Metal
   takes (F.linear instead of the CPU GEMM dispatch, argmax instead of the CPU greedy kernel).
   Attention itself is the platform backend's (vllm::unified_attention_with_output): it runs
   with no metadata here and its inside is not an aten concern; it is listed under NON_ATEN_OPS.
2. vLLM's Sampler: greedy, random with temperature / top-k / top-p / per-request seeds,
   logprobs, penalties, allowed-token mask, bad words, and the built-in logits processors
   (min_p, logit_bias, min_tokens).
3. transformers (device "mlx" with the CPU fallback on, so the ops are the ones that reach the
   mlx device, e.g. scaled_dot_product_attention's math decomposition rather than the CPU's
   flash kernel): the same checkpoints' forward with a padded batch, and a small BertModel.

Then every op_db OpInfo's samples (float32, else int64 or bool) are traced on the CPU to find,
for each recorded aten op, the OpInfo that tests it most directly (see best_opinfo):
LLM_OPINFOS is what tools/conformance.py --llm and the CI subset check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                 "GemmaForCausalLM"]


def _op_name(func) -> tuple[str, str]:
    """(namespace, registry-style name): ("aten", "add.Tensor"), ("aten", "mm")."""
    namespace, base = func._schema.name.split("::")
    overload = func._overloadname
    return namespace, base if overload == "default" else f"{base}.{overload}"


# Non-aten ops whose inside belongs to the platform (its attention backend), not to aten.
PLATFORM_OPS = {"vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"}


def recorder(sink: dict, source_of):
    """A TorchDispatchMode adding ``source_of()`` to ``sink[(namespace, name)]`` for each op
    that a backend receives."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            namespace, name = _op_name(func)
            if namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"aten::{name}", "CompositeImplicitAutograd"):
                # Under inference_mode a composite op reaches this mode undecomposed, but a
                # backend only ever receives its decomposition: record that instead.
                with self:
                    return func.decompose(*args, **kwargs)
            sink.setdefault((namespace, name), set()).add(source_of())
            if namespace != "aten" and f"{namespace}::{name.split('.')[0]}" not in PLATFORM_OPS:
                # A custom op written in torch (vllm_ir::rms_norm is CompositeExplicitAutograd):
                # record its aten ops too, by running that kernel directly (calling ``func``
                # would come back here).
                key = "CompositeExplicitAutograd" if torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"{namespace}::{name}", "CompositeExplicitAutograd") else "CPU"
                with self:
                    return func._op_dk(getattr(torch._C.DispatchKey, key), *args, **kwargs)
            return func(*args, **kwargs)

    return OpRecorder()


# ----------------------------------------------------------------------------------------------
# 1 + 2: vLLM models and sampler, on the CPU


def trace_vllm(models_dir: str) -> dict:
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import torch
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import PlatformEnum

    class OutOfTreeCpu(CpuPlatform):
        """vLLM's CPU platform, except that is_cpu() is False: the branches Metal takes."""
        _enum = PlatformEnum.OOT

    vllm.platforms._current_platform = OutOfTreeCpu()  # what `current_platform` resolves to
    # vLLM's loader empties the accelerator cache; there is no accelerator in this process.
    torch.accelerator.empty_cache = lambda: None

    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (ensure_model_parallel_initialized,
                                                 init_distributed_environment)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.model_loader import get_model

    sink: dict = {}
    source = ["?"]
    config = None
    for arch in ARCHITECTURES:
        for dtype in ("float32", "bfloat16"):
            config = EngineArgs(model=os.path.join(models_dir, arch), dtype=dtype,
                                enforce_eager=True, max_model_len=256, max_num_seqs=8,
                                compilation_config={"custom_ops": ["none"]}
                                ).create_engine_config()
            with set_current_vllm_config(config):
                if not torch.distributed.is_initialized():
                    init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                                 distributed_init_method="tcp://127.0.0.1:29577",
                                                 backend="gloo")
                    ensure_model_parallel_initialized(1, 1)
                model = get_model(vllm_config=config)
                arch = type(model).__name__
                source[0] = f"vllm:{arch}"
                prompt_lens = [7, 5]
                ids = torch.randint(3, 1000, (sum(prompt_lens),))
                positions = torch.cat([torch.arange(n) for n in prompt_lens])
                logits_indices = torch.tensor([6, 11])
                with torch.inference_mode(), set_forward_context(None, config), \
                        recorder(sink, lambda: source[0]):
                    hidden = model(ids, positions)
                    model.compute_logits(hidden[logits_indices])
                    hidden = model(torch.tensor([17, 23]), torch.tensor([7, 5]))  # decode
                    model.compute_logits(hidden)
            print(f"traced vllm {arch} {dtype}", file=sys.stderr)
    with set_current_vllm_config(config):
        source[0] = "vllm:Sampler"
        trace_sampler(sink, config, source)
    return sink


def trace_sampler(sink: dict, config, source) -> None:
    import torch
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import (LogitBiasLogitsProcessor,
                                                         MinPLogitsProcessor,
                                                         MinTokensLogitsProcessor)
    from vllm.v1.sample.logits_processor.interface import BatchUpdate
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    batch, vocab = 4, 1024
    sampler = Sampler()
    # What an out-of-tree platform gets (the CPU platform would pick forward_cpu).
    sampler.topk_topp_sampler.forward = sampler.topk_topp_sampler.forward_native

    def metadata(**overrides):
        base = dict(
            temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None,
            generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
            frequency_penalties=torch.zeros(batch), presence_penalties=torch.zeros(batch),
            repetition_penalties=torch.ones(batch), output_token_ids=[[] for _ in range(batch)],
            allowed_token_ids_mask=None, bad_words_token_ids={},
            logitsprocs=LogitsProcessors())
        base.update(overrides)
        return SamplingMetadata(**base)

    random = dict(temperature=torch.tensor([0.8, 1.0, 0.7, 1.2]), all_greedy=False,
                  all_random=True)
    seeded = {1: torch.Generator().manual_seed(7)}
    params = SamplingParams(min_p=0.05, logit_bias={3: 2.0, 9: -1.0}, min_tokens=4,
                            stop_token_ids=[2])
    processors = []
    for cls in (MinPLogitsProcessor, LogitBiasLogitsProcessor, MinTokensLogitsProcessor):
        proc = cls(config, torch.device("cpu"), False)
        proc.update_state(BatchUpdate(batch_size=batch, removed=[], moved=[],
                                      added=[(i, params, [5, 6], [7]) for i in range(batch)]))
        processors.append(proc)
    cases = [
        metadata(),
        metadata(max_num_logprobs=5),
        metadata(**random),
        metadata(**random, top_k=torch.tensor([5, 10, 1024, 3]), generators=seeded),
        metadata(**random, top_p=torch.tensor([0.9, 0.5, 1.0, 0.8]), max_num_logprobs=3),
        metadata(**random, top_k=torch.tensor([5, 10, 1024, 3]),
                 top_p=torch.tensor([0.9, 0.5, 1.0, 0.8])),
        metadata(temperature=torch.tensor([0.0, 0.8, 0.0, 1.0]), all_greedy=False,
                 all_random=False, top_p=torch.tensor([1.0, 0.9, 1.0, 0.7])),
        metadata(no_penalties=False, prompt_token_ids=torch.randint(0, vocab, (batch, 6)),
                 output_token_ids=[[1, 2], [3], [], [4, 4, 5]],
                 frequency_penalties=torch.full((batch,), 0.5),
                 presence_penalties=torch.full((batch,), 0.3),
                 repetition_penalties=torch.full((batch,), 1.2)),
        metadata(allowed_token_ids_mask=torch.rand(batch, vocab) < 0.5,
                 bad_words_token_ids={0: [[5, 6]], 2: [[9]]},
                 output_token_ids=[[5], [], [1], []]),
        metadata(**random, logitsprocs=LogitsProcessors(processors)),
    ]
    with torch.inference_mode(), recorder(sink, lambda: source[0]):
        for dtype in (torch.float32, torch.bfloat16):
            for case in cases:
                sampler(torch.randn(batch, vocab, dtype=dtype), case)
    print("traced vllm Sampler", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# 3: transformers, on "mlx" with the CPU fallback


def trace_transformers(models_dir: str) -> dict:
    import warnings

    import torch
    import torch_mlx
    import transformers

    warnings.simplefilter("ignore")
    torch_mlx.set_fallback(True)
    sink: dict = {}
    source = ["?"]
    torch.manual_seed(0)
    models = [transformers.AutoModelForCausalLM.from_pretrained(os.path.join(models_dir, arch))
              for arch in ARCHITECTURES]
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64))
    for model in models + [bert]:
        model = model.eval().to("mlx")
        source[0] = f"transformers:{type(model).__name__}"
        ids = torch.randint(3, 500, (2, 9)).to("mlx")
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0  # left padding
        with torch.no_grad(), recorder(sink, lambda: source[0]):
            model(input_ids=ids, attention_mask=mask.to("mlx"))
        print(f"traced {source[0]}", file=sys.stderr)
    return sink


# ----------------------------------------------------------------------------------------------
# Which OpInfo exercises which aten op


def opinfo_coverage() -> dict:
    """OpInfo full name -> set of aten ops its samples call (on the CPU)."""
    import warnings

    import torch
    from torch.testing._internal.common_methods_invocations import op_db

    warnings.simplefilter("ignore")
    coverage = {}
    for op in op_db:
        # float32 samples, or the op's integer / bool ones if it has no float32 (bitwise ops)
        dtype = next((d for d in (torch.float32, torch.int64, torch.bool)
                      if d in op.supported_dtypes("cpu")), None)
        if dtype is None:
            continue
        sink: dict = {}
        samples = list(op.sample_inputs("cpu", dtype))
        with recorder(sink, lambda: op.full_name):
            for sample in samples:
                try:
                    op(sample.input, *sample.args, **sample.kwargs)
                except Exception:  # a sample the CPU itself rejects exercises nothing
                    pass
        coverage[op.full_name] = {name for (ns, name) in sink if ns == "aten"}
    return coverage


# aten ops whose OpInfo is named differently; the rest match by name, in-place and out=
# overloads by their functional op's name. _to_copy: every "to" sample casts to float64, which
# mlx rejects, while "bfloat16" casts float32 -> bfloat16 as vLLM does.
_OPINFO_ALIASES = {"_to_copy": "bfloat16", "_unsafe_view": "view", "_local_scalar_dense": "item",
                   "index": "__getitem__"}


def _short(opinfo_name: str) -> str:
    """The op an OpInfo is about: 'nn.functional.gelu' -> 'gelu', 'div.floor_rounding' -> 'div',
    'torch.ops.aten._safe_softmax.default' -> '_safe_softmax'."""
    for prefix in ("torch.ops.aten.", "nn.functional.", "special.", "linalg.", "fft."):
        if opinfo_name.startswith(prefix):
            return opinfo_name[len(prefix):].split(".")[0]
    return opinfo_name.split(".")[0]


def _functional(aten_op: str) -> str:
    """'div_.Tensor' -> 'div.Tensor', 'cumsum.out' -> 'cumsum', 'where.self_out' -> 'where.self'."""
    base, _, overload = aten_op.partition(".")
    overload = "" if overload == "out" else overload.removesuffix("_out")
    return base.rstrip("_") + (f".{overload}" if overload else "")


def best_opinfo(aten_op: str, coverage: dict) -> tuple[str | None, bool]:
    """(the OpInfo that tests ``aten_op`` most directly, whether its samples call that exact
    overload). By name first (the op, the functional op of an in-place or out= overload, the
    public name of an underscored one), preferring the variant whose samples call the overload
    or its functional form. None when no OpInfo is named after it (alias, detach_, ...): such
    ops are checked by having an "mlx" kernel, not by an unrelated OpInfo that happens to call
    them."""
    base = aten_op.split(".")[0]
    wanted = [base, base.rstrip("_"), base.lstrip("_"), _OPINFO_ALIASES.get(base)]
    exact = {name for name, ops in coverage.items() if aten_op in ops}
    functional = {name for name, ops in coverage.items() if _functional(aten_op) in ops}
    for want in filter(None, wanted):
        named = [name for name in coverage if _short(name) == want]
        if named:
            best = min(named, key=lambda n: (n not in exact, n not in functional, "." in n,
                                             len(coverage[n]), n))
            return best, best in exact
    return None, False


# ----------------------------------------------------------------------------------------------


def _run_phase(phase: str, env: dict, models_dir: str, keep: str | None) -> dict:
    saved = os.path.join(keep, f"{phase}.json") if keep else None
    if saved and os.path.exists(saved):  # --keep: reuse a trace made earlier
        with open(saved) as f:
            return json.load(f)
    out = subprocess.run([sys.executable, __file__, "--phase", phase, "--models", models_dir],
                         env=env, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if saved:
        with open(saved, "w") as f:
            json.dump(result, f)
    return result


def _to_json(sink: dict) -> dict:
    return {f"{ns}::{name}": sorted(srcs) for (ns, name), srcs in sink.items()}


def write_module(path: str, vllm_ops: dict, hf_ops: dict, coverage: dict) -> None:
    def split(ops):
        aten = {k.split("::", 1)[1]: v for k, v in ops.items() if k.startswith("aten::")}
        other = {k: v for k, v in ops.items() if not k.startswith("aten::")}
        return aten, other

    llm_aten, llm_other = split(vllm_ops)
    hf_aten, hf_other = split(hf_ops)
    best = {op: best_opinfo(op, coverage) for op in sorted(set(llm_aten) | set(hf_aten))}
    opinfo_for = {op: info for op, (info, _) in best.items()}
    llm_opinfos = sorted({opinfo_for[op] for op in llm_aten if opinfo_for[op]})
    hf_opinfos = sorted({opinfo_for[op] for op in hf_aten if opinfo_for[op]} - set(llm_opinfos))

    def mapping_line(op):
        info, exact = best[op]
        note = "" if exact else "  # its samples do not call this exact overload" if info \
            else "  # no OpInfo is named after it"
        return f"    {op!r}: {info!r},{note}\n"

    def table(ops):
        return "".join(f"    {name!r}: {tuple(srcs)!r},\n" for name, srcs in sorted(ops.items()))

    def names(items):
        return "".join(f"    {n!r},\n" for n in items)

    text = f'''"""The aten ops that stock vLLM models and vLLM's sampler call, and the OpInfos that test them.

GENERATED by tools/trace_llm_ops.py (see its docstring for how); regenerate, do not edit by hand.
tools/conformance.py --llm checks that all of LLM_OPINFOS pass and that every LLM_ATEN_OPS
overload has an "mlx" kernel; tests/torch_mlx/test_opinfo.py runs LLM_OPINFOS in the CI subset.

LLM_ATEN_OPS: vLLM's Llama/Qwen2/Qwen3/Mistral/Gemma forward passes (float32 and bfloat16) and
its Sampler, traced on the CPU. TRANSFORMERS_ATEN_OPS: the same checkpoints (and a BertModel)
in transformers, traced on "mlx", minus the ops already in LLM_ATEN_OPS.
"""

# aten overload (registry spelling) -> where it was seen
LLM_ATEN_OPS = {{
{table(llm_aten)}}}

# Non-aten ops in the vLLM forward pass: the platform's attention backend provides these.
NON_ATEN_OPS = {{
{table({**llm_other, **hf_other})}}}

TRANSFORMERS_ATEN_OPS = {{
{table({k: v for k, v in hf_aten.items() if k not in llm_aten})}}}

# aten overload -> the op_db OpInfo that tests it most directly (tools/trace_llm_ops.py's
# best_opinfo); None: only its "mlx" kernel is checked
OPINFO_FOR_ATEN_OP = {{
{"".join(mapping_line(op) for op in opinfo_for)}}}

# The OpInfos that must all pass for vLLM's models and sampler (tools/conformance.py --llm).
LLM_OPINFOS = (
{names(llm_opinfos)})

# Further OpInfos for the transformers paths.
TRANSFORMERS_OPINFOS = (
{names(hf_opinfos)})
'''
    with open(path, "w") as f:
        f.write(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "torch_mlx", "llm_ops.py"))
    parser.add_argument("--phase", choices=["vllm", "transformers", "coverage"],
                        help=argparse.SUPPRESS)  # internal: one trace per fresh process
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--keep", metavar="DIR",
                        help="save each trace in DIR and reuse the ones already there (to "
                             "iterate on the OpInfo mapping without tracing again)")
    args = parser.parse_args()
    if args.phase == "vllm":
        print(json.dumps(_to_json(trace_vllm(args.models))))
        return 0
    if args.phase == "transformers":
        print(json.dumps(_to_json(trace_transformers(args.models))))
        return 0
    if args.phase == "coverage":
        print(json.dumps({k: sorted(v) for k, v in opinfo_coverage().items()}))
        return 0
    # vLLM must not see torch_mlx (its accelerator would be "mlx"); the others need it.
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    with tempfile.TemporaryDirectory() as models_dir:
        for arch in ARCHITECTURES:  # the tiny checkpoints of tools/make_tiny_model.py, seed 0
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"),
                            arch, os.path.join(models_dir, arch)], env=env, check=True,
                           capture_output=True)
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
        vllm_ops = _run_phase("vllm", env, models_dir, args.keep)
        hf_ops = _run_phase("transformers", dict(os.environ), models_dir, args.keep)
        coverage = {k: set(v)
                    for k, v in _run_phase("coverage", env, models_dir, args.keep).items()}
    write_module(args.out, vllm_ops, hf_ops, coverage)
    print(f"wrote {args.out}: {sum(k.startswith('aten::') for k in vllm_ops)} aten ops from vLLM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
