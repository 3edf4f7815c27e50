// MLX affine group-wise quantized matmul (x @ W.T on packed W) and dequantization, as MLX CPU
// graph nodes.
//
// The format is MLX's (mx.quantize, mlx_lm.convert -q): row n of W [N, K] is K values of `bits`
// bits packed little-end first into K * bits / 32 uint32 words, and element k is
// scales[n, k / g] * q + biases[n, k / g]. MLX's own CPU kernel for quantized_matmul works one
// value at a time on one thread (0.1-0.9 GB/s of packed weights here, and M times that for M
// rows of x), which makes a 4-bit model slower than a float32 one. This one computes
//
//   y[m, n] = sum_g scales[n, g] * (sum_{k in g} q[n, k] x[m, k]) + biases[n, g] * xsum[m, g]
//
// with the group's inner sum in 16-float vector accumulators (no horizontal sum per group), the
// bias term from per-group sums of x computed once per call, and the output rows shared among
// the threads of cpu_pool. At 4 bits a 16-byte load gives 32 values as two vectors, the low and
// the high nibbles of each byte, which meet x permuted the same way (even positions, then odd,
// within each 32-value block: done once per call); at 8 bits the bytes are the values. Other
// widths (2, 3, 5, 6) unpack each row to floats first. Rows of x are processed four at a time, so
// a weight row unpacked once serves four rows of x.
//
// affine_gather_qmm is the same product for a mixture of experts: W [E, N, K] packed, each row of
// x multiplied by its expert's matrix, consecutive rows of one expert (vllm_metal sorts them by
// expert) sharing one pass over its weights; runs longer than kGatherDequantizeRows dequantize
// the expert's matrix and multiply through MLX's BLAS, as prefills do in vllm_metal.
//
// Accumulation is float32 with fused multiply-adds (this file is compiled with fp contraction,
// unlike the rest of csrc): results differ from MLX's kernel by float32 rounding only.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <mlx/backend/cpu/encoder.h>
#include <mlx/ops.h>
#include <mlx/primitives.h>
#include <mlx/stream.h>
#include <mlx/types/half_types.h>
#include <nanobind/nanobind.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_blas.h"
#include "cpu_pool.h"
#include "moe_cpu.h"
#include "quantized_cpu.h"
#include "simd.h"

#pragma GCC optimize("fp-contract=fast")
// GCC 12 reports the AVX-512 intrinsics' own undefined-vector idiom as uninitialised use
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace nb = nanobind;
namespace mx = mlx::core;


namespace torch_mlx {
namespace {

typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));


enum ScaleKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

ScaleKind scale_kind(mx::Dtype dtype) {
  return dtype == mx::float32 ? kF32 : (dtype == mx::float16 ? kF16 : kBF16);
}

TMX_INLINE float load_scale(const void* p, int64_t i, int kind) {
  if (kind == kF32) return static_cast<const float*>(p)[i];
  if (kind == kF16) return static_cast<float>(static_cast<const mx::float16_t*>(p)[i]);
  return static_cast<float>(static_cast<const mx::bfloat16_t*>(p)[i]);
}

struct Qmm {
  const uint8_t* w;  // packed rows, row_bytes apart
  int64_t row_bytes;
  const void* scales;  // [N, G]
  const void* biases;
  int kind;
  const float* x;     // [M, K] float32, permuted for 4 bits
  const float* xsum;  // [M, G]
  float* y;           // [M, N]
  int64_t m, n, k;
  int group, bits;
};

