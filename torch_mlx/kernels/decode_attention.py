"""Attention of a few queries over a masked key/value cache, where MLX has no fused kernel.

Why a kernel of our own: transformers' static-cache decode attends over the whole fixed-size
cache with a boolean mask (the slots not yet written are masked). MLX's Metal vector kernel takes
such a mask; MLX CUDA's kernels take none (its vector kernel refuses array masks, cuDNN decodes
only slices of a cache), so on the H100 each layer's attention was MLX's fallback composition:
float32 casts of q, k and v, scale, two products, the mask's select, softmax and a cast back,
7-8 kernels where mlx-lm's layer has 1 (docs/gpu_visits.md, census:hf: 112 of the step's 426
kernels for 16 layers, each a host launch).

One template, two backends (``mx.fast.cuda_kernel`` on MLX CUDA, ``mx.fast.metal_kernel`` on
Metal): the kernel is written once, with the thread indices, the 32-lane sum and the
shared-memory qualifier spelled per backend. It is used only where MLX itself would not fuse the
call (``force_fused`` refuses), so on Metal MLX's own kernel keeps the cases it covers.

The algorithm is MLX's vector attention (``sdpa_vector``): one block of 32 warps (simdgroups)
per query row; each warp takes every 32nd key, its 32 lanes split the head dimension; scores,
softmax and the weighted sum of values accumulate in float32 with a running maximum (one pass
over the cache); the warps' partial results are combined through shared memory and rounded to
the input dtype once. A row whose keys are all masked gives zeros, as torch's math path
(``_safe_softmax``) and the fallback composition with its guard do.
"""
from __future__ import annotations

import functools
import os

import mlx.core as mx

WARPS = 32  # warps (simdgroups) per block: each takes every 32nd key
# TORCH_MLX_DECODE_KERNEL=0: MLX's fallback composition instead (A/B measurements)
ENABLED = os.environ.get("TORCH_MLX_DECODE_KERNEL", "1") != "0"

# The kernel body, shared by both backends; {tid} / {row} name the thread's index in its block
# and the block's index, SHARED qualifies block memory, warp_sum sums over the 32 lanes.
_BODY = """
    SHARED float wmax[WARPS];  // block memory first: Metal wants it at the function's top
    SHARED float wsum[WARPS];
    SHARED float wout[WARPS * D];
    constexpr int EPT = D / 32;  // head-dimension elements per lane
    const int tid = {tid};
    const int row = {row};
    const int lane = tid % 32;
    const int warp = tid / 32;
    const int h = (row / TQ) % HQ;
    const int b = row / (TQ * HQ);
    const size_t kv = (size_t)(b * HKV + h / (HQ / HKV)) * L * D + lane * EPT;
    const float sc = scale[0];
    float qr[EPT];
    float acc[EPT];
    for (int i = 0; i < EPT; i++) {{
        qr[i] = sc * static_cast<float>(q[(size_t)row * D + lane * EPT + i]);
        acc[i] = 0.0f;
    }}
    float m = NEG_INF;
    float s = 0.0f;
    for (int j = warp; j < L; j += WARPS) {{
        if (!mask[(size_t)row * L + j]) {{
            continue;  // the same key for the whole warp: a uniform branch
        }}
        float d = 0.0f;
        for (int i = 0; i < EPT; i++) {{
            d += qr[i] * static_cast<float>(k[kv + (size_t)j * D + i]);
        }}
        d = warp_sum(d);
        const float mn = d > m ? d : m;
        const float f = EXPF(m - mn);  // 0 for the first key (m = -inf)
        const float e = EXPF(d - mn);
        m = mn;
        s = s * f + e;
        for (int i = 0; i < EPT; i++) {{
            acc[i] = acc[i] * f + e * static_cast<float>(v[kv + (size_t)j * D + i]);
        }}
    }}
    if (lane == 0) {{
        wmax[warp] = m;
        wsum[warp] = s;
    }}
    {barrier};
    float mx_ = NEG_INF;
    for (int w = 0; w < WARPS; w++) {{
        mx_ = wmax[w] > mx_ ? wmax[w] : mx_;
    }}
    float total = 0.0f;
    for (int w = 0; w < WARPS; w++) {{
        total += wmax[w] == NEG_INF ? 0.0f : wsum[w] * EXPF(wmax[w] - mx_);
    }}
    const float f = m == NEG_INF ? 0.0f : EXPF(m - mx_);
    for (int i = 0; i < EPT; i++) {{
        wout[warp * D + lane * EPT + i] = acc[i] * f;
    }}
    {barrier};
    if (tid < D) {{
        float o = 0.0f;
        for (int w = 0; w < WARPS; w++) {{
            o += wout[w * D + tid];
        }}
        out[(size_t)row * D + tid] = static_cast<T>(total > 0.0f ? o / total : 0.0f);
    }}
"""

