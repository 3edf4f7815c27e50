"""Embedding models with encoder-only attention (BERT, RoBERTa, ModernBERT), and CLIP's text and
image embeddings, through `vllm.LLM(runner="pooling")` on "mlx", against transformers on the CPU
(float32).

The checkpoints are tools/registry_sweep.py's tiny random ones (transformers' config shrunk, the
local tokenizer of tools/make_tiny_model.py), and so are the references: the base model's last
hidden states pooled as vLLM's resolved pooler config says. The eight prompts of different
lengths (3 to about 160 tokens) go in one call, so each step packs several sequences; ModernBERT's
local layers have a 16-token window either side, shorter than most prompts.
"""
import gc
import importlib.util

import pytest
import torch
import vllm
from vllm.config import PoolerConfig

from conftest import PROMPTS, ROOT

COSINE_MIN = 0.9999  # the sweep's threshold

_spec = importlib.util.spec_from_file_location("registry_sweep",
                                               ROOT / "tools" / "registry_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

pytestmark = pytest.mark.usefixtures("in_process_engine")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """encoder_dir(arch) -> a tiny random checkpoint of arch (made on first use)."""
    made: dict[str, str] = {}
    base = tmp_path_factory.mktemp("tiny-encoders")

    def get(arch: str) -> str:
        if arch not in made:
            made[arch] = str(base / arch)
            sweep.build_checkpoint(arch, made[arch], seed=0)
        return made[arch]

    return get


def token_ids(model_dir: str) -> list[list[int]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p).input_ids for p in PROMPTS]


# (architecture, pooling asked for (None: the model's own), the pooling vLLM resolves)
@pytest.mark.parametrize("arch,asked,pooling", [
    ("BertModel", None, "CLS"), ("BertModel", "MEAN", "MEAN"), ("RobertaModel", None, "CLS"),
    ("ModernBertModel", None, "CLS")])
def test_embeddings_match_transformers(encoder_dir, arch, asked, pooling):
    path = encoder_dir(arch)
    prompts = token_ids(path)
    assert max(map(len, prompts)) > 100  # longer than one ModernBERT window many times over
    # the default compilation: the whole forward, attention included, is one MLX graph
    llm = vllm.LLM(model=path, runner="pooling", dtype="float32", max_model_len=256,
                   max_num_seqs=8, seed=0,
                   pooler_config=PoolerConfig(seq_pooling_type=asked) if asked else None)
    try:
        assert llm.llm_engine.model_config.pooler_config.seq_pooling_type == pooling
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    finally:
        del llm
        gc.collect()
    expected = sweep.reference_embeddings(arch, path, prompts, pooling)
    for ids, want, output in zip(prompts, expected, outputs):
        got = torch.tensor(output.outputs.embedding)
        assert got.shape == want.shape
        cosine = float(torch.nn.functional.cosine_similarity(want, got, dim=0))
        assert cosine >= COSINE_MIN, f"prompt of {len(ids)} tokens: cosine {cosine}"


def test_clip_text_and_image_embeddings_match_transformers(encoder_dir):
    """CLIP, a dual encoder: text prompts through its causal text tower, image-only prompts
    through its vision tower (vLLM's MMEncoderAttention, torch's attention on "mlx"), in one
    engine; references as the sweep makes them (text: the projected last token's state, where
    vLLM's LAST pooling takes it; images: transformers' get_image_features on the pixels of the
    checkpoint's own processor)."""
    arch = "CLIPModel"
    path = encoder_dir(arch)
    limit = sweep.max_model_len(path)  # CLIP's 77 positions
    prompts = [ids for ids in token_ids(path) if len(ids) <= limit]
    assert len(prompts) >= 4
    images = sweep.test_images()
    llm = vllm.LLM(model=path, runner="pooling", dtype="float32", max_model_len=limit,
                   max_num_seqs=8, seed=0)
    try:
        assert llm.llm_engine.model_config.pooler_config.seq_pooling_type == "LAST"
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        outputs += llm.embed([{"prompt": "", "multi_modal_data": {"image": image}}
                              for image in images], use_tqdm=False)
    finally:
        del llm
        gc.collect()
    expected = sweep.reference_pooling_output(arch, path, prompts) + \
        sweep.reference_image_embeddings(arch, path, images)
    for i, (want, output) in enumerate(zip(expected, outputs, strict=True)):
        got = torch.tensor(output.outputs.embedding)
        assert got.shape == want.shape
        cosine = float(torch.nn.functional.cosine_similarity(want, got, dim=0))
        what = f"prompt {i}" if i < len(prompts) else f"image {i - len(prompts)}"
        assert cosine >= COSINE_MIN, f"{what}: cosine {cosine}"