TMX_INLINE float hsum(f32x16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// One weight row n against rows m0 .. m0 + MB of x. Q(k, lo, hi) unpacks 32 values starting at
// k: (values paired with x[k .. k+16), values paired with x[k+16 .. k+32)).
template <int MB, typename Unpack32>
TMX_INLINE void row_dot(const Qmm& a, int64_t n, int64_t m0, Unpack32 unpack32) {
  int64_t groups = a.k / a.group;
  f32x16 acc[MB];
  float bsum[MB];
  const float* xr[MB];
  for (int j = 0; j < MB; ++j) {
    acc[j] = f32x16{};
    bsum[j] = 0.0f;
    xr[j] = a.x + (m0 + j) * a.k;
  }
  for (int64_t g = 0; g < groups; ++g) {
    f32x16 ga[MB];
    for (int j = 0; j < MB; ++j) ga[j] = f32x16{};
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
      f32x16 lo, hi;
      unpack32(k, lo, hi);
      for (int j = 0; j < MB; ++j) ga[j] += lo * LOAD16(xr[j] + k) + hi * LOAD16(xr[j] + k + 16);
    }
    float s = load_scale(a.scales, n * groups + g, a.kind);
    float b = load_scale(a.biases, n * groups + g, a.kind);
    for (int j = 0; j < MB; ++j) {
      acc[j] += ga[j] * s;
      bsum[j] += b * a.xsum[(m0 + j) * groups + g];
    }
  }
  for (int j = 0; j < MB; ++j) a.y[(m0 + j) * a.n + n] = hsum(acc[j]) + bsum[j];
}

template <typename Unpack32>
TMX_INLINE void rows_dot(const Qmm& a, int64_t n, Unpack32 unpack32) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.m; m0 += 4) row_dot<4>(a, n, m0, unpack32);
  switch (a.m - m0) {
    case 3: row_dot<3>(a, n, m0, unpack32); break;
    case 2: row_dot<2>(a, n, m0, unpack32); break;
    case 1: row_dot<1>(a, n, m0, unpack32); break;
    default: break;
  }
}

// Unpacks `bits`-bit values [0, count) of a packed row into floats (any width; words may hold a
// value's low bits and the next word its high bits).
TMX_INLINE void unpack_row(const uint8_t* packed, int bits, int64_t count, float* out) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
  uint32_t mask = (1u << bits) - 1u;
  for (int64_t i = 0; i < count; ++i) {
    int64_t bit = i * bits;
    int64_t word = bit >> 5;
    int shift = static_cast<int>(bit & 31);
    uint32_t v = words[word] >> shift;
    if (shift + bits > 32) v |= words[word + 1] << (32 - shift);
    out[i] = static_cast<float>(v & mask);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define TMX_HAVE_AVX512 1
#define TMX_AVX512 __attribute__((target("avx512f")))

// NB weight rows n .. n + NB against MB rows of x from m0, with AVX-512: each 32-value block of
// a weight row is unpacked once (two vectors of 16) and meets every x row, and each x load
// serves NB weight rows. With few rows (MB * NB < 4) the low and high halves accumulate apart,
// so there are enough independent FMA chains to hide the FMA latency.
template <int MB, int NB, int BITS>
TMX_AVX512 TMX_INLINE void block_avx512(const Qmm& a, int64_t n, int64_t m0) {
  const int64_t groups = a.k / a.group;
  const float* xr[MB];
  __m512 acc[NB][MB];
  float bsum[NB][MB];
  const uint8_t* w[NB];
#pragma GCC unroll 8
  for (int j = 0; j < MB; ++j) xr[j] = a.x + (m0 + j) * a.k;
#pragma GCC unroll 8
  for (int r = 0; r < NB; ++r) {
    w[r] = a.w + (n + r) * a.row_bytes;
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) {
      acc[r][j] = _mm512_setzero_ps();
      bsum[r][j] = 0.0f;
    }
  }
  const __m512i nibble = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < groups; ++g) {
    constexpr bool split = MB * NB < 4;
    __m512 lo_acc[NB][MB], hi_acc[NB][MB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) {
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j) lo_acc[r][j] = hi_acc[r][j] = _mm512_setzero_ps();
    }
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
      __m512 lo[NB], hi[NB];
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) {
        if constexpr (BITS == 4) {
          __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k / 2)));
          lo[r] = _mm512_cvtepi32_ps(_mm512_and_si512(v, nibble));
          hi[r] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        } else {
          lo[r] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k))));
          hi[r] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k + 16))));
        }
      }
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j) {
        __m512 xl = _mm512_loadu_ps(xr[j] + k), xh = _mm512_loadu_ps(xr[j] + k + 16);
#pragma GCC unroll 8
        for (int r = 0; r < NB; ++r) {
          lo_acc[r][j] = _mm512_fmadd_ps(lo[r], xl, lo_acc[r][j]);
          if constexpr (split) {
            hi_acc[r][j] = _mm512_fmadd_ps(hi[r], xh, hi_acc[r][j]);
          } else {
            lo_acc[r][j] = _mm512_fmadd_ps(hi[r], xh, lo_acc[r][j]);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) {
      __m512 s = _mm512_set1_ps(load_scale(a.scales, (n + r) * groups + g, a.kind));
      float b = load_scale(a.biases, (n + r) * groups + g, a.kind);
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j) {
        __m512 sum = split ? _mm512_add_ps(lo_acc[r][j], hi_acc[r][j]) : lo_acc[r][j];
        acc[r][j] = _mm512_fmadd_ps(sum, s, acc[r][j]);
        bsum[r][j] += b * a.xsum[(m0 + j) * groups + g];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NB; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) {
      a.y[(m0 + j) * a.n + n + r] = _mm512_reduce_add_ps(acc[r][j]) + bsum[r][j];
    }
  }
}

