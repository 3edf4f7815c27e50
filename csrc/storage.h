// The storage of a torch tensor on "mlx" is an MLX buffer. This header names what a storage's
// DataPtr context holds and the allocator that makes such storages.
#pragma once

#include <memory>
#include <optional>

#include <c10/core/Allocator.h>
#include <c10/core/Storage.h>
#include <mlx/allocator.h>
#include <mlx/array.h>

namespace torch_mlx {

// DataPtr context of every "mlx" storage.
//  - Storages from the allocator own `buffer` and free it through MLX's allocator.
//  - Storages from from_mlx() keep the array's data alive through `owner` instead, so the
//    buffer is freed when the last torch storage and the last mx.array let go of it.
//  - Storages from the allocator own their buffer through `holder`, an array whose data MLX's
//    allocator owns: MLX may then write such a buffer in place (lend_for_write, bridge.h).
struct StorageCtx {
  mlx::core::allocator::Buffer buffer{nullptr};
  int64_t byte_offset = 0;  // storage data pointer minus buffer.raw_ptr()
  std::shared_ptr<mlx::core::array::Data> owner;
  std::optional<mlx::core::array> holder;
  // A write lent the buffer to (lend_for_write): the array that owns the buffer until it is
  // evaluated, in place of `holder`; settled (bridge.h) before anything else reads the bytes.
  std::optional<mlx::core::array> pending_write;
  // Under async launch (csrc/launch.h): the array whose GPU work writes the bytes, while it runs.
  std::optional<mlx::core::array> producer;
  // Whether MLX may hold an array over these bytes: set when one is made from the storage
  // (to_mlx, a lent write) and for storages made from arrays. Until then no launched kernel can
  // read them (MLX recycles a buffer only after the kernels using it have finished), so the host
  // writes a fresh allocator storage (torch.arange, zeros, a copy from the CPU) without waiting
  // for the GPU (launch.cpp host_data).
  bool exposed = false;
};

c10::Allocator* mlx_allocator();

// Finishes a write the storage's buffer was lent to (StorageCtx::pending_write): evaluates it
// and takes the buffer back. Called before the bytes are read through any other array or by the
// host.
void settle_write(StorageCtx& ctx);

// An array sharing only arr's buffer (not its inputs): what a storage's `holder` is made of.
mlx::core::array buffer_holder(const mlx::core::array& arr);

// The MLX context behind an "mlx" storage; throws if the storage was not made by this backend.
StorageCtx& storage_ctx(const c10::Storage& storage);

// A DataPtr for a storage over an evaluated array's buffer. hold=false (from_mlx): the context
// keeps the array's data alive through `owner`. hold=true (an op's result, whose array nothing
// else should keep): through `holder`, an array sharing only the buffer, so the storage can lend
// it for in-place writes once no other array holds it (write_in_place, scatter_in_place).
c10::DataPtr data_ptr_for_array(const mlx::core::array& arr, int64_t byte_offset,
                                bool hold = false);

// Zeroes [data, data + nbytes) of `storage` by pages where that commits no memory (large ranges
// of the CPU backend's malloc memory: allocator.cpp says how); false, with nothing written, where
// it does not apply.
bool zero_by_pages(const c10::Storage& storage, void* data, size_t nbytes);

// Deleter of every storage context made here; identifies "mlx" storages.
void delete_storage_ctx(void* ctx);

// A function run once, at the first real use of the device (first non-empty allocation or
// from_mlx), not at import: torch_mlx/blas.py uses it to start OpenBLAS's threads lazily.
void set_first_use_hook(void (*hook)(int), int arg);
void run_first_use_hook();
// At the device's first use, set MLX_ENABLE_TF32 from torch's float32 matmul precision.
void set_tf32_follows_torch(bool on);

}  // namespace torch_mlx
