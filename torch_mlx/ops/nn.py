"""Neural-network ops and their backward ops: softmax family, batch/layer/group norm,
activations, dropout, convolution, pooling, upsampling, grid sampling, embedding backward and
embedding_bag, im2col/col2im, losses (nll, ctc, mse, bce, margin ...).

Reduced-precision inputs are normalised and reduced in float32, as torch's CPU kernels
accumulate in float; the adapter casts results back to torch's result dtype. Backward ops of
linear maps (convolution, pooling, resampling) are MLX's vjp of the forward lowering.

scaled_dot_product_attention is CompositeImplicitAutograd: torch asks the device's C++ dispatch
stub which backend runs it, and csrc/attention.cpp answers MLX's fused attention
(``_scaled_dot_product_fused_attention_overrideable``, below) where it computes what torch asks
(no gradient, no dropout, 4-D inputs), else torch's math path (bmm and _softmax below).

Not here because they never reach the device: rms_norm, layer_norm, group_norm, cross_entropy,
l1/kl/... losses are CompositeImplicitAutograd and decompose into the ops below.
"""
import itertools
import math

import mlx.core as mx
import torch

from .. import precision
from ..kernels import decode_attention
from .elementwise import fma32
from .random import _alias, _cpu_generator
from .registry import accumulate_at, lowering, torch_kernel, tracing

# ----------------------------------------------------------------------------------------------
# Helpers


def _upcast(x):
    """float16/bfloat16 -> float32 for accumulation; other dtypes unchanged."""
    return x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x


def _on_vector(fn, x, dim, *rest):
    """Softmax-like ops treat a 0-d tensor as a one-element vector along dim 0 (or -1)."""
    if x.ndim == 0:
        return fn(x[None], 0, *rest)[0]
    return fn(x, dim, *rest)


def _reduce(loss, reduction: int):
    """torch.nn._reduction: 0 = none, 1 = mean, 2 = sum."""
    if reduction == 1:
        return mx.mean(loss)
    if reduction == 2:
        return mx.sum(loss)
    return loss


def _reduction_grad(grad_output, numel: int, reduction: int):
    """The upstream gradient of each element of an elementwise loss."""
    return grad_output / numel if reduction == 1 else grad_output


# ----------------------------------------------------------------------------------------------
# Softmax


@lowering("_softmax")
def softmax(self, dim, half_to_float):
    return _on_vector(lambda x, d: mx.softmax(_upcast(x), axis=d, precise=True), self, dim)


@lowering("_log_softmax")
def log_softmax(self, dim, half_to_float):
    def fn(x, d):
        """(x - max) - log(sum(exp(x - max))), in the order of torch's CPU kernel."""
        half = x.dtype if x.dtype in (mx.float16, mx.bfloat16) and not half_to_float else None
        x = _upcast(x)
        if x.size == 0:  # MLX cannot reduce empty arrays
            return x
        shifted = x - mx.max(x, axis=d, keepdims=True)
        total = mx.sum(mx.exp(shifted), axis=d, keepdims=True)
        if half is not None and d in (-1, x.ndim - 1):
            # the CPU's last-dim kernel keeps the sum and its log in the half dtype
            log_total = mx.log(total.astype(half).astype(mx.float32)).astype(half)
            return shifted - log_total.astype(mx.float32)
        return shifted - mx.log(total)

    return _on_vector(fn, self, dim)


@lowering("_safe_softmax")
def safe_softmax(self, dim, dtype=None):
    """Softmax whose fully masked rows (all -inf) are 0 instead of NaN."""
    def fn(x, d):
        x = _upcast(x if dtype is None else x.astype(dtype))
        masked = mx.all(mx.isneginf(x), axis=d, keepdims=True)
        return mx.where(masked, 0.0, mx.softmax(x, axis=d, precise=True))

    return _on_vector(fn, self, dim)


@lowering("_softmax_backward_data")
def softmax_backward_data(grad_output, output, dim, input_dtype):
    def fn(g, d, y):
        g, y = _upcast(g), _upcast(y)
        return y * (g - mx.sum(g * y, axis=d, keepdims=True))

    return _on_vector(fn, grad_output, dim, output)


@lowering("_log_softmax_backward_data")
def log_softmax_backward_data(grad_output, output, dim, input_dtype):
    def fn(g, d, y):
        g, y = _upcast(g), _upcast(y)
        return g - mx.exp(y) * mx.sum(g, axis=d, keepdims=True)

    return _on_vector(fn, grad_output, dim, output)


# ----------------------------------------------------------------------------------------------
# Normalisation


@lowering("native_layer_norm")
def native_layer_norm(input, normalized_shape, weight, bias, eps):
    """(output, mean, rstd); mean and rstd keep the normalised dims as size 1."""
    axes = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    x = _upcast(input)
    mean = mx.mean(x, axis=axes, keepdims=True)
    rstd = mx.rsqrt(mx.var(x, axis=axes, keepdims=True) + eps)
    out = x * rstd - mean * rstd  # torch's CPU kernel: x * scale + bias, then the affine map
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


@lowering("native_layer_norm_backward")
def native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias,
                               output_mask):
    axes = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    batch_axes = tuple(range(input.ndim - len(normalized_shape)))
    g, x = _upcast(grad_out), _upcast(input)
    xhat = (x - mean) * rstd
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        gw = g if weight is None else g * weight
        grad_input = rstd * (gw - mx.mean(gw, axis=axes, keepdims=True)
                             - xhat * mx.mean(gw * xhat, axis=axes, keepdims=True))
    if output_mask[1] and weight is not None:
        grad_weight = mx.sum(g * xhat, axis=batch_axes)
    if output_mask[2] and bias is not None:
        grad_bias = mx.sum(g, axis=batch_axes)
    return grad_input, grad_weight, grad_bias


