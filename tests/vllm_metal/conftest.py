"""Shared fixtures: tiny checkpoints made by tools/make_tiny_model.py, prompts, vLLM settings.

Models are made once per session under pytest's temporary directory (a few seconds each; same
seed, same bytes). Modules that build engines with vllm.LLM use ``in_process_engine`` (engine in
this process: faster to start); test_multiprocess.py exercises the default engine process.
"""
import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

def _load_model_maker():
    spec = importlib.util.spec_from_file_location("make_tiny_model",
                                                  ROOT / "tools" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_maker = _load_model_maker()
ARCHITECTURES = sorted(model_maker.ARCHITECTURES)

# Eight prompts of different lengths (about 3 to 160 tokens): two English, six of the tiny
# tokenizer's own pseudo-language (sentences of its training distribution). With 16-token blocks
# the longest span up to 10 blocks, and several exceed the Mistral checkpoint's 40-token window.
_SENTENCES = model_maker.training_text(0)[3000:]
PROMPTS = ["Hello", "Hello, how are you today?"] + [
    " ".join(_SENTENCES[a:b]) for a, b in [(0, 1), (1, 3), (3, 6), (6, 11), (11, 19), (19, 31)]
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch) -> path of that architecture's tiny checkpoint (made on first use)."""
    made: dict[str, str] = {}
    base = tmp_path_factory.mktemp("tiny-models")

    def get(arch: str) -> str:
        if arch not in made:
            made[arch] = model_maker.make_model(arch, str(base / arch), seed=0)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def in_process_engine():
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 for one module (not the session: other modules start
    servers and scripts that must see the user's default)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


def rerun_with_async_launch(path: str, select: str, timeout: float):
    """Run ``path``'s tests chosen by ``-k select`` in a child pytest with TORCH_MLX_ASYNC=1
    (read once per process: eager ops and compiled forwards launched, not waited for)."""
    import subprocess
    import sys

    env = dict(os.environ, TORCH_MLX_ASYNC="1", TORCH_DEVICE_BACKEND_AUTOLOAD="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", select],
        env=env, capture_output=True, text=True, timeout=timeout)
