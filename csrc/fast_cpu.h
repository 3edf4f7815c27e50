// Decoder-layer kernels for MLX's CPU backend as MLX graph nodes (see fast_cpu.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace torch_mlx {

void register_fast_cpu(nanobind::module_& m);

}  // namespace torch_mlx