template <int BITS>
TMX_AVX512 void qmm_rows_avx512(const Qmm& a, int64_t n0, int64_t n1) {
  // m blocks outermost: a chunk's weights (about 64 KiB) come from memory once and from cache
  // for the other blocks
  for (int64_t m0 = 0; m0 < a.m; m0 += 4) {
    int64_t mb = std::min<int64_t>(4, a.m - m0);
    int64_t n = n0;
    if (mb == 1) {  // decode of one sequence: four weight rows at a time
      for (; n + 4 <= n1; n += 4) block_avx512<1, 4, BITS>(a, n, m0);
    } else if (mb == 2) {
      for (; n + 2 <= n1; n += 2) block_avx512<2, 2, BITS>(a, n, m0);
    } else if (mb == 3) {
      for (; n + 2 <= n1; n += 2) block_avx512<3, 2, BITS>(a, n, m0);
    } else {
      for (; n + 2 <= n1; n += 2) block_avx512<4, 2, BITS>(a, n, m0);
    }
    for (; n < n1; ++n) {
      switch (mb) {
        case 4: block_avx512<4, 1, BITS>(a, n, m0); break;
        case 3: block_avx512<3, 1, BITS>(a, n, m0); break;
        case 2: block_avx512<2, 1, BITS>(a, n, m0); break;
        default: block_avx512<1, 1, BITS>(a, n, m0); break;
      }
    }
  }
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}
#endif

// Rows [n0, n1) of y for all rows of x: any width, each weight row unpacked to floats first.
TMX_MULTIVERSION void qmm_rows_generic(const Qmm& a, int64_t n0, int64_t n1) {
  std::vector<float> q(a.k);
  for (int64_t n = n0; n < n1; ++n) {
    unpack_row(a.w + n * a.row_bytes, a.bits, a.k, q.data());
    const float* qp = q.data();
    rows_dot(a, n, [qp](int64_t k, f32x16& lo, f32x16& hi) {
      lo = LOAD16(qp + k);
      hi = LOAD16(qp + k + 16);
    });
  }
}

bool use_avx512(int bits) {
#ifdef TMX_HAVE_AVX512
  return (bits == 4 || bits == 8) && has_avx512();
#else
  return false;
#endif
}

void qmm_rows(const Qmm& a, int64_t n0, int64_t n1) {
#ifdef TMX_HAVE_AVX512
  if (use_avx512(a.bits)) {
    return a.bits == 4 ? qmm_rows_avx512<4>(a, n0, n1) : qmm_rows_avx512<8>(a, n0, n1);
  }
#endif
  qmm_rows_generic(a, n0, n1);
}

