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
// result=true for an op's fresh result (data_ptr_for_array's hold): its storage can later lend
// its buffer for in-place writes.
at::Tensor array_to_tensor(mlx::core::array arr, bool result = false);

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

// The same loan for a write recorded elsewhere (inside an mx.compile'd graph): an array over
// t's whole buffer that is its sole owner, the storage holding nothing meanwhile. The caller
// makes it the input of one op that MLX computes in place (a scatter), drops every other
// reference to it before evaluating, and hands the op's result to finish_lend. Empty when the
// storage cannot lend (the conditions of scatter_in_place).
std::optional<mlx::core::array> lend_buffer(const at::Tensor& t);

// Takes the buffer back from the in-place result of a lend_buffer loan (after it was launched):
// the result owns the buffer until it is settled, as a scatter_in_place result.
void finish_lend(const at::Tensor& t, const mlx::core::array& result);

// Writes `values` (broadcast to dst's shape, of dst's dtype) over dst's elements as MLX work on
// the device, in place: dst's storage lends its whole buffer (as for scatter_in_place) to a
// dynamic slice update, which MLX computes in the lent buffer. Under async launch it is launched,
// not waited for, and the storage records it as its producer, as for a result: a copy_ or fill_
// (so an in-place op, whose functional result is copied into self, or a compiled graph's input
// mutation) costs no host round trip. False, with nothing written, where it does not apply: dst
// not contiguous, conjugate / negative, a buffer that cannot be lent (not the allocator's or a
// result's, another array holds it). The caller makes sure values does not read dst's bytes.
bool write_in_place(const at::Tensor& dst, const mlx::core::array& values);

// A compiled graph's input mutation `dst.copy_(src)`, where src is a fresh result of the graph
// covering a storage of its own: dst's storage takes src's buffer (the DataPtrs of the two
// storages are swapped; src, dropped by the caller, frees dst's old one once the kernels still
// reading it finish). MLX's own idiom for updating state (arrays are values; mlx-lm rebinds its
// cache), where a write of the old buffer must wait for every kernel still reading it: the graph
// that just read dst. dst's views follow (they share the storage); its data pointer changes, as
// on MLX CUDA when bytes move to managed memory (launch.h). False, nothing changed, unless both
// are contiguous, start at their storage's first byte and cover it, have one dtype, and both
// storages own their buffers through the allocator (not from_mlx, no lent write in flight).
bool adopt_storage(const at::Tensor& dst, const at::Tensor& src);

// How many writes write_in_place made since the last reset.
uint64_t device_write_count(bool reset);

// Whether a host write into dst (a copy_ from src, or a fill) would wait for MLX: dst or src is
// still being written by launched work, or dst's bytes may be read by work still running.
bool host_write_would_wait(const at::Tensor& dst, const at::Tensor* src);

}  // namespace torch_mlx
