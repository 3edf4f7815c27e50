// Allocator for device "mlx": every byte of a torch storage comes from MLX's allocator, so an
// mx.array can be built over it without a copy (MLX's CPU allocator cannot adopt foreign memory).
#include "storage.h"

#include <cstring>
#include <mutex>

#include <c10/util/Exception.h>

namespace mx = mlx::core;

namespace torch_mlx {

void delete_storage_ctx(void* p) {
  auto* ctx = static_cast<StorageCtx*>(p);
  if (!ctx->owner && ctx->buffer.ptr() != nullptr) {
    mx::allocator::allocator().free(ctx->buffer);
  }
  delete ctx;
}

namespace {

void (*g_first_use_hook)(int) = nullptr;
int g_first_use_arg = 0;
std::once_flag g_first_use;

}  // namespace

void set_first_use_hook(void (*hook)(int), int arg) {
  g_first_use_hook = hook;
  g_first_use_arg = arg;
}

void run_first_use_hook() {
  std::call_once(g_first_use, [] {
    if (g_first_use_hook != nullptr) g_first_use_hook(g_first_use_arg);
  });
}

namespace {

class MlxAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    auto* ctx = new StorageCtx();
    void* data = nullptr;
    if (nbytes > 0) {
      run_first_use_hook();
      try {
        ctx->buffer = mx::allocator::allocator().malloc(nbytes);
      } catch (const std::exception& e) {
        delete ctx;
        TORCH_CHECK_WITH(OutOfMemoryError, false, "mlx: failed to allocate ", nbytes,
                         " bytes: ", e.what());
      }
      if (ctx->buffer.ptr() == nullptr) {
        delete ctx;
        TORCH_CHECK_WITH(OutOfMemoryError, false, "mlx: out of memory allocating ", nbytes,
                         " bytes");
      }
      data = ctx->buffer.raw_ptr();
    }
    return {data, ctx, &delete_storage_ctx, c10::Device(c10::DeviceType::PrivateUse1, 0)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return nullptr;
  }

  // Unified memory: the host can copy device bytes directly.
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

MlxAllocator g_allocator;

}  // namespace

c10::Allocator* mlx_allocator() {
  return &g_allocator;
}

StorageCtx& storage_ctx(const c10::Storage& storage) {
  const auto& dp = storage.data_ptr();
  TORCH_CHECK(dp.get_deleter() == &delete_storage_ctx,
              "mlx: this storage was not allocated by the mlx backend (was it made with "
              "from_blob or set_ on foreign memory?); copy it with .clone() first");
  return *static_cast<StorageCtx*>(dp.get_context());
}

c10::DataPtr data_ptr_for_array(const mx::array& arr, int64_t byte_offset) {
  auto* ctx = new StorageCtx();
  ctx->buffer = arr.buffer();
  ctx->byte_offset = byte_offset;
  ctx->owner = arr.data_shared_ptr();
  void* data = static_cast<char*>(ctx->buffer.raw_ptr()) + byte_offset;
  return {data, ctx, &delete_storage_ctx, c10::Device(c10::DeviceType::PrivateUse1, 0)};
}

REGISTER_ALLOCATOR(c10::DeviceType::PrivateUse1, &g_allocator);

}  // namespace torch_mlx
