"""torch_mlx.compile_patterns: written-out RMSNorm, rotate_half rotary embedding, repeated KV
heads and torch's additive form of a boolean mask are rewritten before lowering, with the
values the written-out ops give; look-alikes that differ are left as they are."""
import copy

import mlx.core as mx
import pytest
import torch
import transformers

import torch_mlx.compile as tc
from torch_mlx import compile_patterns

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class _Rewrites(list):
    """The number of patterns rewritten in each graph compiled while the test runs (the list),
    and the graphs after rewriting (``graphs``)."""

    def __init__(self):
        super().__init__()
        self.graphs = []

    def calls(self, target) -> list:
        return [n for gm in self.graphs for n in gm.graph.nodes if n.target is target]


@pytest.fixture
def rewrites(monkeypatch):
    record = _Rewrites()
    original = compile_patterns.rewrite

    def counting(gm):
        record.append(original(gm))
        record.graphs.append(gm)
        return record[-1]

    monkeypatch.setattr(compile_patterns, "rewrite", counting)
    return record


def _hf_rms_norm(x, eps=1e-6):  # transformers' LlamaRMSNorm, less the weight
    v = x.to(torch.float32)
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _hf_rotary(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_op_matches_the_written_out_norm(dtype, weighted):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 96).to(dtype) * 4
    weight = (torch.rand(96) + 0.5).to(dtype) if weighted else None
    expected = _hf_rms_norm(x) if weight is None else weight * _hf_rms_norm(x)
    actual = torch.ops.torch_mlx.rms_norm(
        x.to("mlx"), None if weight is None else weight.to("mlx"), 1e-6)
    assert actual.dtype == dtype and actual.device.type == "mlx"
    if dtype == torch.float32:
        torch.testing.assert_close(actual.cpu(), expected)
    else:
        # the float32 sum of squares is added in another order than the CPU's, which moves a
        # value rounded twice (normalised, then times the weight) to the other neighbour now and
        # then (2 ulps apart, both ~1 ulp from the exact value): as close to float64 as the CPU
        v = x.double()
        exact = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        exact = exact if weight is None else weight.double() * exact
        error = (actual.cpu().double() - exact).abs().max()
        assert error <= (expected.double() - exact).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_shape", [(2, 1, 7, 64), (1, 1, 7, 64), (7, 64), (2, 1, 7, 1)])
def test_rotary_half_op_equals_the_written_out_rotation_exactly(dtype, table_shape):
    # q as attention gets it: [B, H, L, D] transposed from the projection's [B, L, H, D]
    x = torch.randn(2, 7, 4, 64).to(dtype).transpose(1, 2)
    cos, sin = torch.randn(table_shape).to(dtype), torch.randn(table_shape).to(dtype)
    expected = _hf_rotary(x, cos, sin)
    actual = torch.ops.torch_mlx.rotary_half(*(t.to("mlx") for t in (x, cos, sin)))
    # elementwise with the pattern's roundings: bit for bit
    torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0)


class _Block(torch.nn.Module):
    """One attention block as transformers writes it: RMSNorm, rotary, repeat_kv, a masked SDPA."""

    def __init__(self, heads=4, kv_heads=2, dim=32):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.weight = torch.nn.Parameter(torch.rand(heads * dim) + 0.5)

    def forward(self, x, cos, sin, mask, k_cache, v_cache):
        b, length, _ = x.shape
        h = self.weight * _hf_rms_norm(x)
        q = h.view(b, length, self.heads, self.dim).transpose(1, 2)
        q = _hf_rotary(q, cos, sin)
        k = _hf_rotary(k_cache, cos[..., :1, :], sin[..., :1, :])
        n = self.heads // self.kv_heads

        def repeat_kv(t):  # transformers.integrations.sdpa_attention.repeat_kv
            bb, kvh, s, d = t.shape
            return t[:, :, None].expand(bb, kvh, n, s, d).reshape(bb, kvh * n, s, d)

        out = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k), repeat_kv(v_cache), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, -1)


def _block_inputs(dtype, length=3, keys=6):
    torch.manual_seed(0)
    x = torch.randn(2, length, 128).to(dtype)
    cos, sin = torch.randn(2, 1, length, 32).to(dtype), torch.randn(2, 1, length, 32).to(dtype)
    mask = torch.rand(2, 1, length, keys) > 0.3
    mask[..., 0] = True  # every query row sees a key
    mask[1, :, 1] = False  # ... but one row: torch gives zeros there
    k_cache, v_cache = torch.randn(2, 2, keys, 32).to(dtype), torch.randn(2, 2, keys, 32).to(dtype)
    return x, cos, sin, mask, k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_block_compiles_to_the_fused_ops_with_eager_values(dtype, rewrites):
    block = _Block().to(dtype)
    inputs = _block_inputs(dtype)
    with torch.no_grad():
        expected = block(*inputs)  # torch on the CPU
        device_block = copy.deepcopy(block).to("mlx")
        mlx_inputs = [t.to("mlx") for t in inputs]
        eager = device_block(*mlx_inputs)
        compiled = torch.compile(device_block, backend="mlx", fullgraph=True)(*mlx_inputs)
    # rms_norm (its weight folded in), 2 rotary, the unrepeated keys and values, the mask
    assert rewrites == [5]
    [norm] = rewrites.calls(torch.ops.torch_mlx.rms_norm.default)
    assert norm.args[1] is not None
    if mx.default_device() == mx.cpu:
        # MLX's CPU backend runs the fused ops as the written-out ones: bit for bit
        torch.testing.assert_close(compiled.cpu(), eager.cpu(), rtol=0, atol=0)
    else:
        # a GPU's fused kernels (RMSNorm, attention over shared KV heads) sum in other orders
        # (H100: 4.8e-7 float32, 0.02 bfloat16 at an element near 0): as close to float64 as
        # the written-out ops
        reference = _Block().double()
        reference.load_state_dict(block.state_dict())
        with torch.no_grad():
            exact = reference(*(t.double() if t.is_floating_point() else t for t in inputs))
        error = (compiled.cpu().double() - exact).abs().max()
        assert error <= 2 * (eager.cpu().double() - exact).abs().max()
    if dtype == torch.float32:  # (in bfloat16 both round differently from torch's CPU SDPA)
        torch.testing.assert_close(compiled.cpu(), expected)