// An array as rows of its last axis, with any strides: element offsets of each row's start (its
// leading axes flattened) and the last axis' stride. Taken in eval_cpu, where the inputs' layouts
// are final (a lazy array's layout flags say nothing yet: a transposed or gathered x inside a
// compiled graph is only known to be strided then).
struct Rows {
  const char* data;
  std::vector<int64_t> starts;
  int64_t step;
  bool dense;  // row-contiguous: starts[r] == r * columns, step 1
};

Rows rows_of(const mx::array& a) {
  Rows rows{a.data<char>(), {}, a.ndim() ? a.strides().back() : 1, a.flags().row_contiguous};
  int nd = static_cast<int>(a.ndim());
  int64_t count = nd > 1 ? a.size() / a.shape(-1) : 1;
  if (rows.dense) return rows;
  rows.starts.assign(count, 0);
  for (int64_t r = 0; r < count; ++r) {
    int64_t rest = r, offset = 0;
    for (int axis = nd - 2; axis >= 0; --axis) {
      offset += (rest % a.shape(axis)) * a.strides()[axis];
      rest /= a.shape(axis);
    }
    rows.starts[r] = offset;
  }
  return rows;
}

// Element i of row r, as float.
template <typename T>
TMX_INLINE float at(const Rows& rows, int64_t columns, int64_t r, int64_t i) {
  const T* base = reinterpret_cast<const T*>(rows.data);
  return static_cast<float>(rows.dense ? base[r * columns + i]
                                       : base[rows.starts[r] + i * rows.step]);
}

// A row-contiguous copy of a strided [rows, columns] array in `buffer`, or the array's own data.
const void* dense_data(const Rows& rows, int64_t count, int64_t columns, size_t itemsize,
                       std::vector<char>& buffer) {
  if (rows.dense) return rows.data;
  buffer.resize(count * columns * itemsize);
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t i = 0; i < columns; ++i) {
      std::memcpy(buffer.data() + (r * columns + i) * itemsize,
                  rows.data + (rows.starts[r] + i * rows.step) * itemsize, itemsize);
    }
  }
  return buffer.data();
}

// x [M, K] of dtype T -> float32 (permuted within 32-blocks for the AVX-512 4-bit kernel, whose
// unpacked vectors hold a block's even, then odd values); and its group sums.
template <typename T>
void prepare_x(const Rows& x, int64_t m, int64_t k, int group, bool permute, float* xf,
               float* xsum) {
  int64_t groups = k / group;
  for (int64_t r = 0; r < m; ++r) {
    float* dst = xf + r * k;
    for (int64_t i = 0; i < k; ++i) dst[i] = at<T>(x, k, r, i);
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) s += dst[i];
      xsum[r * groups + g] = s;
    }
    if (permute) {
      float block[32];
      for (int64_t b = 0; b < k; b += 32) {
        std::memcpy(block, dst + b, sizeof(block));
        for (int i = 0; i < 16; ++i) {
          dst[b + i] = block[2 * i];
          dst[b + 16 + i] = block[2 * i + 1];
        }
      }
    }
  }
}

// The packed weight, scales and biases of a layer (inputs [first, first + 3)), row-contiguous
// (copied, in the dispatched work, in the rare case a view is strided).
struct Packed {
  Rows w, scales, biases;
  int64_t n, k, groups;
  size_t scale_size;
  int kind;

  Packed(const std::vector<mx::array>& inputs, int first, int64_t k_, int group)
      : w(rows_of(inputs[first])), scales(rows_of(inputs[first + 1])),
        biases(rows_of(inputs[first + 2])), n(inputs[first].shape(0)), k(k_),
        groups(k_ / group), scale_size(inputs[first + 1].itemsize()),
        kind(scale_kind(inputs[first + 1].dtype())) {}

  // Fills a's weight/scale pointers; `buffers` keeps any copies alive.
  void fill(Qmm& a, std::vector<char> (&buffers)[3]) const {
    a.w = static_cast<const uint8_t*>(dense_data(w, n, a.row_bytes / 4, 4, buffers[0]));
    a.scales = dense_data(scales, n, groups, scale_size, buffers[1]);
    a.biases = dense_data(biases, n, groups, scale_size, buffers[2]);
    a.kind = kind;
  }
};

