// torch.special's orthogonal-polynomial recurrences as one MLX CPU node (see polynomial_cpu.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace torch_mlx {
void register_polynomial_cpu(nanobind::module_& m);
}  // namespace torch_mlx