def test_look_alikes_are_not_rewritten(rewrites):
    """A norm squared in half precision, a rotation that is also read elsewhere, repeated keys
    beside values that are not: each differs from its pattern and keeps its own ops."""

    def f(x, cos, sin, kv, values):
        half_norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # no float upcast
        rotated = _rotate_half(x)
        mixed = x * cos + rotated * sin
        repeated = kv[:, :, None].expand(1, 2, 2, 5, 16).reshape(1, 4, 5, 16)
        out = torch.nn.functional.scaled_dot_product_attention(
            mixed.view(1, 4, 5, 16), repeated, values)
        return half_norm, rotated, out

    x = torch.randn(1, 5, 64).to(torch.bfloat16)
    cos, sin = torch.randn(5, 64).to(torch.bfloat16), torch.randn(5, 64).to(torch.bfloat16)
    kv, values = torch.randn(1, 2, 5, 16).to(torch.bfloat16), torch.randn(1, 4, 5, 16)
    inputs = (x, cos, sin, kv, values.to(torch.bfloat16))
    mlx_inputs = [t.to("mlx") for t in inputs]
    with torch.no_grad():
        expected = f(*mlx_inputs)
        actual = torch.compile(f, backend="mlx")(*mlx_inputs)
    assert rewrites == [0]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e.cpu(), rtol=0, atol=0)


def test_a_weight_of_another_dtype_stays_a_multiply(rewrites):
    """A float32 weight times the bfloat16 normalised value is a float32 product of the rounded
    value: the norm is fused, the multiply is not (MLX's kernel would skip the rounding)."""
    weight = torch.rand(64) + 0.5
    x = torch.randn(2, 3, 64).to(torch.bfloat16)

    def f(x, weight):
        return weight * _hf_rms_norm(x)

    with torch.no_grad():
        expected = f(x.to("mlx"), weight.to("mlx"))
        actual = torch.compile(f, backend="mlx")(x.to("mlx"), weight.to("mlx"))
    assert rewrites == [1]
    [norm] = rewrites.calls(torch.ops.torch_mlx.rms_norm.default)
    assert norm.args[1] is None
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0)


def test_patterns_can_be_switched_off(monkeypatch, rewrites):
    monkeypatch.setattr(tc, "_PATTERNS", False)
    block = _Block().to("mlx")
    inputs = [t.to("mlx") for t in _block_inputs(torch.float32)]
    with torch.no_grad():
        torch.compile(block, backend="mlx")(*inputs)
    assert rewrites == []


# (config, model, extra config, rewrites a layer): per layer 2 norms, 2 rotary, keys/values,
# mask (Qwen3 adds its query and key norms)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, 6),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), 8),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16), 6),  # scales by 1 + weight
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0), 6),  # fused qkv projection
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_decode_graph_is_rewritten_and_generates_as_the_cpu(arch, rewrites, monkeypatch):
    """transformers' compiled static-cache decoding in bfloat16 (grouped-query heads): every
    layer's norms, rotary embeddings, repeated keys/values and mask are rewritten, the step is
    one mx.compile'd function (the caches' in-place writes included), and greedy tokens are the
    CPU's."""
    from transformers.generation import CompileConfig

    graphs = []
    original_init = tc.MlxGraph.__init__

    def recording_init(self, gm):
        original_init(self, gm)
        graphs.append(self)

    monkeypatch.setattr(tc.MlxGraph, "__init__", recording_init)

    config_class, model_class, extra, per_layer = ARCHITECTURES[arch]
    config = getattr(transformers, config_class)(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a sharp next-token distribution: no near-ties
    model = model.to(torch.bfloat16)
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    compile_config = CompileConfig(backend="mlx")
    compile_config._compile_all_devices = True
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        actual = copy.deepcopy(model).to("mlx").generate(
            prompt.to("mlx"), attention_mask=torch.ones_like(prompt).to("mlx"),
            cache_implementation="static", compile_config=compile_config, **kwargs)
    assert actual.cpu().tolist() == expected.tolist()
    assert rewrites == [2 * per_layer + 1]  # one decode graph; the final norm
    [graph] = graphs
    assert graph.parts is None and len(graph.in_place) == 2 * 2  # keys and values a layer
