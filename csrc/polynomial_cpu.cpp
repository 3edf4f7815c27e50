// The three-term recurrences of torch.special's orthogonal polynomials as one MLX CPU node.
//
// torch's CPU kernels (aten/src/ATen/native/Math.h, *_polynomial_*_forward) evaluate a
// polynomial of degree n by its recurrence wherever they have no closed form: n - 1 float32
// steps per element, stopped early only when the value becomes NaN. Laguerre's and Legendre's
// recurrences have no closed form on the CPU at all, and Laguerre's float32 recurrence amplifies
// its rounding errors (at n = 1e6 the CPU's L_n(1e-3) is -603, the polynomial 0.093), so only
// the same float32 steps reproduce the CPU's numbers. As MLX ops each step is dozens of graph
// nodes of several microseconds each (an mx.compile'd loop ran 72 us per step, an eager one
// 300 us: 72 s for n = 1e6); here each element runs its own loop: memory is the tensor's size,
// time the CPU kernel's.
//
// Each step rounds where torch's compiled kernel rounds. torch builds these kernels with fused
// multiply-adds (AVX2/AVX-512 flags, GCC's default contraction): `a * q - k * p` is
// fma(a, q, -(k * p)), with k * p rounded (read off the kernel's instructions and checked bit
// for bit against torch). This file is built with -ffp-contract=off, so only the std::fma calls
// fuse.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include <mlx/backend/cpu/encoder.h>
#include <mlx/ops.h>
#include <mlx/primitives.h>
#include <mlx/stream.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "polynomial_cpu.h"
#include "simd.h"

namespace nb = nanobind;
namespace mx = mlx::core;


namespace torch_mlx {
namespace {

enum class Kind { Chebyshev, HermiteH, HermiteHe, Laguerre, Legendre };

Kind kind_of(const std::string& name) {
  if (name == "chebyshev") return Kind::Chebyshev;
  if (name == "hermite_h") return Kind::HermiteH;
  if (name == "hermite_he") return Kind::HermiteHe;
  if (name == "laguerre") return Kind::Laguerre;
  if (name == "legendre") return Kind::Legendre;
  throw nb::value_error(("polynomial_recurrence: unknown kind " + name).c_str());
}

// P_n for P_0 = 1, P_1 = first; x is the polynomial's argument (Chebyshev: t, the shifted
// argument for the shifted kinds, whose steps multiply by t + t). n <= 0 gives 1. The loops are
// torch's, step for step; a NaN ends them (NaN is absorbing, so the result is the same).
TMX_MULTIVERSION float recurrence(Kind kind, float x, float first, int64_t n) {
  if (n <= 0) return 1.0f;
  if (n == 1) return first;
  float p = 1.0f, q = first;
  switch (kind) {
    case Kind::Chebyshev:
      for (int64_t k = 2; k <= n && !std::isnan(q); k++) {
        float r = std::fma(x + x, q, -p);
        p = q;
        q = r;
      }
      return q;
    case Kind::HermiteH:  // torch: k = 2, 4, ..., 2n - 2
      for (int64_t k = 2; k < n + n && !std::isnan(q); k += 2) {
        float r = std::fma(x + x, q, -(static_cast<float>(k) * p));
        p = q;
        q = r;
      }
      return q;
    case Kind::HermiteHe:
      for (int64_t k = 1; k < n && !std::isnan(q); k++) {
        float r = std::fma(x, q, -(static_cast<float>(k) * p));
        p = q;
        q = r;
      }
      return q;
    case Kind::Laguerre:  // ((k + k) + (1 - x)) * q - k * p) / (k + 1)
      for (int64_t k = 1; k < n && !std::isnan(q); k++) {
        float a = static_cast<float>(k + k) + (1.0f - x);
        float r = std::fma(a, q, -(static_cast<float>(k) * p)) / static_cast<float>(k + 1);
        p = q;
        q = r;
      }
      return q;
    case Kind::Legendre:  // ((k + k + 1) * x * q - k * p) / (k + 1)
      for (int64_t k = 1; k < n && !std::isnan(q); k++) {
        float a = static_cast<float>(k + k + 1) * x;
        float r = std::fma(a, q, -(static_cast<float>(k) * p)) / static_cast<float>(k + 1);
        p = q;
        q = r;
      }
      return q;
  }
  return std::numeric_limits<float>::quiet_NaN();
}

// Degrees arrive as float32 integers (torch converts its float n to int64); anything outside
// int64 (or NaN) is the caller's to map, and is treated as degree 0 here.
int64_t degree_of(float d) {
  if (!(d >= -9.2233720368547758e18f && d < 9.2233720368547758e18f)) return 0;
  return static_cast<int64_t>(d);
}

class PolynomialRecurrence : public mx::UnaryPrimitive {
 public:
  PolynomialRecurrence(mx::Stream stream, Kind kind) : mx::UnaryPrimitive(stream), kind_(kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) encoder.set_input_array(in);
    encoder.set_output_array(out);
    const float* x = inputs[0].data<float>();
    const float* first = inputs[1].data<float>();
    const float* degree = inputs[2].data<float>();
    float* o = out.data<float>();
    int64_t size = out.size();
    Kind kind = kind_;
    encoder.dispatch([=]() {
      for (int64_t i = 0; i < size; ++i) {
        o[i] = recurrence(kind, x[i], first[i], degree_of(degree[i]));
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("polynomial_recurrence: runs on MLX's CPU stream only");
  }

  const char* name() const override { return "TorchMlxPolynomialRecurrence"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* same = dynamic_cast<const PolynomialRecurrence*>(&other);
    return same != nullptr && same->kind_ == kind_;
  }

 private:
  Kind kind_;
};

mx::array polynomial_recurrence(const std::string& name, const mx::array& x,
                                const mx::array& first, const mx::array& degree) {
  Kind kind = kind_of(name);
  for (const mx::array* a : {&x, &first, &degree}) {
    if (a->dtype() != mx::float32) {
      throw nb::type_error("polynomial_recurrence: float32 arrays expected");
    }
  }
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  auto inputs = mx::broadcast_arrays({x, first, degree}, s);
  for (auto& a : inputs) a = mx::contiguous(a, false, s);
  mx::Shape shape = inputs[0].shape();
  return mx::array(shape, mx::float32, std::make_shared<PolynomialRecurrence>(s, kind), inputs);
}

}  // namespace

void register_polynomial_cpu(nb::module_& m) {
  m.def("polynomial_recurrence", &polynomial_recurrence, nb::arg("kind"), nb::arg("x"),
        nb::arg("first"), nb::arg("degree"),
        "torch's CPU recurrence for an orthogonal polynomial, P_0 = 1, P_1 = first, to each "
        "element's degree (float32 integers; <= 0 gives 1), as one MLX CPU node. kind: "
        "chebyshev (x is t; steps t + t), hermite_h, hermite_he, laguerre, legendre.");
}

}  // namespace torch_mlx
