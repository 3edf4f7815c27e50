// The decoder-layer kernels MLX's CPU backend lacks, as MLX graph nodes.
//
// On the GPU, mx.fast has fused kernels for RMS norm, rotary embedding and attention; on the CPU
// their eval_cpu is "NYI" and MLX runs the fallback op graphs instead: about 70 graph nodes per
// Llama layer at batch 1, each a scheduler task of several microseconds, more than the
// arithmetic (a layer's norms, rope and attention over a short context are a few thousand
// flops). These primitives do each of those steps as one node:
//
// - rms_norm: vLLM's rms_norm / fused_add_rms_norm (vllm/ir/ops/layernorm.py), rounding where it
//   rounds: the float32 normalised value goes to the weight's dtype, is multiplied by the weight
//   there, and goes to x's dtype; the fused form adds the residual in float32 first and returns
//   that sum rounded as the new residual.
// - rope: vLLM's RotaryEmbedding.forward_native on one tensor, angles from its cos/sin cache
//   gathered at each token's position (every cache-based rope variant), neox or GPT-J pairs,
//   computed in x's dtype like torch (each product and sum rounded).
// - paged_decode_attention: one query token per request against the request's keys and values
//   read in place from the paged cache through its block table (no gather copy), GQA heads
//   sharing each key/value load; scores, softmax and output accumulate in float32 and are rounded
//   to the query's dtype where the op graph rounds them.
//
// All run on MLX's CPU stream; vllm_metal uses them when MLX's default device is the CPU.
#include <algorithm>
#include <cmath>
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
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "fast_cpu.h"
#include "simd.h"

namespace nb = nanobind;
namespace mx = mlx::core;