_CUDA_HEADER = """
#define SHARED __shared__
#define EXPF(x) expf(x)
#define NEG_INF (-__int_as_float(0x7f800000))
__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, offset);
    }
    return x;
}
"""
_METAL_HEADER = """
#define SHARED threadgroup
#define EXPF(x) metal::exp(x)
#define NEG_INF (-INFINITY)
#define warp_sum(x) simd_sum(x)
"""


@functools.cache
def _kernel(backend: str):
    if backend == "cuda":
        source = _BODY.format(tid="threadIdx.x", row="blockIdx.x", barrier="__syncthreads()")
        make, header = mx.fast.cuda_kernel, _CUDA_HEADER
    else:
        source = _BODY.format(tid="thread_position_in_threadgroup.x",
                              row="threadgroup_position_in_grid.x",
                              barrier="threadgroup_barrier(mem_flags::mem_threadgroup)")
        make, header = mx.fast.metal_kernel, _METAL_HEADER
    return make(name="torch_mlx_masked_decode_attention",
                input_names=["q", "k", "v", "mask", "scale"], output_names=["out"],
                source=source, header=header, ensure_row_contiguous=True)


def _backend() -> str | None:
    if mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    return "metal" if mx.metal.is_available() else None


def applies(query: mx.array, key: mx.array, value: mx.array, mask) -> bool:
    """Whether this kernel computes the call: a GPU, a few queries (decode), a boolean array
    mask, head dims of 32k up to 256, and no fused kernel of MLX's own for it."""
    if not ENABLED or _backend() is None or not isinstance(mask, mx.array) \
            or mask.dtype != mx.bool_:
        return False
    dim = query.shape[-1]
    if (query.ndim != 4 or query.shape[2] > 4 or dim % 32 or dim > 256 or value.shape[-1] != dim
            or key.shape[-1] != dim or query.dtype not in (mx.float16, mx.bfloat16, mx.float32)
            or not key.dtype == value.dtype == query.dtype or query.shape[1] % key.shape[1]):
        return False
    return not _mlx_fuses(query.shape, key.shape, query.dtype, mask.shape)


@functools.lru_cache(maxsize=256)
def _mlx_fuses(q_shape, kv_shape, dtype, mask_shape) -> bool:
    # MLX decides while building the op (its use_fallback): force_fused raises where it has no
    # fused kernel. Decided on placeholders of the call's shapes, once per shape.
    q, kv = mx.zeros(q_shape, dtype), mx.zeros(kv_shape, dtype)
    try:
        mx.fast.scaled_dot_product_attention(q, kv, kv, scale=1.0,
                                             mask=mx.zeros(mask_shape, mx.bool_),
                                             force_fused=True)
    except ValueError:
        return False
    return True


def masked_decode_attention(query: mx.array, key: mx.array, value: mx.array, mask: mx.array,
                            scale: float) -> mx.array:
    """softmax(scale * q @ k^T masked) @ v for q [B, Hq, Tq, D], k/v [B, Hkv, L, D] (Hq a
    multiple of Hkv), a boolean mask broadcastable to [B, Hq, Tq, L]; q's dtype out."""
    batch, heads, queries, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    mask = mx.broadcast_to(mask, (batch, heads, queries, length))
    rows = batch * heads * queries
    return _kernel(_backend())(
        inputs=[query, key, value, mask, mx.array([scale], mx.float32)],
        template=[("T", query.dtype), ("D", dim), ("L", length), ("HQ", heads),
                  ("HKV", kv_heads), ("TQ", queries), ("WARPS", WARPS)],
        grid=(rows * WARPS * 32, 1, 1), threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[query.shape], output_dtypes=[query.dtype])[0]
