// write_slots: the KV-cache write as an MLX graph node (see slot_write.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace torch_mlx {

void register_slot_write(nanobind::module_& m);

}  // namespace torch_mlx
