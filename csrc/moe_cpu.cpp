// The routed experts' products for MLX's CPU backend: y[p] = x[p] @ w[experts[p]].T for every
// row p of x, as one MLX graph node.
//
// MLX's CPU gather_mm makes one cblas_sgemm call per row of x (M = 1) whatever the order of the
// indices, so a decode step of 32 sequences at top-2 reads the touched experts' matrices 64 times
// in all. Here each maximal run of consecutive rows with the same expert (vllm_metal sorts the
// (token, expert) pairs by expert) is one product: the expert's matrix is read once and shared by
// the run's rows, through the BLAS MLX itself uses (on Linux torch_mlx's shim: its own kernels
// for one row and for 2-12 rows, OpenBLAS's GEMM above). Unsorted rows are still right, in more,
// shorter runs. Half-precision operands are widened to float32 (one expert's matrix at a time)
// and the result rounded back: MLX's CPU matmul also accumulates half types in float32.
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

#include "cpu_blas.h"
#include "moe_cpu.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace torch_mlx {
namespace {

// n values at p (dtype `dtype`) as float32: p itself for float32, else widened into `buffer`.
const float* as_float32(const void* p, mx::Dtype dtype, int64_t n, std::vector<float>& buffer) {
  if (dtype == mx::float32) return static_cast<const float*>(p);
  buffer.resize(n);
  if (dtype == mx::float16) {
    auto* h = static_cast<const mx::float16_t*>(p);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(h[i]);
  } else {
    auto* b = static_cast<const mx::bfloat16_t*>(p);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(b[i]);
  }
  return buffer.data();
}

void store(const float* y, void* out, mx::Dtype dtype, int64_t n) {
  if (dtype == mx::float16) {
    auto* h = static_cast<mx::float16_t*>(out);
    for (int64_t i = 0; i < n; ++i) h[i] = static_cast<mx::float16_t>(y[i]);
  } else if (dtype == mx::bfloat16) {
    auto* b = static_cast<mx::bfloat16_t*>(out);
    for (int64_t i = 0; i < n; ++i) b[i] = static_cast<mx::bfloat16_t>(y[i]);
  }
}

class GatherMatmul : public mx::UnaryPrimitive {
 public:
  explicit GatherMatmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array &x = inputs[0], &w = inputs[1], &experts = inputs[2];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) encoder.set_input_array(in);
    encoder.set_output_array(out);
    int64_t rows = x.shape(0), k = x.shape(1), e_count = w.shape(0), n = w.shape(1);
    const void* xp = x.data<void>();
    const char* wp = w.data<char>();
    const uint32_t* ids = experts.data<uint32_t>();
    void* op = out.data<void>();
    mx::Dtype x_dtype = x.dtype(), w_dtype = w.dtype(), out_dtype = out.dtype();
    size_t w_item = w.itemsize();
    encoder.dispatch([=]() {
      SgemmFn sgemm = mlx_sgemm();
      std::vector<float> x_buffer, w_buffer, y_buffer;
      const float* xf = as_float32(xp, x_dtype, rows * k, x_buffer);
      if (out_dtype != mx::float32) y_buffer.resize(rows * n);
      float* y = out_dtype == mx::float32 ? static_cast<float*>(op) : y_buffer.data();
      for_each_expert_run(ids, rows, e_count, y, n, [&](int64_t r0, int64_t r1, uint32_t e) {
        const float* we = as_float32(wp + e * n * k * w_item, w_dtype, n * k, w_buffer);
        sgemm(kRowMajor, kNoTrans, kTrans, static_cast<int>(r1 - r0), static_cast<int>(n),
              static_cast<int>(k), 1.0f, xf + r0 * k, static_cast<int>(k), we,
              static_cast<int>(k), 0.0f, y + r0 * n, static_cast<int>(n));
      });
      store(y, op, out_dtype, rows * n);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("gather_matmul: torch_mlx's CPU kernel runs on MLX's CPU stream "
                             "only");
  }

  const char* name() const override { return "TorchMlxGatherMatmul"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

bool is_float(const mx::array& a) {
  return a.dtype() == mx::float32 || a.dtype() == mx::float16 || a.dtype() == mx::bfloat16;
}

mx::array gather_matmul(const mx::array& x, const mx::array& w, const mx::array& experts) {
  if (!is_float(x) || !is_float(w) || x.ndim() != 2 || w.ndim() != 3 || x.shape(1) != w.shape(2)) {
    throw nb::value_error("gather_matmul: x must be float [P, K] and w float [E, N, K]");
  }
  if (experts.ndim() != 1 || experts.shape(0) != x.shape(0) ||
      (experts.dtype() != mx::uint32 && experts.dtype() != mx::int32)) {
    throw nb::value_error("gather_matmul: experts must be [P] uint32 (one per row of x)");
  }
  if (mlx_sgemm() == nullptr) {
    throw std::runtime_error("gather_matmul: MLX links no CPU BLAS here");
  }
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  auto prim = std::make_shared<GatherMatmul>(s);
  return mx::array({x.shape(0), w.shape(1)}, x.dtype(), prim,
                   {mx::contiguous(x, false, s), mx::contiguous(w, false, s),
                    mx::contiguous(mx::view(experts, mx::uint32, s), false, s)});
}

}  // namespace

void register_moe_cpu(nb::module_& m) {
  m.def("gather_matmul", &gather_matmul, nb::arg("x"), nb::arg("w"), nb::arg("experts"),
        "y[p] = x[p] @ w[experts[p]].T for x [P, K], w [E, N, K]: one product per run of rows "
        "with the same expert (sort rows by expert), through MLX's BLAS; one MLX CPU node.");
  m.def("has_cpu_blas", []() { return mlx_sgemm() != nullptr; },
        "Whether MLX links a CPU BLAS torch_mlx's kernels can call (gather_matmul).");
}

}  // namespace torch_mlx