// About 64 KiB of packed weights per claimed chunk.
int64_t rows_per_chunk(int64_t row_bytes) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1));
}

mx::cpu::CommandEncoder& prepare(mx::Stream stream, const std::vector<mx::array>& inputs,
                                 mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  return encoder;
}

class AffineQuantizedMatmul : public mx::UnaryPrimitive {
 public:
  AffineQuantizedMatmul(mx::Stream stream, int group, int bits)
      : mx::UnaryPrimitive(stream), group_(group), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    auto& encoder = prepare(stream(), inputs, out);
    int64_t k = x.shape(-1), n = out.shape(-1), m = k == 0 ? 0 : x.size() / k;
    Qmm a{nullptr, k * bits_ / 8, nullptr, nullptr, 0, nullptr, nullptr, nullptr,
          m, n, k, group_, bits_};
    Rows xr = rows_of(x);
    Packed packed(inputs, 1, k, group_);
    void* op = out.data<void>();
    mx::Dtype x_dtype = x.dtype(), out_dtype = out.dtype();
    encoder.dispatch([=]() mutable {
      std::vector<char> buffers[3];
      packed.fill(a, buffers);
      std::vector<float> xf(m * k), xsum(m * (k / a.group));
      std::vector<float> y(out_dtype == mx::float32 ? 0 : m * n);
      with_float_type(x_dtype, [&](auto t) {
        using T = decltype(t);
        prepare_x<T>(xr, m, k, a.group, a.bits == 4 && use_avx512(4), xf.data(), xsum.data());
      });
      a.x = xf.data();
      a.xsum = xsum.data();
      a.y = out_dtype == mx::float32 ? static_cast<float*>(op) : y.data();
      parallel_chunks(n, rows_per_chunk(a.row_bytes),
                      [&a](int64_t n0, int64_t n1) { qmm_rows(a, n0, n1); });
      if (out_dtype != mx::float32) {
        with_float_type(out_dtype, [&](auto t) {
          using T = decltype(t);
          T* o = static_cast<T*>(op);
          for (int64_t i = 0; i < m * n; ++i) o[i] = static_cast<T>(y[i]);
        });
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("affine_quantized_matmul: torch_mlx's CPU kernel runs on MLX's CPU "
                             "stream only");
  }

  const char* name() const override { return "TorchMlxAffineQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AffineQuantizedMatmul&>(other);
    return group_ == o.group_ && bits_ == o.bits_;
  }

 private:
  int group_, bits_;
};

#ifdef TMX_HAVE_AVX512
// Rows [n0, n1) of the dense float32 matrix at 4 or 8 bits: 32 values per step, the 4-bit low and
// high nibbles interleaved back into order.
template <int BITS>
TMX_AVX512 void dequantize_rows_avx512(const Qmm& a, float* out, int64_t n0, int64_t n1) {
  const int64_t groups = a.k / a.group;
  const __m512i nibble = _mm512_set1_epi32(15);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = a.w + n * a.row_bytes;
    float* row = out + n * a.k;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 s = _mm512_set1_ps(load_scale(a.scales, n * groups + g, a.kind));
      __m512 b = _mm512_set1_ps(load_scale(a.biases, n * groups + g, a.kind));
      for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
        __m512 v0, v1;
        if constexpr (BITS == 4) {
          __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2)));
          __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, nibble));
          __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
          v0 = _mm512_permutex2var_ps(lo, first, hi);
          v1 = _mm512_permutex2var_ps(lo, second, hi);
        } else {
          v0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
          v1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16))));
        }
        _mm512_storeu_ps(row + k, _mm512_fmadd_ps(v0, s, b));
        _mm512_storeu_ps(row + k + 16, _mm512_fmadd_ps(v1, s, b));
      }
    }
  }
}
#endif

