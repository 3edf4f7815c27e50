"""vLLM's default engine process, and when the platform spawns it.

MLX starts a thread at its first evaluation; a process forked after that hangs at its own first
evaluation (the thread does not exist in the child). vLLM forks its engine-core process by
default. A program that has not used MLX yet can fork safely (and starts faster); one that has
(a test session, a notebook) must spawn, so MetalPlatform switches VLLM_WORKER_MULTIPROC_METHOD
to spawn exactly then, as vLLM itself does once CUDA is initialised.
"""
import pytest
import json
import os
import subprocess
import sys

import reference
from conftest import PROMPTS

FORK_AFTER_USE = r"""
import os, sys, time
import torch
if sys.argv[1] == "used":
    (torch.ones(4, device="mlx") + 1).cpu()
pid = os.fork()
if pid == 0:
    ok = (torch.ones(4, device="mlx") * 3).cpu().tolist() == [3.0] * 4
    os._exit(0 if ok else 1)
deadline = time.time() + 10
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("exit", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("hung")
"""

ENGINE_PROCESS = r"""
import json, os, sys
import torch
import vllm

path, prompts, used = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "used"
if used:  # use MLX before building the engine, as a larger program may have
    (torch.ones(4, device="mlx") + 1).cpu()
llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0)
params = vllm.SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0)
outputs = llm.generate(prompts, params)
from vllm.platforms import current_platform
import psutil
print("RESULT", json.dumps({
    "platform": type(current_platform).__name__,
    "start_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
    "children": [p.name() for p in psutil.Process().children(recursive=True)],
    "prompts": [list(o.prompt_token_ids) for o in outputs],
    "tokens": [list(o.outputs[0].token_ids) for o in outputs],
}))
"""


def run(code, *args, timeout, **env):
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=environ)


def test_fork_after_mlx_use_hangs_and_before_is_fine():
    assert run(FORK_AFTER_USE, "fresh", timeout=120).stdout.strip() == "exit 0"
    assert run(FORK_AFTER_USE, "used", timeout=120).stdout.strip() == "hung"


@pytest.mark.parametrize("parent,start_method", [("fresh", None), ("used", "spawn")])
def test_engine_process_matches_transformers(model_dir, parent, start_method):
    # Without an explicit choice vLLM forks (VLLM_WORKER_MULTIPROC_METHOD stays unset) unless
    # the parent has used MLX; both engine processes must produce transformers' tokens.
    path = model_dir("Qwen2ForCausalLM")
    prompts = PROMPTS[:4]
    done = run(ENGINE_PROCESS, path, json.dumps(prompts), parent, timeout=600,
               VLLM_ENABLE_V1_MULTIPROCESSING="1")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["platform"] == "MetalPlatform"
    assert result["start_method"] == start_method
    assert any("EngineCore" in name for name in result["children"]), result["children"]
    for prompt_ids, tokens in zip(result["prompts"], result["tokens"]):
        assert tokens == reference.greedy(path, prompt_ids, 16)[0]
