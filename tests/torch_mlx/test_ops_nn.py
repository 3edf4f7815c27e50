"""nn ops on "mlx" beyond OpInfo's forward comparison: backward ops and end-to-end training.

OpInfo's compare-with-CPU checks forward values; here the gradients that torch's autograd
formulas compute through the backward ops (layer_norm, softmax, gelu, nll_loss, embedding,
dropout, attention ...) are compared with the CPU's, and small models trained with AdamW must
give the CPU's losses.
"""
import copy
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

INF, NAN = math.inf, math.nan


def _grads_match(fn, *inputs, rtol=None, atol=None):
    """fn's outputs and the gradients of its inputs on "mlx" equal the CPU's."""
    results = []
    for device in ("cpu", "mlx"):
        leaves = [x.detach().to(device).requires_grad_(x.is_floating_point()) for x in inputs]
        out = fn(*leaves)
        torch.manual_seed(1)
        cotangent = torch.randn(out.shape).to(device)
        grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad], cotangent)
        results.append([out.detach().cpu()] + [g.cpu() for g in grads])
    torch.testing.assert_close(results[1], results[0], rtol=rtol, atol=atol)


def test_layer_norm_backward():
    x, w, b = torch.randn(4, 5, 8), torch.randn(8), torch.randn(8)
    _grads_match(lambda x, w, b: F.layer_norm(x, (8,), w, b), x, w, b)
    _grads_match(lambda x: F.layer_norm(x, (5, 8)), x)


def test_group_norm_backward():
    x, w, b = torch.randn(2, 6, 3, 4), torch.randn(6), torch.randn(6)
    _grads_match(lambda x, w, b: F.group_norm(x, 3, w, b), x, w, b)


@pytest.mark.parametrize("fn", [
    lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh"), F.silu, F.relu, F.mish,
    lambda x: F.leaky_relu(x, 0.2), F.elu, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus,
    F.logsigmoid, lambda x: F.glu(x, -1), lambda x: F.softmax(x, -1),
    lambda x: F.log_softmax(x, 1), F.hardshrink, F.softshrink,
])
def test_activation_backward(fn):
    x = torch.randn(6, 8) * 3
    x[0, :4] = torch.tensor([0.0, -3.0, 3.0, 1.0])  # boundaries of the piecewise functions
    _grads_match(fn, x)


def test_nll_loss_backward_with_weights_and_ignore_index():
    logits, target, weight = torch.randn(7, 5), torch.randint(0, 5, (7,)), torch.rand(5)
    target[2] = -100
    for reduction in ("mean", "sum", "none"):
        _grads_match(lambda x: F.cross_entropy(x, target.to(x.device), weight.to(x.device),
                                               reduction=reduction), logits)
    images, pixels = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    _grads_match(lambda x: F.cross_entropy(x, pixels.to(x.device)), images)


def test_nll_loss_target_out_of_bounds_raises_index_error():
    with pytest.raises(IndexError):
        F.nll_loss(torch.randn(3, 4).to("mlx"), torch.tensor([0, 4, 1]).to("mlx"))


def test_embedding_backward_padding_and_frequency_scaling():
    weight, idx = torch.randn(10, 4), torch.tensor([[1, 2, 2], [0, 9, 2]])
    _grads_match(lambda w: F.embedding(idx.to(w.device), w, padding_idx=2,
                                       scale_grad_by_freq=True), weight)


def test_mse_loss_backward():
    x, t = torch.randn(4, 3), torch.randn(4, 3)
    for reduction in ("mean", "sum", "none"):
        _grads_match(lambda x, t: F.mse_loss(x, t, reduction=reduction), x, t)


@pytest.mark.parametrize("loss, x, target", [
    (F.multi_margin_loss, torch.tensor([0.1, 0.8, -0.3, 0.5]), torch.tensor(2)),
    (F.multi_margin_loss, torch.tensor(0.3), torch.tensor(0)),
    (F.multi_margin_loss, torch.tensor([0.1, 0.8, -0.3, 0.5]), torch.tensor([2])),
    (F.multilabel_margin_loss, torch.tensor([0.1, 0.8, -0.3, 0.5]), torch.tensor([3, 0, -1, 1])),
    (F.multilabel_margin_loss, torch.tensor(0.3), torch.tensor(0)),
])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_unbatched_margin_losses_have_the_cpus_shape(loss, x, target, reduction):
    # issue 22: the unreduced loss of one unbatched sample is 0-d on the CPU; torch's meta
    # kernels (decompositions) say (1,), which the adapter used to assert
    _grads_match(lambda x: loss(x, target.to(x.device), reduction=reduction), x)
    got = loss(x.to("mlx"), target.to("mlx"), reduction=reduction)
    assert got.shape == loss(x, target, reduction=reduction).shape


