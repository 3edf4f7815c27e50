#include "launch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include <mlx/backend/gpu/device_info.h>
#include <mlx/backend/metal/metal.h>
#include <mlx/primitives.h>
#include <mlx/stream.h>
#include <mlx/transforms.h>

#include "storage.h"

namespace mx = mlx::core;

namespace torch_mlx {
namespace {

// The head of MLX CUDA's buffer record (mlx/backend/cuda/allocator.h, CudaBuffer): that header
// needs CUDA's own headers, and only the address is read here.
struct CudaBufferHead {
  void* data;
  size_t size;
  int device;  // -1: managed (host-accessible) memory
};

std::atomic<bool> g_launched{false};

bool on_mlx_cuda() {
  static const bool cuda = mx::gpu::is_available() && !mx::metal::is_available();
  return cuda;
}

}  // namespace

bool async_launch() {
  static const bool on = [] {
    const char* v = std::getenv("TORCH_MLX_ASYNC");
    return v != nullptr && std::strcmp(v, "1") == 0 && mx::gpu::is_available();
  }();
  return on;
}

bool launch(mx::array& arr) {
  if (async_launch()) {
    if (arr.status() == mx::array::Status::unscheduled &&
        arr.primitive().device() == mx::Device::gpu) {
      mx::async_eval({arr});
      g_launched.store(true, std::memory_order_release);
      return !arr.is_available();
    }
    // made from a storage whose GPU work is still running: its event goes on
    if (arr.status() == mx::array::Status::evaluated && !arr.is_available()) return true;
  }
  mx::eval(arr);
  arr.wait();
  return false;
}

void wait_for_launches() {
  if (g_launched.exchange(false, std::memory_order_acq_rel)) {
    mx::synchronize(mx::default_stream(mx::Device::gpu));
  }
}

void* buffer_address(mx::allocator::Buffer buffer) {
  if (async_launch() && on_mlx_cuda() && buffer.ptr() != nullptr) {
    return static_cast<CudaBufferHead*>(buffer.ptr())->data;
  }
  return buffer.raw_ptr();
}

void* host_data(const c10::Storage& storage) {
  wait_for_launches();
  StorageCtx& ctx = storage_ctx(storage);
  if (ctx.buffer.ptr() == nullptr) return storage.mutable_data();
  settle_write(ctx);
  ctx.producer.reset();
  void* host = static_cast<char*>(ctx.buffer.raw_ptr()) + ctx.byte_offset;
  auto* impl = storage.unsafeGetStorageImpl();
  if (impl->data() != host) {  // MLX CUDA moved the bytes to managed memory: follow them
    c10::DataPtr old = impl->set_data_ptr(c10::DataPtr(nullptr, impl->device()));
    void* context = old.release_context();
    impl->set_data_ptr_noswap(
        c10::DataPtr(host, context, &delete_storage_ctx, impl->device()));
  }
  return host;
}

}  // namespace torch_mlx
