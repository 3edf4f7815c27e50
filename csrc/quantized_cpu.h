// MLX affine quantized matmul and dequantization for MLX's CPU backend (see quantized_cpu.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace torch_mlx {
void register_quantized_cpu(nanobind::module_& m);
}  // namespace torch_mlx
