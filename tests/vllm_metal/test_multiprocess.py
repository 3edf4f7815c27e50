"""vLLM's default engine process, and when the platform spawns it.

MLX starts a thread at its first evaluation; a process forked after that hangs at its own first
evaluation (the thread does not exist in the child). torch's OpenMP pool, once started, does the
same to a forked child's first parallel CPU op. vLLM forks its engine-core process by default;
MetalPlatform makes it spawn, as vLLM's CPU platform does, so no start order hangs.
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

# A user's program: something runs first (or nothing), then it builds an engine with default
# settings. "torch_cpu" is the reported hang: transformers' greedy generation on the CPU starts
# torch's OpenMP pool, and a forked engine core then blocked forever in libgomp.
BEFORE = {
    "nothing": "",
    "mlx": "(torch.ones(4, device='mlx') + 1).cpu()",
    "torch_cpu": "reference.greedy(path, reference.tokenize(path, 'Hello there'), 4)",
}

ENGINE_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import vllm
import reference

def main(path, prompts):
    {before}
    llm = vllm.LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8, seed=0)
    params = vllm.SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0)
    outputs = llm.generate(prompts, params)
    # the layers the engine process built: vllm_metal's overrides, registered there before the
    # model is built (the first layer's rope is built before its attention imports the backend)
    layers = llm.apply_model(lambda model: sorted({{
        type(m).__name__ for m in model.modules()
        if type(m).__name__.endswith(("RotaryEmbedding", "RMSNorm"))}}))[0]
    import psutil
    from vllm.platforms import current_platform
    print("RESULT", json.dumps({{
        "platform": type(current_platform).__name__,
        "start_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
        "children": [p.name() for p in psutil.Process().children(recursive=True)],
        "layers": layers,
        "prompts": [list(o.prompt_token_ids) for o in outputs],
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
    }}))

{entry}
"""
GUARDED = 'if __name__ == "__main__":\n    main(sys.argv[1], json.loads(sys.argv[2]))'
UNGUARDED = "main(sys.argv[1], json.loads(sys.argv[2]))"


def run(code, *args, timeout, **env):
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=environ)


def run_script(tmp_path, before, guarded, *args, timeout):
    script = tmp_path / "user_program.py"
    script.write_text(ENGINE_SCRIPT.format(
        tests=os.path.dirname(os.path.abspath(__file__)), before=BEFORE[before],
        entry=GUARDED if guarded else UNGUARDED))
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"}
    environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model's function
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=environ, cwd=tmp_path)


def test_fork_after_mlx_use_hangs_and_before_is_fine():
    assert run(FORK_AFTER_USE, "fresh", timeout=120).stdout.strip() == "exit 0"
    assert run(FORK_AFTER_USE, "used", timeout=120).stdout.strip() == "hung"


@pytest.mark.parametrize("before", sorted(BEFORE))
def test_engine_process_in_any_start_order(model_dir, tmp_path, before):
    # Whatever ran first, the engine core is a spawned process (as on vLLM's CPU platform) and
    # produces transformers' tokens; the timeout turns a hang into a failure.
    path = model_dir("Qwen2ForCausalLM")
    prompts = PROMPTS[:4]
    done = run_script(tmp_path, before, True, path, json.dumps(prompts), timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["platform"] == "MetalPlatform"
    assert result["start_method"] == "spawn"
    assert any("EngineCore" in name for name in result["children"]), result["children"]
    assert result["layers"] == ["MLXRMSNorm", "MLXRotaryEmbedding"], result["layers"]
    for prompt_ids, tokens in zip(result["prompts"], result["tokens"]):
        assert tokens == reference.greedy(path, prompt_ids, 16)[0]


def test_script_without_main_guard_fails_with_a_clear_error(model_dir, tmp_path):
    # The spawned engine process re-imports the user's script; without the guard it would build
    # a second engine. It must stop with an error that says what to change, never hang.
    path = model_dir("Qwen2ForCausalLM")
    done = run_script(tmp_path, "nothing", False, path, json.dumps(PROMPTS[:1]), timeout=300)
    assert done.returncode != 0
    assert 'if __name__ == "__main__":' in done.stderr, done.stderr[-4000:]
    assert "RESULT" not in done.stdout