// Rows [n0, n1) of the dense float32 matrix.
TMX_MULTIVERSION void dequantize_rows_generic(const Qmm& a, float* out, int64_t n0, int64_t n1) {
  int64_t groups = a.k / a.group;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + n * a.k;
    unpack_row(a.w + n * a.row_bytes, a.bits, a.k, row);
    for (int64_t g = 0; g < groups; ++g) {
      float s = load_scale(a.scales, n * groups + g, a.kind);
      float b = load_scale(a.biases, n * groups + g, a.kind);
      for (int64_t i = g * a.group; i < (g + 1) * a.group; i += 16) {
        STORE16(row + i, LOAD16(row + i) * s + b);
      }
    }
  }
}

void dequantize_rows(const Qmm& a, float* out, int64_t n0, int64_t n1) {
#ifdef TMX_HAVE_AVX512
  if (use_avx512(a.bits)) {
    return a.bits == 4 ? dequantize_rows_avx512<4>(a, out, n0, n1)
                       : dequantize_rows_avx512<8>(a, out, n0, n1);
  }
#endif
  dequantize_rows_generic(a, out, n0, n1);
}

class AffineDequantize : public mx::UnaryPrimitive {
 public:
  AffineDequantize(mx::Stream stream, int group, int bits)
      : mx::UnaryPrimitive(stream), group_(group), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    int64_t n = out.shape(0), k = out.shape(1);
    Qmm a{nullptr, k * bits_ / 8, nullptr, nullptr, 0, nullptr, nullptr, nullptr,
          0, n, k, group_, bits_};
    Packed packed(inputs, 0, k, group_);
    float* op = out.data<float>();
    encoder.dispatch([=]() mutable {
      std::vector<char> buffers[3];
      packed.fill(a, buffers);
      parallel_chunks(n, rows_per_chunk(a.row_bytes),
                      [&a, op](int64_t n0, int64_t n1) { dequantize_rows(a, op, n0, n1); });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("affine_dequantize: torch_mlx's CPU kernel runs on MLX's CPU "
                             "stream only");
  }

  const char* name() const override { return "TorchMlxAffineDequantize"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AffineDequantize&>(other);
    return group_ == o.group_ && bits_ == o.bits_;
  }

 private:
  int group_, bits_;
};

// Runs of more rows than this per expert are multiplied on the dequantized matrix with BLAS
// (vllm_metal.ops.quantized.DEQUANTIZE_ABOVE_ROWS for dense layers).
constexpr int64_t kGatherDequantizeRows = 64;

class AffineGatherQmm : public mx::UnaryPrimitive {
 public:
  AffineGatherQmm(mx::Stream stream, int group, int bits)
      : mx::UnaryPrimitive(stream), group_(group), bits_(bits) {}

