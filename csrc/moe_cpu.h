// Mixture-of-experts products for MLX's CPU backend (see moe_cpu.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#include <nanobind/nanobind.h>

namespace torch_mlx {
void register_moe_cpu(nanobind::module_& m);

// Rows sorted by expert (ids[r]: row r's expert): run(r0, r1, e) once for each run of rows
// [r0, r1) of one expert e, the unit both grouped kernels (gather_matmul, affine_gather_qmm)
// multiply. A run whose expert is out of range (routing never yields one) gets rows of zeros in
// the float32 result y [rows, n] instead.
template <typename F>
void for_each_expert_run(const uint32_t* ids, int64_t rows, int64_t experts, float* y,
                         int64_t n, F&& run) {
  for (int64_t r0 = 0, r1; r0 < rows; r0 = r1) {
    const uint32_t e = ids[r0];
    for (r1 = r0 + 1; r1 < rows && ids[r1] == e;) ++r1;
    if (static_cast<int64_t>(e) >= experts) {
      std::memset(y + r0 * n, 0, (r1 - r0) * n * sizeof(float));
    } else {
      run(r0, r1, e);
    }
  }
}
}  // namespace torch_mlx
