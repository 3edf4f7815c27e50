// Zero-copy conversion between torch tensors on "mlx" and mlx::core::array.
#pragma once

#include <optional>
#include <vector>

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
// for_write=false: for reading only (see host_data).
at::Tensor cpu_alias(const at::Tensor& t, bool for_write = true);

// An in-place scatter into an "mlx" tensor, as a lazy MLX node: mx::scatter(t, indices,
// updates, axes) whose result shares t's buffer, O(updates) when evaluated. MLX writes an op's
// result into its input's buffer ("donation") only when that input is the sole array over a
// buffer its allocator owns; the storage lends its buffer to such an array for the write, and
// the result owns the buffer until it is settled (evaluated, checked to be in place) before
// anything else reads the storage. Read t's new contents through the result. Empty when the
// storage cannot lend (t not contiguous, its buffer shared with other arrays or bigger than t,
// or not the allocator's): write another way.
std::optional<mlx::core::array> scatter_in_place(const at::Tensor& t,
                                                 const std::vector<mlx::core::array>& indices,
                                                 const mlx::core::array& updates,
                                                 const std::vector<int>& axes);

}  // namespace torch_mlx