  // inputs: x [P, K], weight [E, N, K * bits / 32], scales and biases [E, N, K / group] (all
  // row-contiguous), experts [P] uint32
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    auto& encoder = prepare(stream(), inputs, out);
    int64_t rows = x.shape(0), k = x.shape(1), e_count = inputs[1].shape(0);
    int64_t n = inputs[1].shape(1), groups = k / group_;
    Qmm base{inputs[1].data<uint8_t>(), k * bits_ / 8, inputs[2].data<void>(),
             inputs[3].data<void>(), scale_kind(inputs[2].dtype()), nullptr, nullptr, nullptr,
             0, n, k, group_, bits_};
    size_t scale_size = inputs[2].itemsize();
    Rows xr = rows_of(x);
    const uint32_t* ids = inputs[4].data<uint32_t>();
    void* op = out.data<void>();
    mx::Dtype x_dtype = x.dtype(), out_dtype = out.dtype();
    int group = group_;
    encoder.dispatch([=]() {
      bool permute = base.bits == 4 && use_avx512(4);
      std::vector<float> xf(rows * k), xsum(rows * groups), plain, dense;
      with_float_type(x_dtype, [&](auto t) {
        using T = decltype(t);
        prepare_x<T>(xr, rows, k, group, permute, xf.data(), xsum.data());
        if (!permute) return;
        plain.resize(rows * k);  // x unpermuted, for the runs multiplied through BLAS
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t i = 0; i < k; ++i) plain[r * k + i] = at<T>(xr, k, r, i);
        }
      });
      const float* x_plain = permute ? plain.data() : xf.data();
      std::vector<float> y_buffer(out_dtype == mx::float32 ? 0 : rows * n);
      float* y = out_dtype == mx::float32 ? static_cast<float*>(op) : y_buffer.data();
      SgemmFn sgemm = mlx_sgemm();
      std::vector<Qmm> runs;  // the runs multiplied on the packed weights, done together below
      for_each_expert_run(ids, rows, e_count, y, n, [&](int64_t r0, int64_t r1, uint32_t e) {
        Qmm a = base;
        a.w = base.w + e * n * base.row_bytes;
        a.scales = static_cast<const char*>(base.scales) + e * n * groups * scale_size;
        a.biases = static_cast<const char*>(base.biases) + e * n * groups * scale_size;
        a.m = r1 - r0;
        a.x = xf.data() + r0 * k;
        a.xsum = xsum.data() + r0 * groups;
        a.y = y + r0 * n;
        if (a.m <= kGatherDequantizeRows || sgemm == nullptr) {
          runs.push_back(a);
          return;
        }
        dense.resize(n * k);
        float* d = dense.data();
        parallel_chunks(n, rows_per_chunk(a.row_bytes),
                        [&a, d](int64_t n0, int64_t n1) { dequantize_rows(a, d, n0, n1); });
        sgemm(kRowMajor, kNoTrans, kTrans, static_cast<int>(a.m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, x_plain + r0 * k, static_cast<int>(k), d,
              static_cast<int>(k), 0.0f, a.y, static_cast<int>(n));
      });
      // One job over every (run, chunk of weight rows): a decode step's runs are a row or two
      // against a small matrix each, and waking the pool once per run would cost more than them
      int64_t chunk = rows_per_chunk(base.row_bytes), per_run = (n + chunk - 1) / chunk;
      parallel_chunks(static_cast<int64_t>(runs.size()) * per_run, 1,
                      [&](int64_t i0, int64_t i1) {
                        for (int64_t i = i0; i < i1; ++i) {
                          int64_t n0 = (i % per_run) * chunk;
                          qmm_rows(runs[i / per_run], n0, std::min(n, n0 + chunk));
                        }
                      });
      if (out_dtype != mx::float32) {
        with_float_type(out_dtype, [&](auto t) {
          using T = decltype(t);
          T* o = static_cast<T*>(op);
          for (int64_t i = 0; i < rows * n; ++i) o[i] = static_cast<T>(y[i]);
        });
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("affine_gather_qmm: torch_mlx's CPU kernel runs on MLX's CPU "
                             "stream only");
  }

  const char* name() const override { return "TorchMlxAffineGatherQmm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AffineGatherQmm&>(other);
    return group_ == o.group_ && bits_ == o.bits_;
  }

 private:
  int group_, bits_;
};

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

bool is_float(const mx::array& a) {
  return a.dtype() == mx::float32 || a.dtype() == mx::float16 || a.dtype() == mx::bfloat16;
}

// Checks the packed weight and its scales/biases for [N, K] at (group, bits); returns K.
int64_t check_packed(const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int group, int bits, const char* what) {
  auto fail = [&](const std::string& why) {
    throw nb::value_error((std::string(what) + ": " + why).c_str());
  };
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) {
    fail("bits must be 2, 3, 4, 5, 6 or 8");
  }
  if (group != 32 && group != 64 && group != 128) fail("group_size must be 32, 64 or 128");
  if (w.dtype() != mx::uint32 || w.ndim() != 2) fail("weight must be a 2-D uint32 array");
  if (!is_float(scales) || scales.dtype() != biases.dtype()) {
    fail("scales and biases must have the same float dtype");
  }
  int64_t k = static_cast<int64_t>(w.shape(1)) * 32 / bits;
  if (scales.ndim() != 2 || scales.shape() != biases.shape() || scales.shape(0) != w.shape(0) ||
      scales.shape(1) * group != k) {
    fail("scales and biases must be [N, K / group_size] for weight [N, K * bits / 32]");
  }
  return k;
}

mx::array affine_quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                                  const mx::array& biases, int group, int bits) {
  int64_t k = check_packed(w, scales, biases, group, bits, "affine_quantized_matmul");
  if (!is_float(x) || x.ndim() == 0 || x.shape(-1) != k) {
    throw nb::value_error("affine_quantized_matmul: x must be a float array [..., K]");
  }
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  auto prim = std::make_shared<AffineQuantizedMatmul>(cpu_stream(), group, bits);
  return mx::array(shape, x.dtype(), prim, {x, w, scales, biases});
}

