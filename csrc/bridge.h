// Zero-copy conversion between torch tensors on "mlx" and mlx::core::array.
#pragma once

#include <ATen/Tensor.h>
#include <mlx/array.h>

namespace torch_mlx {

// Throws TypeError naming the dtype when MLX cannot hold it.
mlx::core::Dtype to_mlx_dtype(c10::ScalarType dtype);
c10::ScalarType to_torch_dtype(mlx::core::Dtype dtype);
void check_dtype(c10::ScalarType dtype);

// An array over the tensor's bytes (offset and strides included). The array keeps the torch
// storage alive; it is never donated to later MLX ops because MLX does not own its buffer.
mlx::core::array tensor_to_array(const at::Tensor& t);

// A tensor on "mlx" over the array's bytes; evaluates the array first. The storage keeps the
// array's data alive. Arrays whose layout torch cannot express are made row-contiguous first.
at::Tensor array_to_tensor(mlx::core::array arr);

// A CPU tensor aliasing the bytes of an "mlx" tensor (unified memory); keeps the storage alive.
at::Tensor cpu_alias(const at::Tensor& t);

}  // namespace torch_mlx
