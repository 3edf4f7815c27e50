// The cblas_sgemm MLX's own CPU matmul calls, for torch_mlx's CPU kernels (see cpu_blas.cpp).
#pragma once

namespace torch_mlx {

// cblas_sgemm's signature (row-major 101, no transpose 111, transpose 112).
using SgemmFn = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// MLX's cblas_sgemm, or nullptr where MLX links none (a GPU-only build).
SgemmFn mlx_sgemm();

}  // namespace torch_mlx