mx::array affine_gather_qmm(const mx::array& x, const mx::array& w, const mx::array& scales,
                            const mx::array& biases, const mx::array& experts, int group,
                            int bits) {
  const char* what = "affine_gather_qmm";
  if (w.ndim() != 3 || scales.ndim() != 3 || biases.ndim() != 3 ||
      scales.shape(0) != w.shape(0) || biases.shape(0) != w.shape(0)) {
    throw nb::value_error("affine_gather_qmm: weight, scales and biases must be [E, N, ...]");
  }
  // each expert's matrix is checked as affine_quantized_matmul checks one
  int64_t k = check_packed(mx::flatten(w, 0, 1), mx::flatten(scales, 0, 1),
                           mx::flatten(biases, 0, 1), group, bits, what);
  if (!is_float(x) || x.ndim() != 2 || x.shape(1) != k) {
    throw nb::value_error("affine_gather_qmm: x must be a float array [P, K]");
  }
  if (experts.ndim() != 1 || experts.shape(0) != x.shape(0) ||
      (experts.dtype() != mx::uint32 && experts.dtype() != mx::int32)) {
    throw nb::value_error("affine_gather_qmm: experts must be [P] uint32 (one per row of x)");
  }
  mx::Stream s = cpu_stream();
  auto prim = std::make_shared<AffineGatherQmm>(s, group, bits);
  return mx::array({x.shape(0), w.shape(1)}, x.dtype(), prim,
                   {x, mx::contiguous(w, false, s), mx::contiguous(scales, false, s),
                    mx::contiguous(biases, false, s),
                    mx::contiguous(mx::view(experts, mx::uint32, s), false, s)});
}

mx::array affine_dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                            int group, int bits) {
  int64_t k = check_packed(w, scales, biases, group, bits, "affine_dequantize");
  auto prim = std::make_shared<AffineDequantize>(cpu_stream(), group, bits);
  return mx::array({w.shape(0), static_cast<int>(k)}, mx::float32, prim,
                   {w, scales, biases});
}

}  // namespace

void register_quantized_cpu(nb::module_& m) {
  m.def("affine_quantized_matmul", &affine_quantized_matmul, nb::arg("x"), nb::arg("weight"),
        nb::arg("scales"), nb::arg("biases"), nb::arg("group_size"), nb::arg("bits"),
        "x @ W.T for an MLX affine-quantized W (mx.quantize's weight, scales, biases), on the "
        "packed weights; one MLX CPU node, multi-threaded. Result in x's dtype.");
  m.def("affine_gather_qmm", &affine_gather_qmm, nb::arg("x"), nb::arg("weight"),
        nb::arg("scales"), nb::arg("biases"), nb::arg("experts"), nb::arg("group_size"),
        nb::arg("bits"),
        "y[p] = x[p] @ W[experts[p]].T for MLX affine-quantized experts W [E, N, K] (mx.quantize "
        "of the stacked matrices), on the packed weights, one pass over an expert's weights per "
        "run of rows with the same expert (sort rows by expert); one MLX CPU node.");
  m.def("affine_dequantize", &affine_dequantize, nb::arg("weight"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("group_size"), nb::arg("bits"),
        "The float32 matrix of an MLX affine-quantized W; one MLX CPU node, multi-threaded.");
}

}  // namespace torch_mlx