// The float32 inner loops are built for several x86 ISAs and picked at load time (the extension
// is built without -march; simd.h); elsewhere (arm64) the baseline has NEON.
namespace torch_mlx {
namespace {



TMX_MULTIVERSION float dot_f32(const float* a, const float* b, int64_t n) {
  f32x16 acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 += LOAD16(a + i) * LOAD16(b + i);
    acc1 += LOAD16(a + i + 16) * LOAD16(b + i + 16);
  }
  for (; i + 16 <= n; i += 16) acc0 += LOAD16(a + i) * LOAD16(b + i);
  acc0 += acc1;
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += acc0[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
TMX_MULTIVERSION void axpy_f32(float* y, float a, const float* x, int64_t n) {
  f32x16 av = a - f32x16{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) STORE16(y + i, LOAD16(y + i) + av * LOAD16(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// exp of 16 floats: 2^n * e^r with |r| <= ln2 / 2, e^r by Cephes' expf polynomial (relative error
// about 2e-7); overflow gives inf and underflow 0, through subnormals, as expf.
#define EXP16(x_in)                                                                      \
  ({                                                                                     \
    f32x16 x_ = (x_in);                                                                  \
    f32x16 lo_ = f32x16{} - 104.0f, hi_ = f32x16{} + 89.0f;                              \
    f32x16 xc_ = x_ < lo_ ? lo_ : (x_ > hi_ ? hi_ : x_);                                 \
    f32x16 t_ = xc_ * 1.44269504088896341f;                                              \
    f32x16 half_ = f32x16{} + 0.5f;                                                      \
    i32x16 n_ = __builtin_convertvector(t_ + (t_ >= 0.0f ? half_ : -half_), i32x16);    \
    f32x16 nf_ = __builtin_convertvector(n_, f32x16);                                    \
    f32x16 r_ = xc_ - nf_ * 0.693359375f + nf_ * 2.12194440e-4f;                         \
    f32x16 p_ = 1.9875691500e-4f * r_ + 1.3981999507e-3f;                                \
    p_ = p_ * r_ + 8.3334519073e-3f;                                                     \
    p_ = p_ * r_ + 4.1665795894e-2f;                                                     \
    p_ = p_ * r_ + 1.6666665459e-1f;                                                     \
    p_ = p_ * r_ + 5.0000001201e-1f;                                                     \
    p_ = p_ * r_ * r_ + r_ + 1.0f;                                                       \
    /* 2^n in two factors, so n down to -150 (subnormal results) stays exact */          \
    i32x16 h_ = n_ >> 1;                                                                 \
    f32x16 s1_, s2_;                                                                     \
    i32x16 e1_ = (h_ + 127) << 23, e2_ = (n_ - h_ + 127) << 23;                         \
    std::memcpy(&s1_, &e1_, sizeof(s1_));                                                \
    std::memcpy(&s2_, &e2_, sizeof(s2_));                                                \
    f32x16 y_ = p_ * s1_ * s2_;                                                          \
    y_ = x_ > 88.72283935546875f ? f32x16{} + INFINITY : y_;                             \
    x_ < -103.97207708f ? f32x16{} : y_;                                                 \
  })

// Values of dtype T as float32, into dst (n elements).
template <typename T>
inline const float* as_f32(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    return dst;
  }
}

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// A 1-D or 2-D int32/int64 input, any strides. eval_cpu runs before the inputs are computed (on
// the calling thread): it takes this view, and only the dispatched work reads the values.
struct Indices {
  const char* data;
  int64_t strides[2];
  bool wide;
  explicit Indices(const mx::array& a)
      : data(a.data<char>()),
        strides{a.ndim() > 0 ? a.strides()[0] : 0, a.ndim() > 1 ? a.strides()[1] : 0},
        wide(a.dtype() == mx::int64) {}
  int64_t at(int64_t i, int64_t j = 0) const {
    int64_t k = i * strides[0] + j * strides[1];
    return wide ? reinterpret_cast<const int64_t*>(data)[k]
                : reinterpret_cast<const int32_t*>(data)[k];
  }
};

// Element offsets along the flattened axes [first, last) of `a`: at(i) = i * stride when those
// axes collapse into one uniform stride (contiguous data and most views: nothing is built),
// from a table otherwise.
struct Walk {
  int64_t count = 1, stride = 1;
  std::vector<int64_t> table;
  int64_t at(int64_t i) const { return table.empty() ? i * stride : table[i]; }
  bool unit() const { return table.empty() && (stride == 1 || count <= 1); }
};

Walk walk(const mx::array& a, int first, int last) {
  Walk w;
  int64_t inner = -1;  // stride the next (outer) axis must have to continue the run
  bool uniform = true;
  for (int axis = last - 1; axis >= first; --axis) {
    w.count *= a.shape(axis);
    if (a.shape(axis) == 1) continue;
    if (inner < 0) {
      w.stride = a.strides()[axis];
    } else if (a.strides()[axis] != inner) {
      uniform = false;
    }
    inner = a.strides()[axis] * a.shape(axis);
  }
  if (uniform) return w;
  w.table = {0};
  for (int axis = first; axis < last; ++axis) {
    std::vector<int64_t> next;
    next.reserve(w.table.size() * a.shape(axis));
    for (int64_t base : w.table) {
      for (int64_t i = 0; i < a.shape(axis); ++i) next.push_back(base + i * a.strides()[axis]);
    }
    w.table.swap(next);
  }
  return w;
}

// n elements of T at base + cols.at(i), as float32 (in dst unless they can be read in place).
template <typename T>
const float* read_row(const T* base, const Walk& cols, float* dst, int64_t n) {
  if (cols.unit()) return as_f32(base, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(base[cols.at(i)]);
  return dst;
}

void check_float(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32 && a.dtype() != mx::float16 && a.dtype() != mx::bfloat16) {
    throw nb::type_error((std::string(what) + ": float32, float16 or bfloat16 expected").c_str());
  }
}

void check_index(const mx::array& a, const char* what) {
  if (a.dtype() != mx::int32 && a.dtype() != mx::int64) {
    throw nb::type_error((std::string(what) + ": int32 or int64 expected").c_str());
  }
}

// Calls f with values of the C++ types of two float dtypes.
template <typename F>
void with_float_types(mx::Dtype a, mx::Dtype b, F&& f) {
  with_float_type(a, [&](auto x) { with_float_type(b, [&](auto y) { f(x, y); }); });
}

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

// Fresh buffers for the outputs, and the stream's encoder told about the arrays the work uses.
mx::cpu::CommandEncoder& prepare(mx::Stream stream, const std::vector<mx::array>& inputs,
                                 std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& in : inputs) encoder.set_input_array(in);
  for (auto& o : outputs) encoder.set_output_array(o);
  return encoder;
}

// ---------------------------------------------------------------------------------------------
// RMS norm

// A [rows, dim] view of `a`: its leading axes flattened, and its last axis.
struct Rows {
  Walk rows, columns;
};

Rows rows_of(const mx::array& a) {
  int n = static_cast<int>(a.ndim());
  return n == 0 ? Rows{} : Rows{walk(a, 0, n - 1), walk(a, n - 1, n)};
}

// R: the type the normalised value is rounded to and multiplied in (the weight's dtype, float32
// for Gemma's 1 + w).
template <typename T, typename W, typename R>
void rms_rows(const T* x, const Rows& x_rows, const T* residual, const Rows& r_rows,
              const W* weight, const Walk& w_columns, float offset, float eps, T* out,
              T* new_residual, int64_t dim) {
  std::vector<float> row(dim), scratch(dim), w(dim);
  if (weight != nullptr) {
    for (int64_t i = 0; i < dim; ++i) w[i] = static_cast<float>(weight[w_columns.at(i)]) + offset;
  }
  for (int64_t r = 0; r < x_rows.rows.count; ++r) {
    const float* xr = read_row(x + x_rows.rows.at(r), x_rows.columns, row.data(), dim);
    if (xr != row.data()) std::memcpy(row.data(), xr, dim * sizeof(float));
    if (residual != nullptr) {
      const float* rr = read_row(residual + r_rows.rows.at(r), r_rows.columns, scratch.data(),
                                 dim);
      T* nr = new_residual + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        row[i] += rr[i];  // in float32, as vLLM adds
        nr[i] = static_cast<T>(row[i]);
      }
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum += row[i] * row[i];
    float inv = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
    T* o = out + r * dim;
    for (int64_t i = 0; i < dim; ++i) {
      float n = row[i] * inv;
      if (weight != nullptr) n = round_to<R>(round_to<R>(n) * w[i]);  // x.to(w.dtype) * w
      o[i] = static_cast<T>(n);
    }
  }
}

class RmsNorm : public mx::Primitive {
 public:
  RmsNorm(mx::Stream stream, float eps, float offset, bool has_weight, bool has_residual)
      : mx::Primitive(stream), eps_(eps), offset_(offset), has_weight_(has_weight),
        has_residual_(has_residual) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    auto& encoder = prepare(stream(), inputs, outputs);
    int64_t dim = x.ndim() ? x.shape(-1) : 1;
    Rows x_rows = rows_of(x), r_rows;
    Walk w_columns;
    const void* wp = nullptr;
    const void* rp = nullptr;
    mx::Dtype wdtype = x.dtype();
    if (has_weight_) {
      wp = inputs[1].data<void>();
      wdtype = inputs[1].dtype();
      w_columns = walk(inputs[1], 0, 1);
    }
    if (has_residual_) {
      const mx::array& residual = inputs[has_weight_ ? 2 : 1];
      rp = residual.data<void>();
      r_rows = rows_of(residual);
    }
    float eps = eps_, offset = offset_;
    bool offset_weight = offset_ != 0.0f;
    const void* xp = x.data<void>();
    void* op = outputs[0].data<void>();
    void* nrp = has_residual_ ? outputs[1].data<void>() : nullptr;
    with_float_types(x.dtype(), wdtype, [&](auto t, auto w) {
      using T = decltype(t);
      using W = decltype(w);
      auto run = [&](auto rounding) {
        using R = decltype(rounding);
        encoder.dispatch([=]() {
          rms_rows<T, W, R>(static_cast<const T*>(xp), x_rows, static_cast<const T*>(rp),
                            r_rows, static_cast<const W*>(wp), w_columns, offset, eps,
                            static_cast<T*>(op), static_cast<T*>(nrp), dim);
        });
      };
      if (offset_weight) {
        run(float{});  // vLLM's Gemma weight is weight.float() + 1
      } else {
        run(W{});
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("rms_norm: torch_mlx's CPU kernel runs on MLX's CPU stream only");
  }

  const char* name() const override { return "TorchMlxRmsNorm"; }

 private:
  float eps_, offset_;
  bool has_weight_, has_residual_;
};

// [normed], or [normed, x + residual] for the fused form. weight_offset is added to the weight
// in float32 (Gemma's 1 + w), which makes the weight's dtype float32 as in vLLM.
std::vector<mx::array> rms_norm(const mx::array& x, std::optional<mx::array> weight, float eps,
                                float weight_offset, std::optional<mx::array> residual) {
  check_float(x, "rms_norm: x");
  std::vector<mx::array> inputs{x};
  if (weight) {
    check_float(*weight, "rms_norm: weight");
    if (weight->ndim() != 1 || x.ndim() == 0 || weight->shape(0) != x.shape(-1)) {
      throw nb::value_error("rms_norm: weight must be [hidden] matching x's last axis");
    }
    inputs.push_back(*weight);
  }
  if (residual) {
    if (residual->shape() != x.shape() || residual->dtype() != x.dtype()) {
      throw nb::value_error("rms_norm: residual must have x's shape and dtype");
    }
    inputs.push_back(*residual);
  }
  auto prim = std::make_shared<RmsNorm>(cpu_stream(), eps, weight_offset, weight.has_value(),
                                        residual.has_value());
  if (!residual) return {mx::array(x.shape(), x.dtype(), prim, inputs)};
  return mx::array::make_arrays({x.shape(), x.shape()}, {x.dtype(), x.dtype()}, prim, inputs);
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

template <typename T, typename C>
void rope_tokens(const T* x, int64_t tokens, int64_t token_stride, const Walk& columns,
                 const Indices& positions,
                 const C* cache, int64_t cache_row_stride, int64_t cache_col_stride,
                 int64_t max_position, T* out, int64_t heads, int64_t head_size,
                 int64_t rotary_dim, bool neox) {
  int64_t half = rotary_dim / 2, width = heads * head_size;
  std::vector<float> cos(half), sin(half), row(width);
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t p = positions.at(t);
    if (p < 0 || p >= max_position) {
      throw std::out_of_range("rope: position " + std::to_string(p) +
                              " is outside the cos/sin cache (" + std::to_string(max_position) +
                              " positions)");
    }
    const C* angles = cache + p * cache_row_stride;
    for (int64_t i = 0; i < half; ++i) {  // torch: cos/sin .to(x.dtype)
      cos[i] = round_to<T>(static_cast<float>(angles[i * cache_col_stride]));
      sin[i] = round_to<T>(static_cast<float>(angles[(half + i) * cache_col_stride]));
    }
    const float* xt = read_row(x + t * token_stride, columns, row.data(), width);
    T* ot = out + t * width;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xh = xt + h * head_size;
      T* oh = ot + h * head_size;
      for (int64_t i = 0; i < half; ++i) {
        int64_t i1 = neox ? i : 2 * i, i2 = neox ? i + half : 2 * i + 1;
        float x1 = xh[i1], x2 = xh[i2];
        // x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product and sum rounded to T
        float a = round_to<T>(x1 * cos[i]), b = round_to<T>(x2 * sin[i]);
        float c = round_to<T>(x2 * cos[i]), d = round_to<T>(x1 * sin[i]);
        oh[i1] = static_cast<T>(a - b);
        oh[i2] = static_cast<T>(c + d);
      }
      for (int64_t i = rotary_dim; i < head_size; ++i) oh[i] = static_cast<T>(xh[i]);
    }
  }
}

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream stream, int64_t head_size, int64_t rotary_dim, bool neox)
      : mx::UnaryPrimitive(stream), head_size_(head_size), rotary_dim_(rotary_dim), neox_(neox) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];  // [T, ...]
    const mx::array& positions = inputs[1];
    const mx::array& cache = inputs[2];
    std::vector<mx::array> outputs{out};
    auto& encoder = prepare(stream(), inputs, outputs);
    int64_t tokens = x.shape(0), token_stride = x.strides()[0];
    Walk columns = walk(x, 1, static_cast<int>(x.ndim()));
    int64_t width = columns.count, head_size = head_size_, rotary_dim = rotary_dim_;
    Indices pos(positions);
    int64_t row_stride = cache.strides()[0], col_stride = cache.strides()[1];
    int64_t max_position = cache.shape(0);
    bool neox = neox_;
    const void* xp = x.data<void>();
    const void* cp = cache.data<void>();
    void* op = out.data<void>();
    with_float_types(x.dtype(), cache.dtype(), [&](auto t, auto c) {
      using T = decltype(t);
      using C = decltype(c);
      encoder.dispatch([=]() {
        rope_tokens<T, C>(static_cast<const T*>(xp), tokens, token_stride, columns, pos,
                          static_cast<const C*>(cp), row_stride, col_stride, max_position,
                          static_cast<T*>(op), width / head_size, head_size, rotary_dim, neox);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("rope: torch_mlx's CPU kernel runs on MLX's CPU stream only");
  }

  const char* name() const override { return "TorchMlxRope"; }

 private:
  int64_t head_size_, rotary_dim_;
  bool neox_;
};

// x [tokens, ...] whose trailing axes hold heads of head_size; returns x rotated (x's shape).
mx::array rope(const mx::array& x, const mx::array& positions, const mx::array& cos_sin_cache,
               int head_size, int rotary_dim, bool is_neox_style) {
  check_float(x, "rope: x");
  check_float(cos_sin_cache, "rope: cos_sin_cache");
  check_index(positions, "rope: positions");
  if (x.ndim() < 2 || positions.ndim() != 1 || positions.shape(0) != x.shape(0)) {
    throw nb::value_error("rope: x must be [tokens, ...] with positions [tokens]");
  }
  int64_t width = x.size() / std::max<int64_t>(x.shape(0), 1);
  if (head_size <= 0 || width % head_size != 0 || rotary_dim <= 0 || rotary_dim % 2 != 0 ||
      rotary_dim > head_size) {
    throw nb::value_error("rope: head_size must divide each token's row, and rotary_dim be even "
                          "and at most head_size");
  }
  if (cos_sin_cache.ndim() != 2 || cos_sin_cache.shape(1) != rotary_dim) {
    throw nb::value_error("rope: cos_sin_cache must be [max_position, rotary_dim]");
  }
  auto prim = std::make_shared<Rope>(cpu_stream(), head_size, rotary_dim, is_neox_style);
  return mx::array(x.shape(), x.dtype(), prim, {x, positions, cos_sin_cache});
}

// ---------------------------------------------------------------------------------------------
// SiluAndMul

// silu(g) = g / (1 + exp(-g)) in float32 over one row of gates. The caller rounds it to T and
// multiplies by up in T (torch's kernels for F.silu(x[..., :d]) * x[..., d:]).
TMX_MULTIVERSION void silu_f32(const float* gate, float* out, int64_t d) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    f32x16 g = LOAD16(gate + i);
    STORE16(out + i, g / (1.0f + EXP16(-g)));
  }
  for (; i < d; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i]));
}

template <typename T>
void silu_mul_rows(const T* x, const Rows& rows, T* out, int64_t d) {
  std::vector<float> row(2 * d), result(d);
  for (int64_t r = 0; r < rows.rows.count; ++r) {
    const float* xr = read_row(x + rows.rows.at(r), rows.columns, row.data(), 2 * d);
    silu_f32(xr, result.data(), d);
    T* o = out + r * d;
    for (int64_t j = 0; j < d; ++j) o[j] = static_cast<T>(round_to<T>(result[j]) * xr[d + j]);
  }
}

class SiluAndMul : public mx::UnaryPrimitive {
 public:
  explicit SiluAndMul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    std::vector<mx::array> outputs{out};
    auto& encoder = prepare(stream(), inputs, outputs);
    Rows rows = rows_of(x);
    int64_t d = out.shape(-1);
    const void* xp = x.data<void>();
    void* op = out.data<void>();
    with_float_type(x.dtype(), [&](auto t) {
      using T = decltype(t);
      encoder.dispatch([=]() {
        silu_mul_rows<T>(static_cast<const T*>(xp), rows, static_cast<T*>(op), d);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("silu_and_mul: torch_mlx's CPU kernel runs on MLX's CPU stream only");
  }

  const char* name() const override { return "TorchMlxSiluAndMul"; }
};

// x [..., 2d] -> silu(x[..., :d]) * x[..., d:], [..., d]
mx::array silu_and_mul(const mx::array& x) {
  check_float(x, "silu_and_mul: x");
  if (x.ndim() == 0 || x.shape(-1) % 2 != 0) {
    throw nb::value_error("silu_and_mul: the last axis must have an even size");
  }
  mx::Shape shape = x.shape();
  shape.back() /= 2;
  return mx::array(shape, x.dtype(), std::make_shared<SiluAndMul>(cpu_stream()), {x});
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention

struct DecodeShape {
  int64_t requests, q_heads, kv_heads, head_size, value_size, block_size, num_blocks;
  int64_t q_strides[3];      // query [R, Hq, D]
  int64_t cache_strides[4];  // blocks, token in block, head, channel
  float scale;
  int64_t window;  // 0: none
};

template <typename T, typename K>
void decode_attention_rows(const T* query, const K* cache, const Indices& seq_lens,
                           const Indices& block_table, int64_t table_width, T* out,
                           const DecodeShape& d) {
  // lengths and block ids first: a bad one raises before anything is read through it
  std::vector<int64_t> lengths(d.requests);
  std::vector<std::vector<int64_t>> blocks(d.requests);
  for (int64_t r = 0; r < d.requests; ++r) {
    lengths[r] = seq_lens.at(r);
    int64_t needed = (lengths[r] + d.block_size - 1) / d.block_size;
    if (lengths[r] < 0 || needed > table_width) {
      throw std::out_of_range("paged_decode_attention: a sequence of " +
                              std::to_string(lengths[r]) + " tokens needs " +
                              std::to_string(needed) + " blocks; its block table has " +
                              std::to_string(table_width));
    }
    for (int64_t b = 0; b < needed; ++b) {
      int64_t block = block_table.at(r, b);
      if (block < 0 || block >= d.num_blocks) {
        throw std::out_of_range("paged_decode_attention: block " + std::to_string(block) +
                                " is outside the cache (" + std::to_string(d.num_blocks) +
                                " blocks)");
      }
      blocks[r].push_back(block);
    }
  }
  int64_t group = d.q_heads / d.kv_heads, hs = d.head_size, vs = d.value_size;
  std::vector<float> q(group * hs), acc(group * vs), row(std::max(hs, vs)), scores;
  Walk key_columns;  // along the channel axis
  key_columns.count = std::max(hs, vs);
  key_columns.stride = d.cache_strides[3];
  for (int64_t r = 0; r < d.requests; ++r) {
    int64_t len = lengths[r];
    int64_t start = d.window > 0 ? std::max<int64_t>(0, len - d.window) : 0;
    int64_t n = len - start;
    scores.resize(group * std::max<int64_t>(n, 1));
    auto token = [&](int64_t p, int64_t h) {  // key/value row of position p, kv head h
      return cache + blocks[r][p / d.block_size] * d.cache_strides[0] +
             (p % d.block_size) * d.cache_strides[1] + h * d.cache_strides[2];
    };
    for (int64_t h = 0; h < d.kv_heads; ++h) {
      // the group's query heads, scaled in the query's dtype (query * scale in the op graph)
      for (int64_t g = 0; g < group; ++g) {
        const T* qg = query + r * d.q_strides[0] + (h * group + g) * d.q_strides[1];
        for (int64_t c = 0; c < hs; ++c) {
          q[g * hs + c] = round_to<T>(static_cast<float>(qg[c * d.q_strides[2]]) * d.scale);
        }
      }
      for (int64_t p = start; p < len; ++p) {
        const float* k = read_row(token(p, h), key_columns, row.data(), hs);
        for (int64_t g = 0; g < group; ++g) {
          scores[g * n + p - start] = round_to<T>(dot_f32(q.data() + g * hs, k, hs));
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax in float32, rounded to T
        float* sg = scores.data() + g * n;
        float top = -INFINITY, total = 0.0f;
        for (int64_t i = 0; i < n; ++i) top = std::max(top, sg[i]);
        for (int64_t i = 0; i < n; ++i) total += (sg[i] = std::exp(sg[i] - top));
        for (int64_t i = 0; i < n; ++i) sg[i] = round_to<T>(sg[i] / total);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t p = start; p < len; ++p) {
        const K* v_row = token(p, h) + hs * d.cache_strides[3];
        const float* v = read_row(v_row, key_columns, row.data(), vs);
        for (int64_t g = 0; g < group; ++g) {
          axpy_f32(acc.data() + g * vs, scores[g * n + p - start], v, vs);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + (r * d.q_heads + h * group + g) * vs;
        for (int64_t c = 0; c < vs; ++c) o[c] = static_cast<T>(acc[g * vs + c]);
      }
    }
  }
}

class PagedDecodeAttention : public mx::UnaryPrimitive {
 public:
  PagedDecodeAttention(mx::Stream stream, float scale, int64_t window, int64_t head_size)
      : mx::UnaryPrimitive(stream), scale_(scale), window_(window), head_size_(head_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& query = inputs[0];
    const mx::array& cache = inputs[1];
    const mx::array& block_table = inputs[2];
    const mx::array& seq_lens = inputs[3];
    std::vector<mx::array> outputs{out};
    auto& encoder = prepare(stream(), inputs, outputs);
    // cache: vLLM's logical view [blocks, H, block_size, Dk + Dv], whatever its physical layout
    DecodeShape d{query.shape(0), query.shape(1), cache.shape(1), head_size_,
                  cache.shape(3) - head_size_, cache.shape(2), cache.shape(0)};
    for (int i = 0; i < 3; ++i) d.q_strides[i] = query.strides()[i];
    d.cache_strides[0] = cache.strides()[0];
    d.cache_strides[1] = cache.strides()[2];
    d.cache_strides[2] = cache.strides()[1];
    d.cache_strides[3] = cache.strides()[3];
    d.scale = scale_;
    d.window = window_;
    Indices lengths(seq_lens), table(block_table);
    int64_t table_width = block_table.shape(1);
    const void* qp = query.data<void>();
    const void* cp = cache.data<void>();
    void* op = out.data<void>();
    with_float_types(query.dtype(), cache.dtype(), [&](auto t, auto k) {
      using T = decltype(t);
      using K = decltype(k);
      encoder.dispatch([=]() {
        decode_attention_rows<T, K>(static_cast<const T*>(qp), static_cast<const K*>(cp),
                                    lengths, table, table_width, static_cast<T*>(op), d);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(
        "paged_decode_attention: torch_mlx's CPU kernel runs on MLX's CPU stream only");
  }

  const char* name() const override { return "TorchMlxPagedDecodeAttention"; }

 private:
  float scale_;
  int64_t window_, head_size_;
};

mx::array paged_decode_attention(const mx::array& query, const mx::array& cache,
                                 const mx::array& block_table, const mx::array& seq_lens,
                                 float scale, std::optional<int> window, int head_size) {
  check_float(query, "paged_decode_attention: query");
  check_float(cache, "paged_decode_attention: cache");
  check_index(block_table, "paged_decode_attention: block_table");
  check_index(seq_lens, "paged_decode_attention: seq_lens");
  if (query.ndim() != 3 || cache.ndim() != 4 || block_table.ndim() != 2 ||
      seq_lens.ndim() != 1) {
    throw nb::value_error("paged_decode_attention: query [R, Hq, D], cache [blocks, H, "
                          "block_size, Dk + Dv], block_table [R, W] and seq_lens [R] expected");
  }
  if (block_table.shape(0) != query.shape(0) || seq_lens.shape(0) != query.shape(0)) {
    throw nb::value_error("paged_decode_attention: one block-table row and length per query");
  }
  if (query.shape(2) != head_size || cache.shape(3) <= head_size ||
      query.shape(1) % cache.shape(1) != 0) {
    throw nb::value_error("paged_decode_attention: head sizes or head counts do not match");
  }
  mx::Shape shape{query.shape(0), query.shape(1), cache.shape(3) - head_size};
  auto prim = std::make_shared<PagedDecodeAttention>(cpu_stream(), scale,
                                                     window.value_or(0), head_size);
  return mx::array(shape, query.dtype(), prim, {query, cache, block_table, seq_lens});
}

}  // namespace

void register_fast_cpu(nb::module_& m) {
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight").none(), nb::arg("eps"),
        nb::arg("weight_offset") = 0.0f, nb::arg("residual").none() = nb::none(),
        "vLLM's rms_norm as one MLX CPU node: [normed]; with a residual, fused_add_rms_norm: "
        "[normed, x + residual].");
  m.def("rope", &rope, nb::arg("x"), nb::arg("positions"), nb::arg("cos_sin_cache"),
        nb::arg("head_size"), nb::arg("rotary_dim"), nb::arg("is_neox_style"),
        "vLLM's rotary embedding of x [tokens, ...] from its cos/sin cache; one MLX CPU node.");
  m.def("silu_and_mul", &silu_and_mul, nb::arg("x"),
        "vLLM's SiluAndMul, silu(x[..., :d]) * x[..., d:], as one MLX CPU node.");
  m.def("paged_decode_attention", &paged_decode_attention, nb::arg("query"), nb::arg("cache"),
        nb::arg("block_table"), nb::arg("seq_lens"), nb::arg("scale"),
        nb::arg("window").none(), nb::arg("head_size"),
        "Attention of one query token per request over its keys/values, read in place from the "
        "paged cache (vLLM's logical view [blocks, H, block_size, Dk + Dv], any layout); one MLX "
        "CPU node.");
}

}  // namespace torch_mlx