@lowering("native_group_norm")
def native_group_norm(input, weight, bias, N, C, HxW, group, eps):
    """(output, mean, rstd) with mean and rstd of shape (N, group)."""
    x = mx.reshape(_upcast(input), (N, group, C // group * HxW))
    mean = mx.mean(x, axis=-1, keepdims=True)
    rstd = mx.rsqrt(mx.var(x, axis=-1, keepdims=True) + eps)
    # torch's CPU kernel: per channel, scale = rstd * weight and bias = beta - scale * mean
    per_channel = (N, C, 1)
    scale = mx.reshape(mx.repeat(rstd, C // group, axis=1), per_channel)
    shift = mx.reshape(mx.repeat(mean, C // group, axis=1), per_channel)
    if weight is not None:
        scale = scale * weight[:, None]
    shift = -scale * shift
    if bias is not None:
        shift = shift + bias[:, None]
    out = mx.reshape(x, (N, C, HxW)) * scale + shift
    return mx.reshape(out, input.shape), mean[..., 0], rstd[..., 0]


@lowering("native_group_norm_backward")
def native_group_norm_backward(grad_out, input, mean, rstd, weight, N, C, HxW, group, output_mask):
    g = mx.reshape(_upcast(grad_out), (N, C, HxW))
    grouped = (N, group, C // group * HxW)
    x = mx.reshape(_upcast(input), grouped)
    mean, rstd = mean[..., None], rstd[..., None]
    xhat = mx.reshape((x - mean) * rstd, (N, C, HxW))
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        gw = g if weight is None else g * weight[:, None]
        gw = mx.reshape(gw, grouped)
        xg = mx.reshape(xhat, grouped)
        grad_input = rstd * (gw - mx.mean(gw, axis=-1, keepdims=True)
                             - xg * mx.mean(gw * xg, axis=-1, keepdims=True))
        grad_input = mx.reshape(grad_input, input.shape)
    if output_mask[1]:
        grad_weight = mx.sum(g * xhat, axis=(0, 2))
    if output_mask[2]:
        grad_bias = mx.sum(g, axis=(0, 2))
    return grad_input, grad_weight, grad_bias


# Batch norm. The MLX lowerings are functional; torch's batch norm ops update running_mean and
# running_var in place, which the torch-level kernels below do with copy_.


def _channel_shape(x):
    """Per-channel vectors broadcast against (N, C, *spatial)."""
    return (-1,) + (1,) * (x.ndim - 2)


def _batch_stats(x):
    axes = [0] + list(range(2, x.ndim))
    mean = mx.mean(x, axis=axes)
    var = mx.var(x, axis=axes)
    return mean, var, x.size // x.shape[1]


def _normalize(x, mean, rstd, weight, bias):
    """torch's CPU form: x * alpha + beta with alpha = rstd * weight, beta = bias - mean * alpha
    per channel."""
    alpha = rstd if weight is None else rstd * weight
    beta = -mean * alpha if bias is None else bias - mean * alpha
    return x * mx.reshape(alpha, _channel_shape(x)) + mx.reshape(beta, _channel_shape(x))


def _invstd(var, eps):
    """1 / sqrt(var + eps) in float32 (half running variances too), as the CPU kernel."""
    return 1 / mx.sqrt(_upcast(var) + eps)


def _half_params(input, *params):
    """The CPU kernel's parameter type for a half-precision input: the input's own type (it
    rounds the batch mean and rstd to it before normalising) unless a float32 weight, bias or
    running statistic makes the call mixed-type."""
    if input.dtype not in (mx.float16, mx.bfloat16):
        return None
    return None if any(p is not None and p.dtype != input.dtype for p in params) else input.dtype


def _rounded_to(dtype, *arrays):
    if dtype is None:
        return arrays
    return tuple(a.astype(dtype).astype(mx.float32) for a in arrays)


def _train_stats(x, eps, param_dtype):
    """(mean, rstd, unbiased-variance numerator var, n) of a training batch as the CPU kernel
    rounds them: sums in float32; with half parameters the mean and rstd are stored in the
    parameter type, and for bfloat16 the sum of squares and the variance are rounded to it
    too before 1 / sqrt(var + eps) (measured bit-exact against torch's CPU kernel)."""
    mean, var, n = _batch_stats(x)
    if param_dtype is not None and param_dtype == mx.bfloat16:
        axes = [0] + list(range(2, x.ndim))
        centred = x - mx.reshape(mean, _channel_shape(x))
        var_sum = _rounded_to(param_dtype, mx.sum(centred * centred, axis=axes))[0]
        var = _rounded_to(param_dtype, var_sum / n)[0]
    rstd = _invstd(var, eps)
    mean_r, rstd = _rounded_to(param_dtype, mean, rstd)
    return mean_r, rstd, mean, var, n


@lowering("_native_batch_norm_legit_functional")
def batch_norm_functional(input, weight, bias, running_mean, running_var, training, momentum,
                          eps):
    """(output, save_mean, save_rstd, new running_mean, new running_var). Training normalises
    with the batch statistics and moves the running ones towards them (the variance unbiased);
    evaluation normalises with the running statistics."""
    x = _upcast(input)
    if not training:
        rstd = _invstd(running_var, eps)
        return _normalize(x, running_mean, rstd, weight, bias), running_mean, rstd, \
            running_mean, running_var
    param_dtype = _half_params(input, weight, bias, running_mean, running_var)
    save_mean, rstd, mean, var, n = _train_stats(x, eps, param_dtype)
    new_mean = momentum * mean + (1 - momentum) * running_mean
    new_var = momentum * var * (n / max(n - 1, 1)) + (1 - momentum) * running_var
    return _normalize(x, save_mean, rstd, weight, bias), save_mean, rstd, new_mean, new_var


@lowering("_native_batch_norm_legit.no_stats")
def batch_norm_no_stats(input, weight, bias, training, momentum, eps):
    x = _upcast(input)
    mean, rstd, *_ = _train_stats(x, eps, _half_params(input, weight, bias))
    return _normalize(x, mean, rstd, weight, bias), mean, rstd


@lowering("_native_batch_norm_legit_no_training")
def batch_norm_no_training(input, weight, bias, running_mean, running_var, momentum, eps):
    rstd = _invstd(running_var, eps)
    return _normalize(_upcast(input), running_mean, rstd, weight, bias), running_mean, rstd


@torch_kernel("native_batch_norm", "_native_batch_norm_legit")
def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """Like torch's CPU kernel: in training the running statistics (when given) are updated in
    place; in evaluation the saved mean and rstd are empty."""
    if running_mean is None or running_var is None:
        if not training:
            raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
        return torch.ops.aten._native_batch_norm_legit.no_stats(input, weight, bias, True,
                                                                momentum, eps)
    out, mean, rstd, new_mean, new_var = torch.ops.aten._native_batch_norm_legit_functional(
        input, weight, bias, running_mean, running_var, training, momentum, eps)
    if not training:
        return out, mean.new_empty((0,)), rstd.new_empty((0,))
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return out, mean, rstd


@torch_kernel("_batch_norm_impl_index", autograd=True)
def batch_norm_impl_index(input, weight, bias, running_mean, running_var, training, momentum,
                          eps, cudnn_enabled):
    """torch.batch_norm's C++ composite, at the autograd level. On an empty input it allocates
    the (never read) saved statistics in the CPU's accumulate type, float64, on the device; here
    they are float32. Every other input runs torch's composite unchanged."""
    if input.numel() != 0:
        return torch.ops.aten._batch_norm_impl_index.default.decompose(
            input, weight, bias, running_mean, running_var, training, momentum, eps,
            cudnn_enabled)
    stats_dtype = torch.float32 if input.dtype.is_floating_point else input.dtype
    features = input.shape[1] if input.dim() > 1 else 0  # the CPU's sizes for these
    save_mean = torch.empty(features, dtype=stats_dtype, device=input.device)
    save_invstd = torch.empty(features, dtype=stats_dtype, device=input.device)
    out = input.clone()  # not a view of input, nor a fresh empty tensor: the gradient flows
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    reserve = torch.empty(0, dtype=torch.uint8, device=input.device)
    return out, save_mean, save_invstd, reserve, 0

@torch_kernel("_batch_norm_with_update")
def batch_norm_with_update(input, weight, bias, running_mean, running_var, momentum, eps):
    out, mean, rstd = native_batch_norm(input, weight, bias, running_mean, running_var, True,
                                        momentum, eps)
    return out, mean, rstd, torch.empty((0,), dtype=torch.uint8, device=input.device)


def _batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                         save_invstd, train, eps, output_mask):
    x, g = _upcast(input), _upcast(grad_out)
    if train:
        mean, rstd = save_mean, save_invstd
    else:
        mean, rstd = running_mean, _invstd(running_var, eps)
    axes = [0] + list(range(2, x.ndim))
    shape = _channel_shape(x)
    xhat = (x - mx.reshape(mean, shape)) * mx.reshape(rstd, shape)
    scale = mx.reshape(rstd if weight is None else rstd * weight, shape)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        if train:
            grad_input = scale * (g - mx.mean(g, axis=axes, keepdims=True)
                                  - xhat * mx.mean(g * xhat, axis=axes, keepdims=True))
        else:
            grad_input = g * scale
    if output_mask[1]:
        grad_weight = mx.sum(g * xhat, axis=axes)
    if output_mask[2]:
        grad_bias = mx.sum(g, axis=axes)
    return grad_input, grad_weight, grad_bias


@lowering("native_batch_norm_backward")
def native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                               save_invstd, train, eps, output_mask):
    return _batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                                save_invstd, train, eps, output_mask)


@lowering("batch_norm_backward")
def batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_var,
                        update, eps, output_mask, reserve):
    return _batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                                save_var, update, eps, output_mask)


# ----------------------------------------------------------------------------------------------
# Activations and their backward ops (boundary conventions are torch's CPU kernels')


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1 + mx.tanh(inner))
    return 0.5 * x * (1 + mx.erf(x * math.sqrt(0.5)))


@lowering("gelu")
def gelu(self, approximate="none"):
    return _gelu(_upcast(self), approximate)


@lowering("gelu_backward")
def gelu_backward(grad_output, self, approximate="none"):
    x, g = _upcast(self), _upcast(grad_output)
    if approximate == "tanh":
        beta, kappa = math.sqrt(2 / math.pi), 0.044715
        t = mx.tanh(beta * (x + kappa * x * x * x))
        dt = (1 - t * t) * beta * (1 + 3 * kappa * x * x)
        return g * (0.5 * (1 + t) + 0.5 * x * dt)
    cdf = 0.5 * (1 + mx.erf(x * math.sqrt(0.5)))
    pdf = mx.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return g * (cdf + x * pdf)


@lowering("silu")
def silu(self):
    x = _upcast(self)
    return x * mx.sigmoid(x)


@lowering("silu_backward")
def silu_backward(grad_output, self):
    x = _upcast(self)
    s = mx.sigmoid(x)
    return _upcast(grad_output) * s * (1 + x * (1 - s))


@lowering("tanh_backward")
def tanh_backward(grad_output, output):
    # d tanh = 1 - tanh^2, from the forward's output
    y = _upcast(output)
    return _chain(grad_output, 1 - y * y)


@lowering("sigmoid_backward")
def sigmoid_backward(grad_output, output):
    y = _upcast(output)
    return _chain(grad_output, y * (1 - y))


def _chain(grad_output, derivative):
    """grad * derivative, the derivative conjugated for complex inputs (Wirtinger calculus, as
    torch's backward kernels)."""
    if mx.issubdtype(derivative.dtype, mx.complexfloating):
        derivative = mx.conj(derivative)
    return _upcast(grad_output) * derivative


@lowering("mish")
def mish(self):
    x = _upcast(self)
    return x * mx.tanh(mx.logaddexp(x, 0.0))


@lowering("relu")
def relu(self):
    # maximum keeps NaN, as torch's clamp_min does
    return mx.maximum(self, mx.array(0, self.dtype))


@lowering("threshold")
def threshold(self, threshold, value):
    return mx.where(self <= threshold, value, self)


@lowering("threshold_backward")
def threshold_backward(grad_output, self, threshold):
    return mx.where(self <= threshold, 0, grad_output)


@lowering("leaky_relu")
def leaky_relu(self, negative_slope=0.01):
    return mx.where(self > 0, self, self * negative_slope)


@lowering("leaky_relu_backward")
def leaky_relu_backward(grad_output, self, negative_slope, self_is_result):
    return mx.where(self > 0, grad_output, grad_output * negative_slope)


@lowering("elu")
def elu(self, alpha=1, scale=1, input_scale=1):
    x = _upcast(self)
    return mx.where(x > 0, x * scale, mx.expm1(x * input_scale) * (alpha * scale))


@lowering("elu_backward")
def elu_backward(grad_output, alpha, scale, input_scale, is_result, self_or_result):
    g, y = _upcast(grad_output), _upcast(self_or_result)
    if is_result:  # y = alpha * scale * expm1(x * input_scale) where x <= 0
        negative = g * input_scale * (y + alpha * scale)
    else:
        negative = g * input_scale * alpha * scale * mx.exp(y * input_scale)
    return mx.where(y <= 0, negative, g * scale)


@lowering("hardtanh")
def hardtanh(self, min_val=-1, max_val=1):
    return mx.minimum(mx.maximum(self, min_val), max_val)


@lowering("hardtanh_backward")
def hardtanh_backward(grad_output, self, min_val, max_val):
    return mx.where((self <= min_val) | (self >= max_val), 0, grad_output)


@lowering("hardsigmoid")
def hardsigmoid(self):
    return mx.minimum(mx.maximum(self + 3, 0), 6) / 6


@lowering("hardsigmoid_backward")
def hardsigmoid_backward(grad_output, self):
    return mx.where((self > -3) & (self < 3), grad_output / 6, 0)


@lowering("hardswish")
def hardswish(self):
    """In float32 for half inputs, rounded once, as the CPU kernel."""
    x = _upcast(self)
    return x * mx.minimum(mx.maximum(x + 3, 0), 6) / 6


@lowering("hardswish_backward")
def hardswish_backward(grad_output, self):
    grad_output, self = _upcast(grad_output), _upcast(self)  # float32 for half, as the CPU
    inside = grad_output * (self / 3 + 0.5)
    return mx.where(self <= -3, 0, mx.where(self < 3, inside, grad_output))


@lowering("softplus")
def softplus(self, beta=1, threshold=20):
    x = _upcast(self)
    return mx.where(x * beta > threshold, x, mx.log1p(mx.exp(x * beta)) / beta)


@lowering("softplus_backward")
def softplus_backward(grad_output, self, beta, threshold):
    x, g = _upcast(self), _upcast(grad_output)
    z = mx.exp(x * beta)
    return mx.where(x * beta > threshold, g, g * z / (z + 1))


@lowering("log_sigmoid_forward")
def log_sigmoid_forward(self):
    """(output, buffer): buffer = exp(-|x|), as torch's CPU kernel saves it."""
    x = _upcast(self)
    z = mx.exp(-mx.abs(x))
    return mx.minimum(x, 0) - mx.log1p(z), z


@lowering("log_sigmoid_backward")
def log_sigmoid_backward(grad_output, self, buffer):
    x, g = _upcast(self), _upcast(grad_output)
    z = mx.exp(-mx.abs(x))
    negative = x < 0
    return g * (mx.where(negative, 1, 0) - mx.where(negative, 1, -1) * z / (1 + z))


@lowering("glu")
def glu(self, dim=-1):
    a, b = mx.split(_upcast(self), 2, axis=dim)
    return a * mx.sigmoid(b)


@lowering("glu_backward")
def glu_backward(grad_output, self, dim):
    a, b = mx.split(_upcast(self), 2, axis=dim)
    g = _upcast(grad_output)
    s = mx.sigmoid(b)
    return mx.concatenate([g * s, g * a * s * (1 - s)], axis=dim)


@lowering("hardshrink")
def hardshrink(self, lambd=0.5):
    return mx.where((self >= -lambd) & (self <= lambd), 0, self)


@lowering("hardshrink_backward")
def hardshrink_backward(grad_out, self, lambd):
    return mx.where((self >= -lambd) & (self <= lambd), 0, grad_out)


@lowering("softshrink")
def softshrink(self, lambd=0.5):
    # torch's kernels test x > lambd, then x < -lambd; NaN fails both and comes out NaN. Half
    # inputs are computed in float32 with lambd in float32 and rounded once, as torch's
    x = self.astype(mx.float32) if self.dtype in (mx.float16, mx.bfloat16) else self
    inside = mx.where(mx.isnan(x), x, 0)
    out = mx.where(x > lambd, x - lambd, mx.where(x < -lambd, x + lambd, inside))
    return out.astype(self.dtype)


@lowering("softshrink_backward")
def softshrink_backward(grad_output, self, lambd):
    return mx.where((self >= -lambd) & (self <= lambd), 0, grad_output)


@torch_kernel("rrelu_with_noise")
def rrelu_with_noise(self, noise, lower=0.125, upper=1 / 3, training=False, generator=None):
    """Random negative slopes, drawn as on the CPU: torch's CPU kernel runs on zero-copy CPU
    aliases with a CPU generator carrying the device generator's state (the scheme of
    random.py), so a seed gives the CPU's slopes; `noise` is written in place through its
    alias."""
    with _cpu_generator(generator) as cpu_generator:
        out = torch.ops.aten.rrelu_with_noise(_alias(self), _alias(noise), lower, upper,
                                              training, cpu_generator)
    return out.to(self.device)


@lowering("_prelu_kernel")
def prelu_kernel(self, weight):
    return mx.where(self > 0, self, weight * self)


@lowering("_prelu_kernel_backward")
def prelu_kernel_backward(grad_output, self, weight):
    positive = self > 0
    return (mx.where(positive, grad_output, weight * grad_output),
            mx.where(positive, 0, self * grad_output))


# ----------------------------------------------------------------------------------------------
# Dropout


@torch_kernel("native_dropout")
def native_dropout(input, p, train):
    """torch's CPU algorithm: a Bernoulli(1 - p) mask drawn with bernoulli_ from the device
    generator (so the same seed gives the same mask as on CPU), then input * mask / (1 - p)."""
    if input.numel() == 0:
        return input.clone(), torch.empty_like(input, dtype=torch.bool)
    if train is None or train:
        keep = 1.0 - p
        mask = torch.empty_like(input).bernoulli_(keep)
        scale = 0.0 if keep == 0 else 1.0 / keep
        return input * mask * scale, mask.bool()
    return input.clone(), torch.ones_like(input, dtype=torch.bool)


@lowering("native_dropout_backward")
def native_dropout_backward(grad_output, mask, scale):
    return grad_output * mask * scale


# ----------------------------------------------------------------------------------------------
# Embedding (the forward, a gather, is in indexing.py)


@lowering("embedding_dense_backward")
def embedding_dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    """Rows of grad_output summed into the rows they were gathered from; the padding row gets
    no gradient; with scale_grad_by_freq each row is divided by its index's count."""
    idx = mx.reshape(indices, (-1,))
    grad = mx.reshape(_upcast(grad_output), (idx.size, -1))
    if padding_idx >= 0:
        grad = mx.where((idx == padding_idx)[:, None], 0, grad)
    if scale_grad_by_freq:
        counts = mx.zeros((num_weights,), mx.float32).at[idx].add(1.0)
        grad = grad / counts[idx][:, None]
    return mx.zeros((num_weights, grad.shape[1]), grad.dtype).at[idx].add(grad)


# ----------------------------------------------------------------------------------------------
# Losses


def _nll_weights(target, weight, ignore_index):
    """Per-target class weights, 0 where the target is ignore_index."""
    w = mx.ones(target.shape, mx.float32) if weight is None else mx.take(weight, target)
    return mx.where(target == ignore_index, 0, w)


def _nll_forward(self, target, weight, reduction, ignore_index):
    """nll_loss over a class axis 1 (or 0 for unbatched input)."""
    class_axis = 0 if self.ndim == 1 else 1
    safe = mx.where(target == ignore_index, 0, target)
    picked = mx.take_along_axis(_upcast(self), mx.expand_dims(safe, class_axis), class_axis)
    w = _nll_weights(target, weight, ignore_index)
    loss = -mx.squeeze(picked, class_axis) * w
    total_weight = mx.sum(w)
    if reduction == 0:
        return loss, mx.array(0.0)
    if reduction == 2:
        return mx.sum(loss), total_weight
    return mx.sum(loss) / total_weight, total_weight


def _check_targets(target, n_classes, ignore_index):
    valid = (target == ignore_index) | ((target >= 0) & (target < n_classes))
    if not mx.all(valid).item():
        bad = mx.min(mx.where(valid, n_classes, target)).item() if mx.any(target < 0).item() \
            else mx.max(mx.where(valid, -1, target)).item()
        raise IndexError(f"Target {bad} is out of bounds.")


@lowering("nll_loss_forward", "nll_loss2d_forward")
def nll_loss_forward(self, target, weight, reduction, ignore_index):
    if not tracing():  # value-dependent: compiled graphs cannot check
        _check_targets(target, self.shape[0 if self.ndim == 1 else 1], ignore_index)
    return _nll_forward(self, target, weight, reduction, ignore_index)


@lowering("nll_loss_backward", "nll_loss2d_backward")
def nll_loss_backward(grad_output, self, target, weight, reduction, ignore_index, total_weight):
    """d loss / d self: -weight * grad at each target class, 0 elsewhere."""
    class_axis = 0 if self.ndim == 1 else 1
    g = _upcast(grad_output)
    if reduction == 1:
        g = g / total_weight
    w = _nll_weights(target, weight, ignore_index) * g
    classes = mx.arange(self.shape[class_axis])
    classes = mx.reshape(classes, (-1,) + (1,) * (self.ndim - class_axis - 1))
    hit = mx.expand_dims(target, class_axis) == classes
    return mx.where(hit, -mx.expand_dims(w, class_axis), 0)


@lowering("mse_loss")
def mse_loss(self, target, reduction=1):
    d = _upcast(self) - _upcast(target)
    return _reduce(d * d, reduction)


@lowering("mse_loss_backward")
def mse_loss_backward(grad_output, self, target, reduction):
    d = _upcast(self) - _upcast(target)
    return 2 * d * _reduction_grad(_upcast(grad_output), d.size, reduction)


# ----------------------------------------------------------------------------------------------
# Convolution. torch is channels-first (N, C, *spatial); MLX's conv_general is channels-last
# (N, *spatial, C) with weights (C_out, *kernel, C_in / groups).


def _channels_last(x):
    return mx.moveaxis(x, 1, -1)


def _channels_first(x):
    return mx.moveaxis(x, -1, 1)


def _conv_general(x, w, groups, **kwargs):
    """mx.conv_general, with groups done one by one where MLX has no grouped kernel (3-d)."""
    if not mx.issubdtype(x.dtype, mx.inexact):
        return _integer_conv_general(x, w, groups, **kwargs)
    if not tracing():  # MLX's GPU reads its TF32 switch at its first float32 GEMM or conv
        precision.ensure()
    if groups == 1 or x.ndim < 5:
        return mx.conv_general(x, w, groups=groups, **kwargs)
    xs, ws = mx.split(x, groups, axis=-1), mx.split(w, groups, axis=0)
    return mx.concatenate([mx.conv_general(a, b, **kwargs) for a, b in zip(xs, ws)], axis=-1)


def _integer_conv_general(x, w, groups, stride=1, padding=0, kernel_dilation=1,
                          input_dilation=1, flip=False):
    """mx.conv_general for integer tensors, which MLX's convolution rejects: the input dilated
    and padded, then one strided slice per kernel offset multiplied with that offset's weights
    and summed over the input channels in the integer dtype. Integer sums are exact (wrapping
    around as the CPU's do), so the order of accumulation does not matter."""
    n, *size, c_in = x.shape
    c_out, *kernel, c_in_g = w.shape
    d = len(size)

    def per_dim(v):  # an int, or a list of one or d of them (as MLX's conv_general takes)
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return v * d if len(v) == 1 else v

    stride, kernel_dilation, input_dilation = map(per_dim, (stride, kernel_dilation,
                                                            input_dilation))
    lo, hi = (per_dim(padding[0]), per_dim(padding[1])) if isinstance(padding, tuple) \
        else (per_dim(padding), per_dim(padding))
    for axis, step in enumerate(input_dilation, start=1):  # zeros between input elements
        if step > 1 and x.shape[axis] > 1:
            zeros = mx.zeros(x.shape[:axis + 1] + (step - 1,) + x.shape[axis + 1:], x.dtype)
            spread = mx.concatenate([mx.expand_dims(x, axis + 1), zeros], axis=axis + 1)
            shape = x.shape[:axis] + (x.shape[axis] * step,) + x.shape[axis + 1:]
            x = mx.reshape(spread, shape)[(slice(None),) * axis + (slice(0, shape[axis] - step
                                                                          + 1),)]
    x = mx.pad(x, [(0, 0)] + list(zip(lo, hi)) + [(0, 0)])
    if flip:
        w = w[(slice(None),) + (slice(None, None, -1),) * d]
    out_size = [(x.shape[i + 1] - kernel_dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                for i in range(d)]
    c_out_g = c_out // groups
    w = mx.reshape(w, (groups, c_out_g, *kernel, c_in_g))
    total = mx.zeros((n, *out_size, groups, c_out_g), x.dtype)
    if min(out_size) > 0 and c_in_g > 0:
        for offset in itertools.product(*(range(k) for k in kernel)):
            window = tuple(slice(o * dil, o * dil + (m - 1) * st + 1, st)
                           for o, dil, m, st in zip(offset, kernel_dilation, out_size, stride))
            patch = mx.reshape(x[(slice(None),) + window], (n, *out_size, groups, 1, c_in_g))
            taps = w[(slice(None), slice(None)) + offset]  # (groups, c_out_g, c_in_g)
            total = total + mx.sum(patch * taps, axis=-1)
    return mx.reshape(total, (n, *out_size, c_out))

def _conv(input, weight, stride, padding, dilation, transposed, output_padding, groups):
    x = _channels_last(input)
    if not transposed:
        y = _conv_general(x, _channels_last(weight), groups, stride=list(stride),
                          padding=list(padding), kernel_dilation=list(dilation))
        return _channels_first(y)
    # A transposed convolution correlates the input, dilated by the stride, with the flipped
    # kernel: each side padded by the kernel's reach minus `padding` (plus output_padding at the
    # end). Its weight (C_in, C_out / groups, *k) becomes (C_out, C_in / groups, *k) per group.
    c_in, c_out_g, *kernel = weight.shape
    w = mx.reshape(weight, [groups, c_in // groups, c_out_g] + kernel)
    w = mx.reshape(mx.swapaxes(w, 1, 2), [groups * c_out_g, c_in // groups] + kernel)
    reach = [d * (k - 1) for d, k in zip(dilation, kernel)]
    lo = [r - p for r, p in zip(reach, padding)]
    hi = [r - p + o for r, p, o in zip(reach, padding, output_padding)]
    y = _conv_general(x, _channels_last(w), groups, stride=1,
                      padding=([max(p, 0) for p in lo], [max(p, 0) for p in hi]),
                      kernel_dilation=list(dilation), input_dilation=list(stride), flip=True)
    # negative padding (padding > the kernel's reach) crops the result instead
    crop = tuple(slice(max(-a, 0), y.shape[i + 1] - max(-b, 0))
                 for i, (a, b) in enumerate(zip(lo, hi)))
    return _channels_first(y[(slice(None),) + crop])


@lowering("convolution")
def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                groups):
    if bias is not None and input.dtype in (mx.float16, mx.bfloat16):
        # the CPU adds the bias to the float32 sums and rounds once; a half convolution
        # followed by a half add would round twice
        input, weight, bias = _upcast(input), _upcast(weight), _upcast(bias)
    out = _conv(input, weight, stride, padding, dilation, transposed, output_padding, groups)
    if bias is not None:
        out = out + mx.reshape(bias, (-1,) + (1,) * (out.ndim - 2))
    return out


@lowering("convolution_backward")
def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
                         transposed, output_padding, groups, output_mask):
    """Gradients by MLX's vjp of a plain convolution (results not asked for are never
    evaluated: MLX is lazy). A transposed convolution is the adjoint of the plain one with the
    same weight, <conv_transpose(x, w), g> = <x, conv(g, w)>: its input gradient is conv(g, w)
    and its weight gradient the vjp of conv(g, .) with cotangent x."""
    def conv(x, w):
        return _conv(x, w, stride, padding, dilation, False, None, groups)

    if transposed:
        # output_padding may reach past a stride: conv(g, w) then covers positions beyond the
        # input's, which the adjoint does not include
        def adjoint(w):
            return conv(grad_output, w)[tuple(slice(0, n) for n in input.shape)]

        grad_input = adjoint(weight)
        _, (grad_weight,) = mx.vjp(adjoint, [weight], [input])
    else:
        _, (grad_input, grad_weight) = mx.vjp(conv, [input, weight], [grad_output])
    grad_bias = mx.sum(grad_output, axis=[0] + list(range(2, grad_output.ndim)))
    return tuple(g if asked else None
                 for g, asked in zip((grad_input, grad_weight, grad_bias), output_mask))


# ----------------------------------------------------------------------------------------------
# Pooling over the last n dims ((N, C, *spatial) or unbatched (C, *spatial)).


def _pool_params(n, kernel_size, stride, padding, dilation=1):
    def full(v):
        return [v] * n if isinstance(v, int) else list(v) * (n if len(v) == 1 else 1)

    kernel = full(kernel_size)
    return kernel, full(stride) if stride else kernel, full(padding), full(dilation)


def _pooled_size(size, k, s, p, d, ceil_mode):
    """torch's pooling_output_shape: with ceil_mode the last window must start inside the
    input or its left padding."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _windows(x, out, kernel, stride, dilation):
    """Sliding windows of the last len(kernel) dims: (..., *spatial) -> (..., *out, *kernel),
    a strided view of x (whose far side is padded to cover the last window)."""
    n = len(kernel)
    row_strides = [1]
    for size in reversed(x.shape[1:]):
        row_strides.insert(0, row_strides[0] * size)
    lead, spatial = row_strides[:-n], row_strides[-n:]
    shape = list(x.shape[:-n]) + list(out) + list(kernel)
    strides = lead + [t * s for t, s in zip(spatial, stride)] + \
        [t * d for t, d in zip(spatial, dilation)]
    return mx.as_strided(x, shape, strides)


def _padded_windows(x, n, kernel, stride, padding, dilation, ceil_mode, value):
    """Windows over x padded with `value`: the padding on the left, and on the right as far as
    the last window reaches."""
    spatial = x.shape[-n:]
    out = [_pooled_size(*a, ceil_mode) for a in zip(spatial, kernel, stride, padding, dilation)]
    far = [max((o - 1) * s + d * (k - 1) + 1 - size - p, 0)
           for o, s, d, k, size, p in zip(out, stride, dilation, kernel, spatial, padding)]
    widths = [(0, 0)] * (x.ndim - n) + list(zip(padding, far))
    padded = mx.pad(x, widths, constant_values=value)
    return _windows(padded, out, kernel, stride, dilation), out


def _max_pool(self, n, kernel_size, stride, padding, dilation, ceil_mode):
    """(max, flat index into the input's spatial plane) per window."""
    kernel, stride, padding, dilation = _pool_params(n, kernel_size, stride, padding, dilation)
    geometry = (n, kernel, stride, padding, dilation, ceil_mode)
    win, out = _padded_windows(self, *geometry, -math.inf)
    # the same windows over a plane of flat input indices give each element's index
    index_win, _ = _padded_windows(_index_plane(self, n), *geometry, -1)
    return _window_max(win, index_win, n)


def _index_plane(x, n):
    """The flat index of each position of x's last n dims."""
    return mx.reshape(mx.arange(math.prod(x.shape[-n:])), x.shape[-n:])


def _window_max(win, index_win, n):
    """Max and its input index over windows (..., *out, *kernel). A NaN wins, and of several
    NaNs the last, as in torch's CPU kernels (`val > max || isnan(val)`)."""
    k = math.prod(win.shape[-n:])
    if win.size == 0:  # MLX cannot reduce empty arrays
        return mx.zeros(win.shape[:-n], win.dtype), mx.zeros(win.shape[:-n], mx.int32)
    win = mx.reshape(win, win.shape[:-n] + (k,))
    nan = mx.isnan(win)
    last_nan = k - 1 - mx.argmax(nan[..., ::-1], axis=-1)
    arg = mx.where(mx.any(nan, axis=-1), last_nan, mx.argmax(win, axis=-1))
    index_win = mx.broadcast_to(mx.reshape(index_win, index_win.shape[:-n] + (k,)), win.shape)
    index = mx.take_along_axis(index_win, arg[..., None], -1)[..., 0]
    return mx.max(win, axis=-1), index


@lowering("max_pool2d_with_indices")
def max_pool2d_with_indices(self, kernel_size, stride=(), padding=0, dilation=1,
                            ceil_mode=False):
    return _max_pool(self, 2, kernel_size, stride, padding, dilation, ceil_mode)


@lowering("max_pool3d_with_indices")
def max_pool3d_with_indices(self, kernel_size, stride=(), padding=0, dilation=1,
                            ceil_mode=False):
    return _max_pool(self, 3, kernel_size, stride, padding, dilation, ceil_mode)


def _scatter_to_plane(grad_output, self, n, indices):
    """Each output gradient added at its flat input index (max pooling's backward)."""
    lead = math.prod(self.shape[:-n])
    plane = math.prod(self.shape[-n:])
    grad = mx.zeros((lead, plane), grad_output.dtype)
    if grad.size == 0 or indices.size == 0:  # MLX cannot scatter into or from empty arrays
        return mx.reshape(grad, self.shape)
    per_row = math.prod(indices.shape[-n:])
    rows = mx.arange(lead)[:, None]
    grad = accumulate_at(grad, (rows, mx.reshape(indices, (lead, per_row))),
                         mx.reshape(grad_output, (lead, per_row)))
    return mx.reshape(grad, self.shape)


@lowering("max_pool2d_with_indices_backward")
def max_pool2d_with_indices_backward(grad_output, self, kernel_size, stride, padding, dilation,
                                     ceil_mode, indices):
    return _scatter_to_plane(_upcast(grad_output), self, 2, indices)


@lowering("max_pool3d_with_indices_backward")
def max_pool3d_with_indices_backward(grad_output, self, kernel_size, stride, padding, dilation,
                                     ceil_mode, indices):
    return _scatter_to_plane(_upcast(grad_output), self, 3, indices)


def _avg_pool(self, n, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override):
    if divisor_override is not None and divisor_override == 0:
        # the CPU kernel's check (torch 2.13's meta function has it too, 2.11's does not)
        raise RuntimeError("divisor must be not zero")
    kernel, stride, padding, _ = _pool_params(n, kernel_size, stride, padding)
    geometry = (n, kernel, stride, padding, [1] * n, ceil_mode)
    win, out = _padded_windows(_upcast(self), *geometry, 0)
    sums = mx.sum(win, axis=tuple(range(-n, 0)))
    if divisor_override:
        return sums / divisor_override
    # torch divides by the window's overlap with the input and its padding (count_include_pad)
    # or with the input alone; never by the part of a ceil_mode window past the padding
    divisor = mx.array(1.0)
    for i, (size, k, s, p) in enumerate(zip(self.shape[-n:], kernel, stride, padding)):
        start = mx.arange(out[i]) * s  # in padded coordinates
        if count_include_pad:
            count = mx.minimum(start + k, size + 2 * p) - start
        else:
            count = mx.minimum(start + k, size + p) - mx.maximum(start, p)
        divisor = divisor * mx.reshape(count, (-1,) + (1,) * (n - 1 - i))
    return sums / divisor


@lowering("avg_pool2d")
def avg_pool2d(self, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return _avg_pool(self, 2, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


@lowering("avg_pool3d")
def avg_pool3d(self, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return _avg_pool(self, 3, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def _avg_pool_backward(grad_output, self, n, *params):
    """Average pooling is linear: its backward is MLX's vjp of the same pooling."""
    if self.size == 0:  # MLX cannot scatter into an empty array
        return mx.zeros(self.shape, mx.float32)
    _, (grad,) = mx.vjp(lambda x: _avg_pool(x, n, *params), [self], [_upcast(grad_output)])
    return grad


@lowering("avg_pool2d_backward")
def avg_pool2d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override):
    return _avg_pool_backward(grad_output, _upcast(self), 2, kernel_size, stride, padding,
                              ceil_mode, count_include_pad, divisor_override)


@lowering("avg_pool3d_backward")
def avg_pool3d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override):
    return _avg_pool_backward(grad_output, _upcast(self), 3, kernel_size, stride, padding,
                              ceil_mode, count_include_pad, divisor_override)


# Adaptive pooling: output cell i of a dim of size L pools [floor(i L / O), ceil((i + 1) L / O)).


def _adaptive_bounds(size, out):
    i = mx.arange(out)
    return (i * size) // out, ((i + 1) * size + out - 1) // out


def _adaptive_avg_pool(self, output_size):
    """A mean over each cell is a contraction with an averaging matrix per dim."""
    x = _upcast(self)
    n = len(output_size)
    for i, out in enumerate(output_size):
        axis = x.ndim - n + i
        start, end = _adaptive_bounds(x.shape[axis], out)
        j = mx.arange(x.shape[axis])
        inside = (j >= start[:, None]) & (j < end[:, None])
        averaging = mx.where(inside, 1.0 / (end - start)[:, None], 0.0)  # (out, size)
        x = mx.moveaxis(mx.matmul(averaging, mx.moveaxis(x, axis, -2)), -2, axis)
    return x


@lowering("_adaptive_avg_pool2d")
def adaptive_avg_pool2d(self, output_size):
    return _adaptive_avg_pool(self, output_size)


@lowering("_adaptive_avg_pool3d")
def adaptive_avg_pool3d(self, output_size):
    return _adaptive_avg_pool(self, output_size)


def _adaptive_avg_pool_backward(grad_output, self, n):
    """The pooling is linear: its backward is MLX's vjp of the same pooling."""
    size = grad_output.shape[-n:]
    _, (grad,) = mx.vjp(lambda x: _adaptive_avg_pool(x, size), [_upcast(self)],
                        [_upcast(grad_output)])
    return grad


@lowering("_adaptive_avg_pool2d_backward")
def adaptive_avg_pool2d_backward(grad_output, self):
    return _adaptive_avg_pool_backward(grad_output, self, 2)


@lowering("_adaptive_avg_pool3d_backward")
def adaptive_avg_pool3d_backward(grad_output, self):
    return _adaptive_avg_pool_backward(grad_output, self, 3)


def _adaptive_windows(x, output_size):
    """Cells as equal windows (..., *out, *kmax): a cell narrower than the widest repeats its
    last element, which changes neither its max nor which element is the first (or last) max."""
    n = len(output_size)
    lead = x.ndim - n
    for i, out in enumerate(output_size):
        axis = lead + 2 * i  # the dims before have become (out, kmax) pairs
        size = x.shape[axis]
        start, end = _adaptive_bounds(size, out)
        kmax = max(((j + 1) * size + out - 1) // out - (j * size) // out for j in range(out))
        pos = mx.minimum(start[:, None] + mx.arange(kmax), end[:, None] - 1)
        x = mx.take(x, mx.reshape(pos, (-1,)), axis=axis)
        x = mx.reshape(x, x.shape[:axis] + (out, kmax) + x.shape[axis + 1:])
    order = [lead + 2 * i for i in range(n)] + [lead + 2 * i + 1 for i in range(n)]
    return mx.transpose(x, list(range(lead)) + order)


def _adaptive_max_pool(self, output_size):
    n = len(output_size)
    index_win = _adaptive_windows(_index_plane(self, n), output_size)
    return _window_max(_adaptive_windows(self, output_size), index_win, n)


@lowering("adaptive_max_pool2d")
def adaptive_max_pool2d(self, output_size):
    return _adaptive_max_pool(self, output_size)


@lowering("adaptive_max_pool3d")
def adaptive_max_pool3d(self, output_size):
    return _adaptive_max_pool(self, output_size)


@lowering("adaptive_max_pool2d_backward")
def adaptive_max_pool2d_backward(grad_output, self, indices):
    return _scatter_to_plane(_upcast(grad_output), self, 2, indices)


@lowering("adaptive_max_pool3d_backward")
def adaptive_max_pool3d_backward(grad_output, self, indices):
    return _scatter_to_plane(_upcast(grad_output), self, 3, indices)


# ----------------------------------------------------------------------------------------------
# More losses. reduction: 0 = none, 1 = mean, 2 = sum.


@lowering("binary_cross_entropy")
def binary_cross_entropy(self, target, weight=None, reduction=1):
    """Each log is clamped at -100, as in torch, so that 0 and 1 give finite losses."""
    x, t = _upcast(self), _upcast(target)
    if not tracing() and mx.any((x < 0) | (x > 1)).item():
        raise RuntimeError("all elements of input should be between 0 and 1")
    loss = (t - 1) * mx.maximum(mx.log1p(-x), -100) - t * mx.maximum(mx.log(x), -100)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


@lowering("binary_cross_entropy_backward")
def binary_cross_entropy_backward(grad_output, self, target, weight=None, reduction=1):
    x, t = _upcast(self), _upcast(target)
    grad = _reduction_grad(_upcast(grad_output), x.size, reduction)
    grad = grad * (x - t) / mx.maximum((1 - x) * x, 1e-12)
    return grad if weight is None else grad * weight


@lowering("smooth_l1_loss")
def smooth_l1_loss(self, target, reduction=1, beta=1.0):
    z = mx.abs(_upcast(self) - _upcast(target))
    if beta == 0:
        return _reduce(z, reduction)
    return _reduce(mx.where(z < beta, 0.5 * z * z / beta, z - 0.5 * beta), reduction)


@lowering("smooth_l1_loss_backward")
def smooth_l1_loss_backward(grad_output, self, target, reduction, beta):
    d = _upcast(self) - _upcast(target)
    grad = _reduction_grad(_upcast(grad_output), d.size, reduction)
    slope = mx.sign(d) if beta == 0 else mx.where(mx.abs(d) < beta, d / beta, mx.sign(d))
    return slope * grad


@lowering("huber_loss")
def huber_loss(self, target, reduction=1, delta=1.0):
    z = mx.abs(_upcast(self) - _upcast(target))
    return _reduce(mx.where(z < delta, 0.5 * z * z, delta * (z - 0.5 * delta)), reduction)


@lowering("huber_loss_backward")
def huber_loss_backward(grad_output, self, target, reduction, delta):
    d = _upcast(self) - _upcast(target)
    grad = _reduction_grad(_upcast(grad_output), d.size, reduction)
    return mx.clip(d, -delta, delta) * grad


def _multi_margin_terms(self, target, p, margin, weight):
    """max(0, margin - x[y] + x[j]) ** p for every class j != y, weighted by weight[y]."""
    x = mx.reshape(_upcast(self), (-1, self.shape[-1] if self.ndim else 1))  # unbatched: 1 row
    y = mx.reshape(target, (-1, 1))
    picked = mx.take_along_axis(x, y, axis=1)
    hinge = mx.maximum(margin - picked + x, 0)
    terms = hinge if p == 1 else hinge * hinge
    if weight is not None:
        terms = terms * mx.take(weight, y)
    not_target = mx.arange(x.shape[1]) != y
    return mx.where(not_target, terms, 0), hinge, not_target, x.shape[1]


def _multi_margin_loss_spec(spec, self, target, p=1, margin=1, weight=None, reduction=1):
    """The CPU kernel gives the unreduced loss the target's shape: () for a 0-d target (one
    unbatched sample). torch's meta kernel, its decomposition, gives (1,)."""
    return ((), spec[1], ()) if reduction == 0 and target.dim() == 0 else spec


@lowering("multi_margin_loss", spec=_multi_margin_loss_spec)
def multi_margin_loss(self, target, p=1, margin=1, weight=None, reduction=1):
    terms, _, _, n_classes = _multi_margin_terms(self, target, p, margin, weight)
    loss = mx.sum(terms, axis=1) / n_classes
    return _reduce(loss if self.ndim == 2 else mx.reshape(loss, target.shape), reduction)


@lowering("multi_margin_loss_backward")
def multi_margin_loss_backward(grad_output, self, target, p, margin, weight=None, reduction=1):
    """Each active hinge pushes x[j] up and x[y] down by its slope."""
    _, hinge, not_target, n_classes = _multi_margin_terms(self, target, p, margin, None)
    slope = mx.where(not_target & (hinge > 0), 1.0 if p == 1 else 2 * hinge, 0.0)
    if weight is not None:
        slope = slope * mx.take(weight, mx.reshape(target, (-1, 1)))
    y_slope = -mx.sum(slope, axis=1, keepdims=True)
    grad = mx.where(not_target, slope, y_slope) / n_classes
    g = _upcast(grad_output)
    if reduction == 0 and self.ndim == 2:
        g = g[:, None]
    elif reduction == 1:
        g = g / (self.shape[0] if self.ndim == 2 else 1)
    return mx.reshape(grad * g, self.shape)


def _multilabel_active(self, target):
    """(x, targets, hinge terms (N, K, C) that count, is_target) for multilabel_margin_loss:
    each row's targets are the class indices before its first -1; every target t and every
    non-target class j contribute max(0, 1 - x[t] + x[j])."""
    c = self.shape[-1] if self.ndim else 1
    x = mx.reshape(_upcast(self), (-1, c))
    t = mx.reshape(target, (-1, c))
    valid = mx.cumprod((t >= 0).astype(mx.int32), axis=1).astype(mx.bool_)
    safe = mx.where(valid, t, 0)
    is_target = mx.any((safe[:, :, None] == mx.arange(c)) & valid[:, :, None], axis=1)
    hinge = 1 - mx.take_along_axis(x, safe, axis=1)[:, :, None] + x[:, None, :]
    counts = valid[:, :, None] & ~is_target[:, None, :]
    return x, safe, mx.where(counts, hinge, 0), is_target


def _multilabel_margin_loss_spec(spec, self, target, reduction):
    """The CPU kernel gives an unbatched (0-d or 1-d) input's unreduced loss shape ();
    torch's meta kernel, its decomposition, gives (1,)."""
    (_, loss_dtype, _), is_target = spec
    return (((), loss_dtype, ()), is_target) if reduction == 0 and self.dim() < 2 else spec


@lowering("multilabel_margin_loss_forward", spec=_multilabel_margin_loss_spec)
def multilabel_margin_loss_forward(self, target, reduction):
    x, _, hinge, is_target = _multilabel_active(self, target)
    loss = mx.sum(mx.maximum(hinge, 0), axis=(1, 2)) / x.shape[1]
    if self.ndim < 2:
        loss = mx.reshape(loss, ())
    return _reduce(loss, reduction), mx.reshape(is_target, target.shape)


@lowering("multilabel_margin_loss_backward")
def multilabel_margin_loss_backward(grad_output, self, target, reduction, is_target):
    x, safe, hinge, _ = _multilabel_active(self, target)
    active = (hinge > 0).astype(mx.float32)  # (N, K, C): raises x[j], lowers x[t_k]
    grad = mx.sum(active, axis=1)
    rows = mx.arange(x.shape[0])[:, None]
    grad = grad.at[rows, safe].add(-mx.sum(active, axis=2))
    g = _upcast(grad_output)
    if reduction == 0 and self.ndim == 2:
        g = g[:, None]
    elif reduction == 1:
        g = g / x.shape[0]
    return mx.reshape(grad * g / x.shape[1], self.shape)


# ----------------------------------------------------------------------------------------------
# Upsampling. Each spatial dim is resampled separately: output position o reads the input at
# taps idx[o, :] with weights w[o, :] (torch's CPU index/weight rules, in float32 like its
# kernels). Gathering taps (not a dense matrix product) keeps NaN and inf local as on CPU.


def _source_scale(in_size, out_size, align_corners, scale):
    """torch's area_pixel_compute_scale."""
    if align_corners:
        if out_size <= 1:
            return mx.array(0.0)
        return mx.array(in_size - 1, mx.float32) / (out_size - 1)
    if scale is not None and scale > 0:
        return mx.array(1.0 / scale, mx.float32)
    return mx.array(in_size, mx.float32) / out_size


def _source_index(in_size, out_size, align_corners, scale, clamp_at_zero):
    s = _source_scale(in_size, out_size, align_corners, scale)
    dst = mx.arange(out_size, dtype=mx.float32)
    if align_corners:
        return s * dst
    # torch's CPU kernels compute scale * (dst + 0.5) - 0.5 as one fused multiply-add (the
    # compiler contracts it), rounded once: the product is exact in float64, so is the
    # subtraction, and one rounding to float32 gives the fused result (two roundings moved
    # whole output rows by one ulp of the coordinate: 2e-4 at 345 -> 270 rows)
    with mx.stream(mx.cpu):
        src = (s.astype(mx.float64) * (dst + 0.5).astype(mx.float64) - 0.5).astype(mx.float32)
    return mx.maximum(src, 0) if clamp_at_zero else src


def _guarded(src, in_size):
    """torch's guard_index_and_lambda: floor index (at most in_size - 1), fraction in [0, 1]."""
    index = mx.minimum(mx.floor(src), in_size - 1)
    return index.astype(mx.int32), mx.clip(src - index, 0, 1)


def _nearest_taps(in_size, out_size, align_corners, scale, exact=False):
    if out_size == in_size and not exact:
        return mx.arange(out_size)[:, None], None
    s = _source_scale(in_size, out_size, False, scale)
    dst = mx.arange(out_size, dtype=mx.float32)
    src = mx.floor((dst + 0.5) * s if exact else dst * s)
    return mx.minimum(src.astype(mx.int32), in_size - 1)[:, None], None


def _linear_taps(in_size, out_size, align_corners, scale):
    index, frac = _guarded(_source_index(in_size, out_size, align_corners, scale, True), in_size)
    upper = mx.minimum(index + 1, in_size - 1)
    return mx.stack([index, upper], axis=1), mx.stack([1 - frac, frac], axis=1)


def _cubic_taps(in_size, out_size, align_corners, scale):
    """Keys' cubic convolution (A = -0.75) over 4 taps, clamped at the borders."""
    index, t = _guarded(_source_index(in_size, out_size, align_corners, scale, False), in_size)
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = mx.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = mx.clip(index[:, None] - 1 + mx.arange(4), 0, in_size - 1)
    return taps, weights


def _antialias_taps(in_size, out_size, align_corners, scale, filter_fn, interp_size):
    """torch's antialiased weights: when downsampling, the filter is stretched over `scale`
    input pixels; each output's weights are normalised to sum to 1."""
    s = _source_scale(in_size, out_size, align_corners, scale).item()
    s32 = mx.array(s, mx.float32)
    support = (interp_size * 0.5) * s if s >= 1.0 else interp_size * 0.5
    invscale = 1.0 / s if s >= 1.0 else 1.0
    center = s32 * (mx.arange(out_size, dtype=mx.float32) + 0.5)
    lo = mx.maximum((center - support + 0.5).astype(mx.int32), 0)  # truncation, as in C
    hi = mx.minimum((center + support + 0.5).astype(mx.int32), in_size)
    width = int(mx.max(hi - lo).item()) if out_size else 0
    j = mx.arange(width)
    w = filter_fn(((j + lo[:, None]).astype(mx.float32) - center[:, None] + 0.5) * invscale)
    w = mx.where(j < (hi - lo)[:, None], w, 0)
    total = mx.sum(w, axis=1, keepdims=True)
    w = mx.where(total != 0, w / mx.where(total != 0, total, 1), w)
    return mx.minimum(lo[:, None] + j, in_size - 1), w


def _triangle(x):
    return mx.maximum(1 - mx.abs(x), 0)


def _keys_cubic(x, a=-0.5):
    x = mx.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return mx.where(x < 1, near, mx.where(x < 2, far, 0))


_TAPS = {
    "nearest": _nearest_taps,
    "nearest_exact": lambda *a: _nearest_taps(*a, exact=True),
    "linear": _linear_taps,
    "cubic": _cubic_taps,
    "linear_aa": lambda *a: _antialias_taps(*a, _triangle, 2),
    "cubic_aa": lambda *a: _antialias_taps(*a, _keys_cubic, 4),
}


def _upsample(x, mode, output_size, align_corners, scales):
    n = len(output_size)
    x = _upcast(x)
    for i, (out, scale) in enumerate(zip(output_size, scales)):
        axis = x.ndim - n + i
        taps, weights = _TAPS[mode](x.shape[axis], out, align_corners, scale)
        moved = mx.moveaxis(x, axis, -1)
        picked = mx.take(moved, taps, axis=-1)  # (..., out, taps)
        y = picked[..., 0] if weights is None else mx.sum(picked * weights, axis=-1)
        x = mx.moveaxis(y, -1, axis)
    return x


def _register_upsample(name, mode, n, aligned):
    def split(rest):
        """(align_corners, scales) from the arguments after output_size (or input_size)."""
        rest = list(rest)
        align_corners = rest.pop(0) if aligned else False
        return align_corners, (rest + [None] * n)[:n]

    @lowering(name)
    def forward(self, output_size, *rest):
        align_corners, scales = split(rest)
        return _upsample(self, mode, output_size, align_corners, scales)

    @lowering(name + "_backward")
    def backward(grad_output, output_size, input_size, *rest):
        """Upsampling is linear: its backward is MLX's vjp of the same upsampling."""
        align_corners, scales = split(rest)
        if math.prod(input_size) == 0:
            return mx.zeros(input_size, mx.float32)
        _, (grad,) = mx.vjp(lambda x: _upsample(x, mode, output_size, align_corners, scales),
                            [mx.zeros(input_size, mx.float32)], [_upcast(grad_output)])
        return grad


for _name, _mode, _n, _aligned in [
    ("upsample_nearest1d", "nearest", 1, False),
    ("upsample_nearest2d", "nearest", 2, False),
    ("upsample_nearest3d", "nearest", 3, False),
    ("_upsample_nearest_exact1d", "nearest_exact", 1, False),
    ("_upsample_nearest_exact2d", "nearest_exact", 2, False),
    ("_upsample_nearest_exact3d", "nearest_exact", 3, False),
    ("upsample_linear1d", "linear", 1, True),
    ("upsample_bilinear2d", "linear", 2, True),
    ("upsample_trilinear3d", "linear", 3, True),
    ("upsample_bicubic2d", "cubic", 2, True),
    ("_upsample_bilinear2d_aa", "linear_aa", 2, True),
    ("_upsample_bicubic2d_aa", "cubic_aa", 2, True),
]:
    _register_upsample(_name, _mode, _n, _aligned)


# ----------------------------------------------------------------------------------------------
# grid_sample: interpolation 0 bilinear, 1 nearest, 2 bicubic; padding 0 zeros, 1 border,
# 2 reflection (torch's GridSampler.h rules). grid[..., 0] indexes the last (W) dim.


def _unnormalize(coord, size, align_corners, fused=False):
    """The pixel coordinate of a grid value. ``fused``: as torch's vectorised 2-D float32
    kernel computes it, (coord + 1) * (size / 2) - 1/2 with one rounding (GCC contracts it into
    a fused multiply-add; a 1-ulp difference in the coordinate moves the output by that much
    times the input's local gradient: 4e-3 on OpInfo's reference inputs)."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    if fused:
        return fma32(coord + 1, mx.array(size / 2, coord.dtype), mx.array(-0.5, coord.dtype))
    return ((coord + 1) * size - 1) / 2


def _reflect(coord, twice_low, twice_high):
    if twice_low == twice_high:
        return mx.zeros_like(coord)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    coord = mx.abs(coord - low)
    extra = mx.remainder(coord, span)
    flips = mx.floor(coord / span)
    return mx.where(mx.remainder(flips, 2) == 0, extra + low, span - extra + low)


def _pad_coordinate(coord, size, padding_mode, align_corners):
    """Border clamps into the input; reflection mirrors at the borders (pixel centres or
    edges) and then clamps."""
    if padding_mode == 2:
        coord = _reflect(coord, 0, 2 * (size - 1)) if align_corners else \
            _reflect(coord, -1, 2 * size - 1)
    if padding_mode in (1, 2):
        coord = mx.clip(coord, 0, size - 1)
    return coord


def _grid_sample(input, grid, interpolation_mode, padding_mode, align_corners):
    n = grid.shape[-1]
    sizes = input.shape[2:]  # (D,) H, W; grid coordinates come as (x, y[, z])
    x = mx.reshape(_upcast(input), input.shape[:2] + (-1,))
    # torch's 2-D float32 kernel is vectorised (GridSamplerKernel.cpp); 3-D and half inputs
    # take its scalar code, which does not fuse
    fused = n == 2 and input.dtype == mx.float32 and grid.dtype == mx.float32
    coords = [_unnormalize(_upcast(grid[..., n - 1 - d]), sizes[d], align_corners, fused)
              for d in range(n)]
    out_shape = grid.shape[:-1]

    def sample(points):
        """input at integer points (one array per dim), 0 outside the input."""
        inside = mx.array(True)
        flat = mx.array(0)
        for p, size in zip(points, sizes):
            inside = inside & (p >= 0) & (p < size)
            flat = flat * size + mx.clip(p, 0, size - 1).astype(mx.int32)
        flat = mx.stop_gradient(mx.reshape(flat, (flat.shape[0], 1, -1)))
        picked = mx.take_along_axis(x, flat, axis=2)
        return mx.where(mx.reshape(inside, (inside.shape[0], 1, -1)), picked, 0)

    def weighted(w):
        return mx.reshape(w, (w.shape[0], 1, -1))

    if interpolation_mode == 2:  # bicubic: padding applies to each tap, not the coordinate
        a = -0.75
        near = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1  # noqa: E731
        far = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # noqa: E731
        base = [mx.floor(c) for c in coords]
        fracs = [c - b for c, b in zip(coords, base)]
        coeffs = [[far(t + 1), near(t), near(1 - t), far(2 - t)] for t in fracs]
        # separably, as torch: along x within each row of taps, then the rows along y
        # (one weight per tap, cy * cx, rounds otherwise: 1e-4 at values ~100)
        rows = []
        for ky in range(4):
            row = 0
            for kx in range(4):
                points = [_pad_coordinate(b - 1 + k, size, padding_mode, align_corners)
                          for b, k, size in zip(base, (ky, kx), sizes)]
                row = row + sample([mx.floor(p) for p in points]) * weighted(coeffs[1][kx])
            rows.append(row)
        out = 0
        for ky in range(4):
            out = out + rows[ky] * weighted(coeffs[0][ky])
    else:
        coords = [_pad_coordinate(c, size, padding_mode, align_corners)
                  for c, size in zip(coords, sizes)]
        if interpolation_mode == 1:  # nearest, ties to even as nearbyint
            out = sample([mx.round(c) for c in coords])
        else:
            base = [mx.floor(c) for c in coords]
            out = 0
            for corner in _product(range(2), n):
                w = math.prod(c - b if k else b + 1 - c
                              for c, b, k in zip(coords, base, corner))
                out = out + sample([b + k for b, k in zip(base, corner)]) * weighted(w)
    return mx.reshape(out, input.shape[:2] + out_shape[1:])


def _product(values, n):
    if n == 0:
        return [()]
    return [(v,) + rest for v in values for rest in _product(values, n - 1)]


@lowering("grid_sampler_2d", "grid_sampler_3d")
def grid_sampler(input, grid, interpolation_mode, padding_mode, align_corners):
    return _grid_sample(input, grid, interpolation_mode, padding_mode, align_corners)


@lowering("grid_sampler_2d_backward", "grid_sampler_3d_backward")
def grid_sampler_backward(grad_output, input, grid, interpolation_mode, padding_mode,
                          align_corners, output_mask):
    """MLX's vjp of the same sampling (nearest has no gradient with respect to the grid)."""
    def fn(x, g):
        return _grid_sample(x, g, interpolation_mode, padding_mode, align_corners)

    _, (grad_input, grad_grid) = mx.vjp(fn, [_upcast(input), _upcast(grid)],
                                        [_upcast(grad_output)])
    if interpolation_mode == 1:
        grad_grid = mx.zeros(grid.shape, mx.float32)
    return (grad_input if output_mask[0] else None), (grad_grid if output_mask[1] else None)


# ----------------------------------------------------------------------------------------------
# im2col / col2im, channel_shuffle, max_unpool (embedding_renorm_ is in indexing.py)


def _im2col(x, kernel_size, dilation, padding, stride):
    """(N, C, H, W) -> (N, C * kh * kw, L): each sliding block as a column."""
    win, out = _padded_windows(x, 2, list(kernel_size), list(stride), list(padding),
                               list(dilation), False, 0)
    n, c = x.shape[:2]
    cols = mx.transpose(win, (0, 1, 4, 5, 2, 3))  # (N, C, kh, kw, oh, ow)
    return mx.reshape(cols, (n, c * math.prod(kernel_size), math.prod(out)))


@lowering("im2col")
def im2col(self, kernel_size, dilation, padding, stride):
    x = self if self.ndim == 4 else self[None]
    cols = _im2col(x, kernel_size, dilation, padding, stride)
    return cols if self.ndim == 4 else cols[0]


@lowering("col2im")
def col2im(self, output_size, kernel_size, dilation, padding, stride):
    """The adjoint of im2col: each column's entries summed back into the image."""
    cols = self if self.ndim == 3 else self[None]
    channels = cols.shape[1] // math.prod(kernel_size)
    image = mx.zeros((cols.shape[0], channels) + tuple(output_size), cols.dtype)
    if image.size == 0 or cols.size == 0:  # MLX cannot scatter into or from empty arrays
        return image if self.ndim == 3 else image[0]
    _, (out,) = mx.vjp(lambda x: _im2col(x, kernel_size, dilation, padding, stride),
                       [image], [cols])
    return out if self.ndim == 3 else out[0]


@lowering("channel_shuffle")
def channel_shuffle(self, groups):
    n, c = self.shape[:2]
    x = mx.reshape(self, (n, groups, c // groups) + self.shape[2:])
    return mx.reshape(mx.swapaxes(x, 1, 2), self.shape)


def _max_unpool(self, indices, output_size):
    """Each value written at its flat index into a zero plane of output_size."""
    n = len(output_size)
    lead = self.shape[:-n]
    plane = math.prod(output_size)
    rows = math.prod(lead)
    idx = mx.reshape(indices, (rows, -1))
    if not tracing() and idx.size and (mx.min(idx).item() < 0 or mx.max(idx).item() >= plane):
        raise RuntimeError(f"Found an invalid max index: {mx.max(idx).item()} (output volumes "
                           f"are of size {'x'.join(map(str, output_size))}")
    out = mx.zeros((rows, plane), self.dtype)
    out = mx.put_along_axis(out, idx, mx.reshape(self, (rows, -1)), axis=1)
    return mx.reshape(out, lead + tuple(output_size))


@lowering("max_unpool2d")
def max_unpool2d(self, indices, output_size):
    return _max_unpool(self, indices, output_size)


@lowering("max_unpool3d")
def max_unpool3d(self, indices, output_size, stride, padding):
    return _max_unpool(self, indices, output_size)


# ----------------------------------------------------------------------------------------------
# Fractional max pooling: windows of a fixed size start at pseudo-random but given offsets
# (random_samples in [0, 1), one per batch entry, channel and dim: (w, h) in 2-d, (t, h, w) in
# 3-d, as torch's CPU kernels read them).


def _fractional_starts(samples, in_size, out_size, pool):
    """torch's generate_intervals, in float32: start_i = int((i + u) a) - int(u a) with
    a = (in - pool) / (out - 1), and the last window flush with the end."""
    alpha = mx.array(in_size - pool, mx.float32) / max(out_size - 1, 1)
    i = mx.arange(out_size - 1, dtype=mx.float32)
    u = samples[..., None]
    starts = ((i + u) * alpha).astype(mx.int32) - (u * alpha).astype(mx.int32)
    last = mx.full(samples.shape + (1,), in_size - pool, mx.int32)
    return mx.concatenate([starts, last], axis=-1)


def _fractional_max_pool(self, kernel_size, output_size, random_samples, sample_of_dim):
    n = len(output_size)
    x = self if self.ndim == n + 2 else self[None]
    samples = random_samples.astype(mx.float32)
    index_plane = mx.broadcast_to(_index_plane(x, n), x.shape)
    win, index_win = x, index_plane
    for d in range(n):
        axis = 2 + 2 * d  # the dims before have become (out, kernel) pairs
        starts = _fractional_starts(samples[..., sample_of_dim[d]], x.shape[2 + d],
                                    output_size[d], kernel_size[d])
        pos = starts[..., :, None] + mx.arange(kernel_size[d])  # (N, C, out, k)
        taps = output_size[d] * kernel_size[d]
        flat = mx.reshape(pos, pos.shape[:2] + (1,) * (2 * d) + (taps,) + (1,) * (n - d - 1))
        pick = lambda t: mx.take_along_axis(t, flat, axis=axis)  # noqa: E731
        win, index_win = pick(win), pick(index_win)
        split = win.shape[:axis] + (output_size[d], kernel_size[d]) + win.shape[axis + 1:]
        win, index_win = mx.reshape(win, split), mx.reshape(index_win, split)
    order = [0, 1] + [2 + 2 * d for d in range(n)] + [3 + 2 * d for d in range(n)]
    out, index = _window_max(mx.transpose(win, order), mx.transpose(index_win, order), n)
    return (out, index) if self.ndim == n + 2 else (out[0], index[0])


@lowering("fractional_max_pool2d")
def fractional_max_pool2d(self, kernel_size, output_size, random_samples):
    return _fractional_max_pool(self, kernel_size, output_size, random_samples, (1, 0))


@lowering("fractional_max_pool3d")
def fractional_max_pool3d(self, kernel_size, output_size, random_samples):
    return _fractional_max_pool(self, kernel_size, output_size, random_samples, (0, 1, 2))


@lowering("fractional_max_pool2d_backward")
def fractional_max_pool2d_backward(grad_output, self, kernel_size, output_size, indices):
    return _scatter_to_plane(_upcast(grad_output), self, 2, indices)


@lowering("fractional_max_pool3d_backward")
def fractional_max_pool3d_backward(grad_output, self, kernel_size, output_size, indices):
    return _scatter_to_plane(_upcast(grad_output), self, 3, indices)


# ----------------------------------------------------------------------------------------------
# CTC loss: torch's CPU alpha/beta recursions over the extended target (blank, l1, blank, l2,
# ..., blank), vectorised over the batch and the extended positions s.

_NEG_INF = -math.inf


def _log_sum3(a, b, c):
    """log(e^a + e^b + e^c) with torch's guard: all -inf gives -inf."""
    m = mx.maximum(mx.maximum(a, b), c)
    m = mx.where(m == _NEG_INF, 0, m)
    return mx.log(mx.exp(a - m) + mx.exp(b - m) + mx.exp(c - m)) + m


def _shift(x, k, fill=_NEG_INF):
    """x[..., s - k] (k > 0) or x[..., s + |k|] (k < 0) along the last axis, `fill` outside."""
    pad = mx.full(x.shape[:-1] + (abs(k),), fill, x.dtype)
    if k > 0:
        return mx.concatenate([pad, x[..., :-k]], axis=-1)
    return mx.concatenate([x[..., -k:], pad], axis=-1)


def _ctc_setup(log_probs, targets, input_lengths, target_lengths, blank):
    """(log probs of each extended label (T, N, L), extended labels (N, L), where s may skip
    from s - 2, which s are inside each target, input and target lengths as arrays)."""
    n = log_probs.shape[1]
    tl = [int(v) for v in (target_lengths.tolist() if isinstance(target_lengths, mx.array)
                           else target_lengths)]
    il = [int(v) for v in (input_lengths.tolist() if isinstance(input_lengths, mx.array)
                           else input_lengths)]
    s_max = max(tl, default=0)
    if targets.ndim == 1:  # concatenated targets
        starts = [sum(tl[:i]) for i in range(n)]
        index = mx.array([[starts[i] + min(j, max(tl[i] - 1, 0)) for j in range(s_max)]
                          for i in range(n)], mx.int32).reshape(n, s_max)
        labels = mx.take(targets, index) if targets.size else mx.zeros((n, s_max), mx.int32)
    else:
        labels = targets[:, :s_max]
    ext = mx.full((n, 2 * s_max + 1), blank, mx.int32)
    ext[:, 1::2] = labels.astype(mx.int32)
    lp = _upcast(log_probs)
    lp_ext = mx.take_along_axis(lp, mx.broadcast_to(ext[None], (lp.shape[0],) + ext.shape), 2)
    skip = (ext != _shift(ext, 2, blank)) & (mx.arange(ext.shape[1]) >= 2)
    tl_a, il_a = mx.array(tl, mx.int32), mx.array(il, mx.int32)
    inside = mx.arange(ext.shape[1]) < (2 * tl_a + 1)[:, None]
    return lp, lp_ext, ext, skip, inside, il_a, tl_a


def _ctc_alpha(lp_ext, skip, inside, tl):
    s = mx.arange(lp_ext.shape[2])
    first = (s == 0) | ((s == 1) & (tl[:, None] > 0))
    alpha = mx.where(first, lp_ext[0], _NEG_INF)
    alphas = [alpha]
    for t in range(1, lp_ext.shape[0]):
        prev = alphas[-1]
        alpha = _log_sum3(prev, _shift(prev, 1), mx.where(skip, _shift(prev, 2), _NEG_INF))
        alphas.append(mx.where(inside, alpha + lp_ext[t], _NEG_INF))
    return mx.stack(alphas, axis=1)  # (N, T, L)


def _ctc_nll(log_alpha, il, tl):
    last = mx.take_along_axis(log_alpha, mx.maximum(il - 1, 0)[:, None, None], 1)[:, 0]
    l1 = mx.take_along_axis(last, (2 * tl)[:, None], 1)[:, 0]
    l2 = mx.where(tl > 0, mx.take_along_axis(last, mx.maximum(2 * tl - 1, 0)[:, None], 1)[:, 0],
                  _NEG_INF)
    m = mx.maximum(l1, l2)
    m = mx.where(m == _NEG_INF, 0, m)
    return -(mx.log(mx.exp(l1 - m) + mx.exp(l2 - m)) + m)


@lowering("_ctc_loss", "_ctc_loss.Tensor")
def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False):
    """(negative log likelihood per batch entry, log_alpha (N, T, 2 max_target + 1))."""
    _, lp_ext, _, skip, inside, il, tl = _ctc_setup(log_probs, targets, input_lengths,
                                                    target_lengths, blank)
    log_alpha = _ctc_alpha(lp_ext, skip, inside, tl)
    return _ctc_nll(log_alpha, il, tl), log_alpha


@lowering("_ctc_loss_backward", "_ctc_loss_backward.Tensor")
def ctc_loss_backward(grad, log_probs, targets, input_lengths, target_lengths,
                      neg_log_likelihood, log_alpha, blank, zero_infinity=False):
    """torch's CPU gradient: (exp(lp) - exp(log(sum of alpha beta over the positions of each
    label) + nll - lp)) * grad for t < input length, 0 after; with zero_infinity, 0 where the
    likelihood is 0."""
    lp, lp_ext, ext, skip, inside, il, tl = _ctc_setup(log_probs, targets, input_lengths,
                                                       target_lengths, blank)
    steps, _, width = lp_ext.shape
    s = mx.arange(width)
    last_two = inside & ((s == 2 * tl[:, None]) | ((s == 2 * tl[:, None] - 1) & (tl[:, None] > 0)))
    skip_back = _shift(skip, -2, False)  # s + 2 may skip back to s
    betas = [None] * steps
    beta = mx.full(lp_ext.shape[1:], _NEG_INF, mx.float32)
    for t in reversed(range(steps)):
        start = mx.where(last_two, lp_ext[t], _NEG_INF)
        step = _log_sum3(beta, _shift(beta, -1), mx.where(skip_back, _shift(beta, -2), _NEG_INF))
        step = mx.where(inside, step + lp_ext[t], _NEG_INF)
        beta = mx.where((t == il - 1)[:, None], start, mx.where((t < il - 1)[:, None], step,
                                                                  _NEG_INF))
        betas[t] = beta
    log_beta = mx.stack(betas, axis=0)  # (T, N, L)
    occupancy = mx.swapaxes(log_alpha, 0, 1) + log_beta  # (T, N, L)
    per_label = mx.full(lp.shape, _NEG_INF, mx.float32)
    classes = mx.arange(lp.shape[2])
    for k in range(width):  # log-add each position's occupancy into its label
        hit = (ext[:, k][:, None] == classes)[None]  # (1, N, C)
        per_label = mx.where(hit, mx.logaddexp(per_label, occupancy[:, :, k:k + 1]), per_label)
    nll = neg_log_likelihood[None, :, None]
    g = (mx.exp(lp) - mx.exp(per_label + nll - lp)) * _upcast(grad)[None, :, None]
    live = mx.arange(steps)[:, None, None] < il[None, :, None]
    if zero_infinity:
        live = live & (nll != math.inf)
    return mx.where(live, g, 0)


# ----------------------------------------------------------------------------------------------
# embedding_bag: bag b sums (mode 0), averages (1) or takes the max (2) of the weight rows
# indices[offsets[b]:offsets[b + 1]]; indices equal to padding_idx take no part. The auxiliary
# outputs follow the meta kernel's shapes (offset2bag: the bag of each index, bag_size: each
# bag's count, max_indices: the weight row behind each max, -1 for an empty bag) and feed the
# backward ops below.


def _bag_of_each_index(offsets, n, bags):
    starts = mx.zeros((n + 1,), mx.int32).at[offsets[:bags]].add(1)
    return mx.cumsum(starts, axis=0)[:n] - 1


@lowering("_embedding_bag", "_embedding_bag_forward_only")
def embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                  per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    n, dim = indices.shape[0], weight.shape[1]
    bags = offsets.shape[0] - (1 if include_last_offset else 0)
    bag = _bag_of_each_index(offsets, n, bags)
    # With include_last_offset, torch's CPU kernels leave the indices from the final offset on
    # out of sum and mean bags (offset2bag says `bags` for them) but keep them in the last
    # bag of a max
    if include_last_offset and mode != 2:
        in_bag = mx.arange(n) < offsets[-1]
    else:
        in_bag = mx.ones((n,), mx.bool_)
    offset2bag = mx.where(in_bag, bag, bags)
    used = in_bag & (indices != padding_idx) if padding_idx >= 0 else in_bag
    rows = mx.take(_upcast(weight), indices, axis=0)
    # bag_size has one entry per offset (the include_last_offset one stays 0)
    bag_size = mx.zeros((offsets.shape[0],), mx.int32).at[bag].add(used.astype(mx.int32))
    empty = mx.zeros((0,), mx.int32)
    if mode == 2:
        rows = mx.where(used[:, None], rows, -math.inf)
        best = mx.full((bags, dim), -math.inf, rows.dtype).at[bag].maximum(rows)
        position = mx.where(rows == best[bag], mx.arange(n)[:, None], n)
        first = mx.full((bags, dim), n, mx.int32).at[bag].minimum(position)
        max_indices = mx.where(first < n, mx.take(indices, mx.minimum(first, n - 1)), -1) \
            if n else mx.full((bags, dim), -1, mx.int32)
        out = mx.where((bag_size[:bags] > 0)[:, None], best, 0)
        return out, offset2bag, bag_size, max_indices
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None]
    out = accumulate_at(mx.zeros((bags, dim), rows.dtype), bag, mx.where(used[:, None], rows, 0))
    if mode == 1:
        out = out / mx.maximum(bag_size[:bags], 1)[:, None]
    return out, offset2bag, bag_size, empty


@lowering("_embedding_bag_backward")
def embedding_bag_backward(grad, indices, offsets, offset2bag, bag_size, maximum_indices,
                           num_weights, scale_grad_by_freq, mode, sparse, per_sample_weights,
                           padding_idx=-1):
    if sparse:
        raise NotImplementedError("embedding_bag(sparse=True): mlx has no sparse gradients")
    return embedding_bag_dense_backward(grad, indices, offset2bag, bag_size, maximum_indices,
                                        num_weights, scale_grad_by_freq, mode,
                                        per_sample_weights, padding_idx)


@lowering("_embedding_bag_dense_backward")
def embedding_bag_dense_backward(grad, indices, offset2bag, bag_size, maximum_indices,
                                 num_weights, scale_grad_by_freq, mode, per_sample_weights,
                                 padding_idx=-1):
    g = _upcast(grad)
    out = mx.zeros((num_weights, g.shape[1]), g.dtype)
    if mode == 2:  # each max's gradient goes to the weight row it came from
        valid = maximum_indices >= 0
        cols = mx.broadcast_to(mx.arange(g.shape[1]), g.shape)
        return out.at[mx.where(valid, maximum_indices, 0), cols].add(mx.where(valid, g, 0))
    in_bag = offset2bag < g.shape[0]  # indices past include_last_offset's end have no bag
    rows = mx.where(in_bag[:, None], mx.take(g, mx.minimum(offset2bag, g.shape[0] - 1), axis=0), 0)
    if mode == 1:
        rows = rows / mx.maximum(mx.take(bag_size, offset2bag), 1)[:, None]
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None]
    if padding_idx >= 0:
        rows = mx.where((indices == padding_idx)[:, None], 0, rows)
    if scale_grad_by_freq:
        counts = mx.zeros((num_weights,), mx.float32).at[indices].add(1.0)
        rows = rows / mx.take(counts, indices)[:, None]
    return out.at[indices].add(rows)


@lowering("_embedding_bag_per_sample_weights_backward")
def embedding_bag_per_sample_weights_backward(grad, weight, indices, offsets, offset2bag, mode,
                                              padding_idx=-1):
    """d out / d per_sample_weights[i] = <grad of i's bag, weight row of i> (sum mode)."""
    g = _upcast(grad)
    in_bag = offset2bag < g.shape[0]
    dots = mx.sum(mx.take(g, mx.minimum(offset2bag, g.shape[0] - 1), axis=0) *
                  mx.take(_upcast(weight), indices, axis=0), axis=1)
    dots = mx.where(in_bag, dots, 0)
    return dots if padding_idx < 0 else mx.where(indices == padding_idx, 0, dots)


# ----------------------------------------------------------------------------------------------
# Attention


@lowering("_scaled_dot_product_fused_attention_overrideable")
def scaled_dot_product_fused_attention(query, key, value, attn_bias=None, dropout_p=0.0,
                                       is_causal=False, return_debug_mask=False, scale=None):
    """torch's scaled_dot_product_attention where csrc/attention.cpp chose MLX's fused
    attention: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D(v)] (Hq a multiple of Hkv), the mask as
    torch hands it (a boolean mask already made an additive bias). Returns torch's tuple:
    (output, logsumexp [B, Hq, Lq] float32, None, None, Lq, Lk, seed, offset, None); the
    logsumexp is computed only if something reads it (compiled graphs never evaluate it)."""
    if dropout_p != 0.0:
        raise NotImplementedError("_scaled_dot_product_fused_attention_overrideable: dropout "
                                  "on mlx runs through torch's math path (csrc/attention.cpp)")
    num_queries, num_keys = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dtype = query.dtype
    mask = None
    if attn_bias is not None:
        mask = attn_bias if attn_bias.dtype in (mx.bool_, mx.float32) \
            else attn_bias.astype(mx.float32)
    if is_causal:
        # torch's causal mask is aligned top-left (query i sees keys 0..i), MLX's "causal"
        # bottom-right: the same only for square scores
        causal = mx.arange(num_queries)[:, None] >= mx.arange(num_keys)[None, :]
        if mask is None:
            mask = "causal" if num_queries == num_keys else causal
        elif mask.dtype == mx.bool_:
            mask = mask & causal
        else:
            mask = mx.where(causal, mask, mx.array(-mx.inf, dtype=mask.dtype))
    if decode_attention.applies(query, key, value, mask):
        # a masked decode MLX has no fused kernel for (MLX CUDA): one kernel of ours, float32
        # inside, a fully masked row zeros (torch_mlx/kernels/decode_attention.py)
        out = decode_attention.masked_decode_attention(query, key, value, mask, scale)
    else:
        # in float32, as the CPU's flash kernel accumulates: MLX's fused GPU kernels do, but
        # its fallback composition (the CPU backend; masks MLX CUDA's kernels refuse) rounds
        # the scores to half, 15x the CPU's error on OpInfo's samples
        q, k, v = (x.astype(mx.float32) if dtype in (mx.float16, mx.bfloat16) else x
                   for x in (query, key, value))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        if isinstance(mask, mx.array):
            # a query row that may attend to no key gives zeros, as torch's math path
            # (_safe_softmax) and its CPU flash kernel do, where a plain softmax gives NaN
            allowed = mask if mask.dtype == mx.bool_ else mask > -mx.inf
            out = mx.where(mx.any(allowed, axis=-1, keepdims=True), out, 0)
        out = out.astype(dtype)
    return (out, _attention_logsumexp(query, key, scale, mask), None, None, num_queries,
            num_keys, mx.array(0, dtype=mx.int64), mx.array(0, dtype=mx.int64), None)


def _attention_logsumexp(query, key, scale, mask):
    """log(sum(exp(scores))) over the keys, float32 [B, Hq, Lq]: what the backward of a fused
    attention reads."""
    batch, query_heads, num_queries, dim = query.shape
    kv_heads = key.shape[1]
    q = query.astype(mx.float32).reshape(batch, kv_heads, query_heads // kv_heads,
                                         num_queries, dim)
    scores = (q * scale) @ key.astype(mx.float32)[:, :, None].swapaxes(-1, -2)
    scores = scores.reshape(batch, query_heads, num_queries, -1)
    if isinstance(mask, str):
        mask = mx.arange(num_queries)[:, None] + (key.shape[2] - num_queries) \
            >= mx.arange(key.shape[2])[None, :]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ \
            else scores + mask.astype(mx.float32)
    return mx.logsumexp(scores, axis=-1)
