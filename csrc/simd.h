// What the CPU kernels (fast_cpu.cpp, quantized_cpu.cpp, polynomial_cpu.cpp) share: function
// multiversioning, 16-float GCC vectors, and dispatch on MLX's float element types.
#pragma once

#include <cstring>

#include <mlx/dtype.h>
#include <mlx/types/half_types.h>

// One clone per instruction set, picked at load time: AVX-512 where the CPU has it, AVX2+FMA,
// and a portable default (GCC on x86-64 Linux; elsewhere the compiler's own vectorisation).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TMX_MULTIVERSION __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define TMX_MULTIVERSION
#endif
#define TMX_INLINE inline __attribute__((always_inline))

namespace torch_mlx {

typedef float f32x16 __attribute__((vector_size(64)));

// Calls f with a value of the C++ type of `dtype` (one of the three float dtypes).
template <typename F>
void with_float_type(mlx::core::Dtype dtype, F&& f) {
  if (dtype == mlx::core::float32) {
    f(float{});
  } else if (dtype == mlx::core::float16) {
    f(mlx::core::float16_t{});
  } else {
    f(mlx::core::bfloat16_t{});
  }
}

}  // namespace torch_mlx

// Unaligned 16-float loads and stores (macros: a function returning the vector type outside an
// AVX-512 clone would have another ABI).
#define LOAD16(p)                        \
  ({                                     \
    ::torch_mlx::f32x16 v_;              \
    std::memcpy(&v_, (p), sizeof(v_));   \
    v_;                                  \
  })
#define STORE16(p, v)                    \
  do {                                   \
    ::torch_mlx::f32x16 v_ = (v);        \
    std::memcpy((p), &v_, sizeof(v_));   \
  } while (0)
