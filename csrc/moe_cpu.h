// Mixture-of-experts products for MLX's CPU backend (see moe_cpu.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace torch_mlx {
void register_moe_cpu(nanobind::module_& m);
}  // namespace torch_mlx
