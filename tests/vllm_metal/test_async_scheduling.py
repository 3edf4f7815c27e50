"""vLLM's async scheduling on "mlx": same greedy tokens as transformers, with the engine's host
work between steps overlapping the device (vllm_metal/model_runner.py: AsyncMLXModelRunnerOutput,
synchronize_input_prep).

The step's sampled ids stay "mlx" tensors; the next step's input ids are formed from them on the
device, and the scheduler runs a step ahead with placeholders. What can go wrong shows as wrong
tokens: a stale or overwritten staging buffer, a placeholder never replaced, a request finished a
step late. Requests here finish at different steps (different max_tokens), one stops on a string,
one asks for logprobs, and a KV cache of a few blocks preempts requests. Each case runs with
TORCH_MLX_ASYNC=0 here and again with =1 in a child process (the switch is read once per
process), where the previous step may still be running when the next one is prepared.
"""
import gc

import pytest
import torch
import vllm
from vllm import SamplingParams

import reference
from conftest import PROMPTS, rerun_with_async_launch

pytestmark = pytest.mark.usefixtures("in_process_engine")

MAX_TOKENS = 24
# one MLA + MoE model besides Llama (DeepSeek-V2: MLA attention, routed and shared experts)
CASES = [("LlamaForCausalLM", False), ("LlamaForCausalLM", True),
         ("DeepseekV2ForCausalLM", False)]


def _runner_facts(worker):
    runner = worker.model_runner
    return (type(runner).__name__, runner.use_async_scheduling,
            type(runner.prepare_inputs_event).__name__)


def _engine(path, **kwargs):
    kwargs.setdefault("max_model_len", 512)
    llm = vllm.LLM(model=path, dtype="float32", max_num_seqs=8, seed=0, async_scheduling=True,
                   **kwargs)
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is True
    assert llm.collective_rpc(_runner_facts)[0] == ("MetalModelRunner", True, "NoneType")
    return llm


def _check_greedy(path, outputs, lengths):
    for prompt, length, output in zip(PROMPTS, lengths, outputs):
        expected, _ = reference.greedy(path, reference.tokenize(path, prompt), MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == expected[:length], (
            f"prompt {prompt[:20]!r}: {length} tokens")


@pytest.mark.parametrize("arch,enforce_eager", CASES,
                         ids=[f"{a}-{'eager' if e else 'compiled'}" for a, e in CASES])
def test_async_greedy_matches_transformers(arch, enforce_eager, model_dir):
    path = model_dir(arch)
    llm = _engine(path, enforce_eager=enforce_eager)
    # eight requests of different prompt lengths, finishing at eight different steps
    lengths = [MAX_TOKENS - 2 * i for i in range(len(PROMPTS))]
    params = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0) for n in lengths]
    outputs = llm.generate(PROMPTS, params)
    _check_greedy(path, outputs, lengths)
    for output, n in zip(outputs, lengths):
        assert output.outputs[0].finish_reason == "length" and len(output.outputs[0].token_ids) == n
    del llm
    gc.collect()


def test_async_stop_string_logprobs_and_preemption(model_dir):
    path = model_dir("LlamaForCausalLM")
    # 24 blocks of 16 tokens: the eight prompts (3 to ~160 tokens) with 24 new tokens each need
    # more, so the scheduler preempts requests and recomputes them
    llm = _engine(path, num_gpu_blocks_override=24, max_model_len=256)
    blocks_needed = sum(-(-(len(reference.tokenize(path, p)) + MAX_TOKENS) // 16) for p in PROMPTS)
    assert blocks_needed > 24
    tokenizer, _ = reference.load(path)

    # a stop string taken from the middle of the greedy continuation: the request ends there
    prompt_ids = reference.tokenize(path, PROMPTS[3])
    expected, _ = reference.greedy(path, prompt_ids, MAX_TOKENS)
    full_text = tokenizer.decode(expected)
    stop = tokenizer.decode(expected[8:10]).strip()
    assert stop and stop in full_text
    stopped = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=0, temperature=0.0, stop=[stop])
    with_logprobs = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0,
                                   logprobs=3)
    plain = [SamplingParams(max_tokens=MAX_TOKENS - i, min_tokens=MAX_TOKENS - i,
                            temperature=0.0) for i in range(len(PROMPTS))]
    params = list(plain)
    params[3] = stopped
    params[5] = with_logprobs
    outputs = llm.generate(PROMPTS, params)

    text = outputs[3].outputs[0].text
    assert outputs[3].outputs[0].finish_reason == "stop"
    assert text == full_text[:full_text.index(stop)]

    out = outputs[5].outputs[0]
    ids5 = reference.tokenize(path, PROMPTS[5])
    expected5, logits5 = reference.greedy(path, ids5, MAX_TOKENS)
    assert list(out.token_ids) == expected5
    log_softmax = torch.log_softmax(logits5, dim=-1)
    assert len(out.logprobs) == MAX_TOKENS
    for step, top in enumerate(out.logprobs):
        assert expected5[step] in top and len(top) >= 3
        for token, logprob in top.items():
            assert abs(logprob.logprob - log_softmax[step, token].item()) < 1e-4

    for i, (prompt, output) in enumerate(zip(PROMPTS, outputs)):
        if i not in (3, 5):
            expected, _ = reference.greedy(path, reference.tokenize(path, prompt), MAX_TOKENS)
            assert list(output.outputs[0].token_ids) == expected[:MAX_TOKENS - i], i
    del llm
    gc.collect()


def test_async_scheduling_stays_off_unless_asked(model_dir):
    path = model_dir("LlamaForCausalLM")
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=256, max_num_seqs=2, seed=0)
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is False
    assert llm.collective_rpc(_runner_facts)[0][1] is False
    del llm
    gc.collect()


def test_async_scheduling_with_async_launch():
    # TORCH_MLX_ASYNC=1: compiled forwards and eager ops are launched, not waited for, so the
    # previous step's device work may still be running when the next step starts
    done = rerun_with_async_launch(__file__, "not with_async_launch and not stays_off", 1200)
    assert done.returncode == 0 and "4 passed" in done.stdout, done.stdout[-3000:]
