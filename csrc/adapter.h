// The argument walkers of the eager kernel adapter (see adapter.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace torch_mlx {

void register_adapter(nanobind::module_& m);

}  // namespace torch_mlx
