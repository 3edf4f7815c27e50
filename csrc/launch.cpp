#include "launch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

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
// The streams work was launched on since the last wait. MLX gives each thread its own default
// streams (mlx/stream.cpp), so an op launched on torch's autograd thread is on another stream
// than the main thread's: a wait must synchronize every stream that holds launched work.
std::mutex g_streams_mutex;
std::vector<mx::Stream> g_streams;

// After the launch: a wait that runs between the two then still finds the flag set
void note_launch(const mx::Stream& s) {
  std::lock_guard<std::mutex> lock(g_streams_mutex);
  g_launched.store(true, std::memory_order_release);
  for (const auto& known : g_streams) {
    if (known == s) return;
  }
  g_streams.push_back(s);
}

bool on_mlx_cuda() {
  static const bool cuda = mx::gpu::is_available() && !mx::metal::is_available();
  return cuda;
}

}  // namespace

bool async_launch() {
  static const bool on = [] {
    const char* v = std::getenv("TORCH_MLX_ASYNC");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

bool launch(mx::array& arr) {
  if (async_launch()) {
    if (arr.status() == mx::array::Status::unscheduled) {
      mx::Stream stream = arr.primitive().stream();  // before: evaluation detaches the array
      mx::async_eval({arr});
      note_launch(stream);
      return !arr.is_available();
    }
    // launched already (mx.async_eval from Python: a compiled forward's outputs), or made from
    // a storage whose work is still running: its event goes on, and its stream is waited for
    if (arr.status() == mx::array::Status::evaluated && !arr.is_available()) {
      if (arr.event().valid()) note_launch(arr.event().stream());
      return true;
    }
  }
  mx::eval(arr);
  arr.wait();
  return false;
}

void wait_for_launches() {
  if (g_launched.exchange(false, std::memory_order_acq_rel)) {
    std::vector<mx::Stream> streams;
    {
      std::lock_guard<std::mutex> lock(g_streams_mutex);
      streams.swap(g_streams);
    }
    for (const auto& s : streams) mx::synchronize(s);
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
  if (ctx.producer) ctx.producer->wait();  // the storage's own writer, whichever stream it ran on
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