def test_dropout_mask_follows_the_seed():
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    cpu = F.dropout(x, 0.3)
    torch.manual_seed(7)
    mlx = F.dropout(x.to("mlx"), 0.3).cpu()
    torch.testing.assert_close(mlx, cpu)


@pytest.mark.parametrize("fn", [
    lambda x, w: F.conv2d(x, w, padding=1, stride=2),
    lambda x, w: F.conv2d(x, w[:, :2], groups=2, dilation=2),
    lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1),
    lambda x, w: F.conv1d(x.flatten(2), w.flatten(2), stride=3),
])
def test_convolution_backward(fn):
    torch.manual_seed(0)
    _grads_match(fn, torch.randn(2, 4, 7, 6), torch.randn(4, 4, 3, 3))


@pytest.mark.parametrize("fn", [
    lambda x, w: F.conv2d(x, w, padding=1, stride=2),
    lambda x, w: F.conv2d(x, w[:, :2], groups=2, dilation=(2, 1), padding="same"),
    lambda x, w: F.conv_transpose2d(x, w, stride=(2, 3), padding=(1, 2), output_padding=1),
    lambda x, w: F.conv_transpose2d(x, w[:, :2], groups=2, stride=2, dilation=2),
    lambda x, w: F.conv1d(x.flatten(2), w.flatten(2), stride=3),
    lambda x, w: F.conv3d(x[:, :, None], w[:, :, None], padding=(1, 0, 1)),
])
def test_integer_convolution_is_exact(fn):
    """MLX's convolution takes floats only; integer convolutions are exact integer sums (with
    values beyond float32's 2**24, where a float route would round)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**20, 2**20, (2, 4, 7, 6), generator=g)
    w = torch.randint(-2**12, 2**12, (4, 4, 3, 3), generator=g)
    expected = fn(x, w)
    assert expected.abs().max() > 2**24
    assert torch.equal(fn(x.to("mlx"), w.to("mlx")).cpu(), expected)

@pytest.mark.parametrize("fn", [
    lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    lambda x: F.adaptive_avg_pool2d(x, (3, 4)), lambda x: F.adaptive_max_pool2d(x, (4, 3)),
    lambda x: F.interpolate(x, scale_factor=1.7, mode="bilinear"),
    lambda x: F.interpolate(x, size=(5, 4), mode="bicubic", align_corners=True),
    lambda x: F.interpolate(x, size=(14, 3), mode="nearest"),
    lambda x: F.unfold(x, 3, padding=1, stride=2),
])
def test_pooling_and_resampling_backward(fn):
    torch.manual_seed(0)
    _grads_match(fn, torch.randn(2, 3, 9, 7))


@pytest.mark.parametrize("mode", ["linear", "bilinear", "bicubic", "trilinear"])
def test_interpolation_coordinates_are_the_cpus_fused_multiply_add(mode):
    # the CPU kernels compute scale * (dst + 0.5) - 0.5 as one fused multiply-add: output row
    # 200 of 345 -> 270 rows reads the input at 255.69444 (fused), not 255.69446 (two roundings)
    dims = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}[mode]
    x = torch.randn((1, 2) + (345,) + (3,) * (dims - 1), generator=torch.Generator().manual_seed(0))
    size = (270,) + (4,) * (dims - 1)
    expected = F.interpolate(x, size=size, mode=mode, align_corners=False)
    actual = F.interpolate(x.to("mlx"), size=size, mode=mode, align_corners=False).cpu()
    torch.testing.assert_close(actual, expected)


def test_grid_sample_backward():
    torch.manual_seed(0)
    x, grid = torch.randn(2, 3, 5, 6), torch.rand(2, 4, 3, 2) * 2 - 1
    for mode in ("bilinear", "nearest"):
        _grads_match(lambda x, g: F.grid_sample(x, g, mode=mode, align_corners=False), x, grid)


def test_batch_norm_updates_running_stats_like_cpu():
    torch.manual_seed(0)
    cpu = nn.BatchNorm2d(3, momentum=0.3)
    mlx = copy.deepcopy(cpu).to("mlx")
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        torch.testing.assert_close(mlx(x.to("mlx")).cpu(), cpu(x))
    torch.testing.assert_close(mlx.running_mean.cpu(), cpu.running_mean)
    torch.testing.assert_close(mlx.running_var.cpu(), cpu.running_var)
    cpu.eval(), mlx.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(mlx(x.to("mlx")).cpu(), cpu(x))
    _grads_match(lambda x, w: F.batch_norm(x, None, None, w, training=True),
                 torch.randn(4, 3, 5), torch.randn(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_half_batch_norm_rounds_as_cpu(dtype, training, affine):
    """Half inputs with half parameters: the CPU stores the batch mean and invstd in half (for
    bfloat16 also the sum of squares and the variance) and normalises in float32; mlx
    reproduces it bit for bit."""
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 5, 5), (2, 3, 4, 5), (8, 2, 7)]:
        x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
        c = shape[1]
        w = torch.randn(c, generator=g).to(dtype) if affine else None
        b = torch.randn(c, generator=g).to(dtype) if affine else None
        rm, rv = torch.randn(c, generator=g).to(dtype), (torch.rand(c, generator=g) + .5).to(dtype)
        expected = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.5, 0.6)
        dev = [t.to("mlx") if t is not None else None for t in (x, rm, rv, w, b)]
        actual = F.batch_norm(dev[0], dev[1], dev[2], dev[3], dev[4], training, 0.5, 0.6)
        assert torch.equal(actual.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_convolution_with_bias_rounds_once(dtype):
    """The CPU adds the bias to the float32 sums before rounding to half (within the default
    half tolerance; the float32 sums themselves may differ in order)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 9, 8, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    b = torch.randn(6, generator=g) * 10
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    torch.testing.assert_close(F.conv2d(x.to("mlx"), w.to("mlx"), b.to("mlx"), padding=1).cpu(),
                               F.conv2d(x, w, b, padding=1))

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_hardswish_rounds_once(dtype):
    x = torch.linspace(-8, 8, 4001).to(dtype)
    g = torch.randn(4001, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(F.hardswish(x.to("mlx")).cpu(), F.hardswish(x))
    assert torch.equal(torch.ops.aten.hardswish_backward(g.to("mlx"), x.to("mlx")).cpu(),
                       torch.ops.aten.hardswish_backward(g, x))

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softshrink_passes_nan_and_rounds_half_once(dtype):
    # OpInfo's reference inputs: NaN gave 0 (NaN fails both of torch's tests and comes out);
    # half inputs are computed in float32 with lambd in float32, as torch's kernel does
    x = torch.cat([torch.tensor([NAN, INF, -INF, 0.3, -0.3, 0.5, -0.5, -0.0]),
                   torch.linspace(-3, 3, 2001)]).to(dtype)
    for lambd in (0.5, 0.0, 0.3, 1.7):
        expected = F.softshrink(x, lambd)
        got = F.softshrink(x.to("mlx"), lambd).cpu()
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample_rounds_as_the_cpu_kernel(mode, padding_mode, align_corners):
    # OpInfo's reference inputs (9 of 18 failed, by up to 7.8e-3): a uint8 ramp, whose rows
    # jump by up to 255, sampled through a rotation. torch's vectorised 2-D float32 kernel
    # computes the coordinate (g + 1) * (size / 2) - 1/2 with one rounding (a fused
    # multiply-add), and the bicubic taps along x first, then along y
    n, c, h, w = 2, 3, 345, 456
    x = torch.arange(n * c * h * w).reshape(n, c, h, w).to(torch.uint8).float()
    angle = torch.deg2rad(torch.tensor(45.0))
    theta = torch.tensor([[[angle.cos() / 1.23, angle.sin(), 0.0],
                           [-angle.sin(), angle.cos() / 1.34, 0.0]]]).expand(n, 2, 3)
    grid = F.affine_grid(theta.contiguous(), (n, c, h, w), align_corners=align_corners)
    expected = F.grid_sample(x, grid, mode, padding_mode, align_corners)
    got = F.grid_sample(x.to("mlx"), grid.to("mlx"), mode, padding_mode, align_corners)
    torch.testing.assert_close(got.cpu(), expected)


def test_batch_norm_of_an_empty_batch_keeps_its_gradient():
    """torch's batch_norm composite allocates float64 saved statistics for an empty input on a
    non-CUDA device; mlx's autograd-level kernel makes them float32, and the output stays
    connected to weight and bias."""
    w = torch.randn(3).to("mlx").requires_grad_()
    b = torch.randn(3).to("mlx").requires_grad_()
    out = F.batch_norm(torch.empty(0, 3, 5, device="mlx"), None, None, w, b, True)
    assert out.shape == (0, 3, 5) and out.grad_fn is not None
    out.sum().backward()
    assert torch.equal(w.grad.cpu(), torch.zeros(3)) and torch.equal(b.grad.cpu(), torch.zeros(3))
    with torch.inference_mode():  # skips the autograd key: the PrivateUse1 registration
        assert F.batch_norm(torch.empty(0, 3, device="mlx"), None, None, None, None,
                            True).shape == (0, 3)

def test_ctc_loss_and_its_gradient():
    torch.manual_seed(0)
    log_probs = torch.randn(12, 3, 6).log_softmax(2)
    targets, target_lengths = torch.randint(1, 6, (3, 5)), torch.tensor([5, 3, 0])
    input_lengths = torch.tensor([12, 10, 7])
    for reduction in ("mean", "none"):
        _grads_match(lambda lp: F.ctc_loss(lp, targets.to(lp.device),
                                           input_lengths.to(lp.device),
                                           target_lengths.to(lp.device), reduction=reduction),
                     log_probs)


def test_embedding_bag_gradients():
    torch.manual_seed(0)
    weight, idx = torch.randn(10, 4), torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
    offsets, per_sample = torch.tensor([0, 3, 3, 6]), torch.rand(8)
    for mode in ("sum", "mean", "max"):
        _grads_match(lambda w: F.embedding_bag(idx.to(w.device), w, offsets.to(w.device),
                                               mode=mode, padding_idx=4), weight)
    _grads_match(lambda w, p: F.embedding_bag(idx.to(w.device), w, offsets.to(w.device),
                                              mode="sum", per_sample_weights=p), weight, per_sample)


# ----------------------------------------------------------------------------------------------
# Training: the same model, data and AdamW steps on the CPU and on "mlx" give the same losses.


def _train(model, batches, loss_fn, device, steps=5):
    model = copy.deepcopy(model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for step in range(steps):
        inputs, target = (t.to(device) for t in batches[step % len(batches)])
        loss = loss_fn(model(inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _same_losses(model, batches, loss_fn):
    cpu = _train(model, batches, loss_fn, "cpu")
    mlx = _train(model, batches, loss_fn, "mlx")
    torch.testing.assert_close(torch.tensor(mlx), torch.tensor(cpu), rtol=1e-4, atol=0)


def test_mlp_trains_like_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32),
                          nn.SiLU(), nn.Linear(32, 4))
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    _same_losses(model, batches, F.cross_entropy)


class _TinyTransformer(nn.Module):
    def __init__(self, vocab=32, dim=32, heads=4, layers=2, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        n = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        return self.head(self.blocks(self.embed(tokens), mask=causal, is_causal=True))


def _lm_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_transformer_trains_like_cpu(dropout):
    torch.manual_seed(0)
    model = _TinyTransformer(dropout=dropout)
    batches = [(t, t) for t in torch.randint(0, 32, (3, 4, 12))]
    # the dropout masks are drawn in the same order from the same seed on both devices
    torch.manual_seed(1)
    cpu = _train(model, batches, _lm_loss, "cpu")
    torch.manual_seed(1)
    mlx = _train(model, batches, _lm_loss, "mlx")
    torch.testing.assert_close(torch.tensor(mlx), torch.tensor(cpu), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------
# scaled_dot_product_attention: MLX's fused attention where it computes what torch asks


def _sdpa_ops(fn):
    """The aten ops an eager call dispatches (torch.profiler), by name."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


SDPA_CASES = [  # (query heads, kv heads, queries, keys, kwargs)
    (4, 4, 5, 5, {}),
    (8, 2, 5, 7, {"enable_gqa": True}),
    (8, 2, 5, 5, {"enable_gqa": True, "is_causal": True}),
    (4, 4, 3, 6, {"is_causal": True}),  # torch's causal mask is top-left aligned
    (4, 4, 6, 3, {"is_causal": True}),
    (4, 4, 5, 7, {"attn_mask": "bool"}),
    (4, 4, 5, 7, {"attn_mask": "float", "scale": 0.3}),
    (4, 4, 3, 4, {"attn_mask": "bool_row_masked"}),  # a row that sees no key gives zeros
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,lq,lk,kwargs", SDPA_CASES)
def test_sdpa_runs_mlx_fused_attention(hq, hkv, lq, lk, kwargs, dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, lq, 16, generator=gen).to(dtype)
    k = torch.randn(2, hkv, lk, 16, generator=gen).to(dtype)
    v = torch.randn(2, hkv, lk, 16, generator=gen).to(dtype)
    kwargs = dict(kwargs)
    mask = kwargs.pop("attn_mask", None)
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(lq, lk, generator=gen) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, lq, lk, generator=gen).to(dtype)
    elif mask == "bool_row_masked":
        kwargs["attn_mask"] = torch.ones(lq, lk, dtype=torch.bool)
        kwargs["attn_mask"][1] = False
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    args = (q.to("mlx"), k.to("mlx"), v.to("mlx"))
    moved = {n: a.to("mlx") if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}

    def on_mlx():
        return F.scaled_dot_product_attention(*args, **moved)

    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(on_mlx().cpu(), expected, **tol)
    assert "aten::_scaled_dot_product_fused_attention_overrideable" in _sdpa_ops(on_mlx)
    compiled = torch.compile(lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw),
                             backend="mlx", dynamic=False)
    torch.testing.assert_close(compiled(*args, **moved).cpu(), expected, **tol)


def test_sdpa_keeps_the_math_path_for_gradients_dropout_and_when_asked():
    """The fused op has no backward here: anything autograd records, dropout, and
    sdpa_kernel([MATH]) take torch's math path, with its gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    qm = q.to("mlx").requires_grad_()
    fused = "aten::_scaled_dot_product_fused_attention_overrideable"
    assert fused not in _sdpa_ops(
        lambda: F.scaled_dot_product_attention(qm, k.to("mlx"), v.to("mlx")).sum().backward())
    qc = q.clone().requires_grad_()
    F.scaled_dot_product_attention(qc, k, v).sum().backward()
    torch.testing.assert_close(qm.grad.cpu(), qc.grad, atol=1e-5, rtol=1e-4)
    with sdpa_kernel([SDPBackend.MATH]):
        assert fused not in _sdpa_ops(
            lambda: F.scaled_dot_product_attention(q.to("mlx"), k.to("mlx"), v.to("mlx")))


@pytest.mark.skipif(mx.default_device() != mx.gpu, reason="a GPU kernel (MLX CUDA or Metal): "
                    "runs on the device, tools/device_kit.sh")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_masked_decode_attention_kernel(dtype):
    # torch_mlx/kernels/decode_attention.py against float64 on the CPU: GQA, 1-3 queries,
    # caches of lengths not a multiple of 32, masks with holes and a fully masked row (zeros),
    # head dims 64 and 128; as close to float64 as torch's CPU attention in that dtype
    from torch_mlx.kernels import decode_attention
    from torch_mlx.ops.registry import to_mx_dtype
    torch_dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    for batch, heads, kv_heads, queries, length, dim in [(1, 12, 4, 1, 95, 128), (2, 8, 8, 3, 300, 64),
                                                         (1, 4, 1, 2, 33, 64)]:
        q = torch.randn(batch, heads, queries, dim, generator=g)
        k = torch.randn(batch, kv_heads, length, dim, generator=g)
        v = torch.randn(batch, kv_heads, length, dim, generator=g)
        mask = torch.rand(batch, 1, queries, length, generator=g) < 0.7
        mask[0, 0, -1] = False  # a row that attends to nothing
        args = [x.to(torch_dtype) for x in (q, k, v)]
        arrays = [mx.array(x.float().numpy()).astype(to_mx_dtype(torch_dtype)) for x in args]
        m = mx.array(mask.numpy())
        if queries == 1:  # MLX CUDA fuses no masked single-query decode (cuDNN takes more
            assert decode_attention.applies(*arrays, m) == mx.cuda.is_available()  # queries)
        got = decode_attention.masked_decode_attention(*arrays, m, dim ** -0.5)
        got = torch.from_numpy(np.array(got.astype(mx.float32)))

        def reference(q, k, v, dtype):
            rep = heads // kv_heads
            k, v = (x.to(dtype).repeat_interleave(rep, 1) for x in (k, v))
            scores = (q.to(dtype) * dim ** -0.5) @ k.transpose(-1, -2)
            scores = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
            return scores @ v
        exact = reference(*(x.double() for x in args), torch.float64)
        cpu = F.scaled_dot_product_attention(*args, attn_mask=mask, enable_gqa=True).double()
        cpu[0, :, -1] = 0  # torch's CPU kernel gives NaN for a fully masked row
        err, cpu_err = (got.double() - exact).abs().max(), (cpu - exact).abs().max()
        assert got[0, :, -1].eq(0).all()
        assert err <= max(2 * cpu_err, 1e-5), (batch, heads, length, err, cpu_err)
