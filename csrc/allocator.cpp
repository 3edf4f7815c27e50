// Allocator for device "mlx": every byte of a torch storage comes from MLX's allocator, so an
// mx.array can be built over it without a copy (MLX's CPU allocator cannot adopt foreign memory).
#include "launch.h"
#include "storage.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <variant>
#include <vector>

#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/Context.h>
#include <ATen/core/CachingHostAllocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/util/Exception.h>
#include <mlx/device.h>
#include <mlx/memory.h>

namespace mx = mlx::core;

namespace torch_mlx {

void delete_storage_ctx(void* p) {
  auto* ctx = static_cast<StorageCtx*>(p);
  // `owner`, `holder` or `pending_write` free the buffer with the last array that holds it
  if (!ctx->owner && !ctx->holder && !ctx->pending_write && ctx->buffer.ptr() != nullptr) {
    mx::allocator::allocator().free(ctx->buffer);
  }
  delete ctx;
}

namespace {

void (*g_first_use_hook)(int) = nullptr;
int g_first_use_arg = 0;
std::once_flag g_first_use;
bool g_tf32_follows_torch = false;

}  // namespace

void set_first_use_hook(void (*hook)(int), int arg) {
  g_first_use_hook = hook;
  g_first_use_arg = arg;
}

void set_tf32_follows_torch(bool on) { g_tf32_follows_torch = on; }

void run_first_use_hook() {
  std::call_once(g_first_use, [] {
    // MLX's GPU backend reads MLX_ENABLE_TF32 once, as it first sets up; the device's first
    // allocation comes before that, so torch's float32 matmul precision at this moment decides
    // (torch_mlx/precision.py; unless the user set the variable).
    if (g_tf32_follows_torch) {
      const bool tf32 =
          at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
      setenv("MLX_ENABLE_TF32", tf32 ? "1" : "0", 1);
    }
    if (g_first_use_hook != nullptr) g_first_use_hook(g_first_use_arg);
  });
}

namespace {

// The device's memory: what MLX reports for Metal (the GPU's recommended working set), else the
// machine's RAM (MLX's CPU backend reports no size; memory is unified either way).
// vllm_metal/memory.py reads it through torch.accelerator.get_memory_info.
size_t device_total_memory() {
  const auto& info = mx::device_info();
  for (const char* key : {"max_recommended_working_set_size", "memory_size"}) {
    auto it = info.find(key);
    if (it != info.end() && std::holds_alternative<size_t>(it->second) &&
        std::get<size_t>(it->second) > 0) {
      return std::get<size_t>(it->second);
    }
  }
  return static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGE_SIZE));
}

// Large buffers (weights, KV cache) are read end to end on every decode step. On Linux the CPU
// backend's bytes come from malloc, in 4 KiB pages unless asked otherwise ("madvise" is the usual
// transparent-huge-page setting); 2 MiB pages cut TLB misses and raise the streaming rate of a
// matrix-vector product by about 15% here. Asked before the pages are first touched, as numpy
// does for its large arrays. TORCH_MLX_HUGEPAGES=0 turns it off.
constexpr size_t kHugePage = size_t{2} << 20;

bool huge_pages_enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("TORCH_MLX_HUGEPAGES");
    // only the CPU backend's buffers are plain malloc memory (a GPU backend's are not)
    return (env == nullptr || std::strcmp(env, "0") != 0) &&
           !mx::is_available(mx::Device(mx::Device::gpu));
  }();
  return enabled;
#else
  return false;
#endif
}

void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes < 2 * kHugePage || !huge_pages_enabled()) return;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHugePage - 1);
  if (last > first) {
    // advisory: a kernel without THP refuses it and nothing changes
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)nbytes;
#endif
}

// A c10::DeviceAllocator, so torch.accelerator's memory API (empty_cache, memory_stats,
// memory_allocated, reset_peak_memory_stats, get_memory_info) works for "mlx". The statistics
// are MLX's allocator counters: torch storages and MLX arrays share that allocator.
class MlxAllocator final : public c10::DeviceAllocator {
 public:
  bool initialized() override {
    return true;
  }

  void emptyCache(c10::MempoolId_t /*mempool_id*/) override {
    mx::clear_cache();  // MLX's buffer cache: freed buffers kept for reuse
  }

  // One in-order stream per device and eager ops complete before they return: a buffer is
  // never in flight on another stream.
  void recordStream(const c10::DataPtr& /*ptr*/, c10::Stream /*stream*/) override {}

  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex /*device*/) override {
    c10::CachingDeviceAllocator::DeviceStats stats;
    const auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    const auto active = static_cast<int64_t>(mx::get_active_memory());
    // MLX's peak restarts at 0 when reset; torch's restarts at the current usage
    const auto peak = std::max(static_cast<int64_t>(mx::get_peak_memory()), active);
    const auto cached = static_cast<int64_t>(mx::get_cache_memory());
    for (auto* stat : {&stats.allocated_bytes[aggregate], &stats.active_bytes[aggregate],
                       &stats.requested_bytes[aggregate]}) {
      stat->current = active;
      stat->peak = peak;
    }
    stats.reserved_bytes[aggregate].current = active + cached;
    stats.reserved_bytes[aggregate].peak = std::max(peak, active + cached);
    return stats;
  }

  // MLX keeps no cumulative counters (allocation counts, bytes freed) to reset.
  void resetAccumulatedStats(c10::DeviceIndex /*device*/) override {}

  void resetPeakStats(c10::DeviceIndex /*device*/) override {
    mx::reset_peak_memory();
  }

  std::pair<size_t, size_t> getMemoryInfo(c10::DeviceIndex /*device*/) override {
    const size_t total = device_total_memory();
    const size_t used = mx::get_active_memory() + mx::get_cache_memory();
    return {total > used ? total - used : 0, total};
  }

  c10::DataPtr allocate(size_t nbytes) override {
    auto* ctx = new StorageCtx();
    void* data = nullptr;
    if (nbytes > 0) {
      run_first_use_hook();
      try {
        // Owned by MLX's allocator (and held through an array): MLX writes into a buffer in
        // place only when its allocator owns it, which the KV cache's writes need.
        mx::allocator::Data data = mx::allocator::malloc(nbytes);
        ctx->buffer = data.buffer();
        if (ctx->buffer.ptr() != nullptr) ctx->holder = mx::array(std::move(data), {1}, mx::uint8);
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
      advise_huge_pages(data, nbytes);
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

c10::DataPtr data_ptr_for_array(const mx::array& arr, int64_t byte_offset, bool hold) {
  auto* ctx = new StorageCtx();
  ctx->buffer = arr.buffer();
  ctx->byte_offset = byte_offset;
  if (hold) {
    // the buffer only: the array's inputs (a graph still referenced) are not kept
    ctx->holder = buffer_holder(arr);
  } else {
    ctx->owner = arr.data_shared_ptr();
  }
  ctx->exposed = true;
  void* data = static_cast<char*>(buffer_address(ctx->buffer)) + byte_offset;
  return {data, ctx, &delete_storage_ctx, c10::Device(c10::DeviceType::PrivateUse1, 0)};
}

REGISTER_ALLOCATOR(c10::DeviceType::PrivateUse1, &g_allocator);

// Zeroing by pages. A storage from the allocator above is, on MLX's CPU backend, private
// anonymous memory from malloc. For such memory MADV_DONTNEED releases a page and the kernel
// maps a zero page at the next touch (swapped-out pages included), so a large zero_ needs to
// write only the pages that are resident: a fresh buffer (vLLM's KV cache, torch.zeros of
// gigabytes) is zeroed without committing any memory, which then happens page by page as it is
// written. Each run of resident pages is cleared with memset instead (as fast as a fill, and it
// keeps its pages), so re-zeroing a buffer in use costs what it did. The unaligned head and tail
// are cleared with memset too. Not for a GPU backend's memory (Metal buffers, CUDA managed
// memory) nor for storages over an mx.array's buffer (from_mlx: memory MLX may have from
// elsewhere).
bool zero_by_pages(const c10::Storage& storage, void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_DONTNEED)
  constexpr size_t kMinBytes = size_t{16} << 20;
  static const bool cpu_backend = !mx::is_available(mx::Device(mx::Device::gpu));
  if (nbytes < kMinBytes || !cpu_backend) return false;
  const auto& dp = storage.data_ptr();
  if (dp.get_deleter() != &delete_storage_ctx ||
      static_cast<StorageCtx*>(dp.get_context())->owner != nullptr) {
    return false;
  }
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + page - 1) & ~(page - 1);
  const uintptr_t last = (begin + nbytes) & ~(page - 1);
  if (last <= first) return false;
  const size_t pages = (last - first) / page;
  std::vector<unsigned char> resident(pages);
  if (mincore(reinterpret_cast<void*>(first), last - first, resident.data()) != 0) return false;
  std::memset(data, 0, first - begin);
  std::memset(reinterpret_cast<void*>(last), 0, begin + nbytes - last);
  for (size_t i = 0; i < pages;) {
    const bool in_core = resident[i] & 1;
    size_t j = i + 1;
    while (j < pages && (resident[j] & 1) == in_core) ++j;
    auto* run = reinterpret_cast<void*>(first + i * page);
    const size_t run_bytes = (j - i) * page;
    if (in_core || madvise(run, run_bytes, MADV_DONTNEED) != 0) std::memset(run, 0, run_bytes);
    i = j;
  }
  return true;
#else
  (void)storage;
  (void)data;
  (void)nbytes;
  return false;
#endif
}

namespace {

// The "pinned host memory" allocator of device "mlx" (torch.Tensor.pin_memory("mlx"),
// torch.accelerator.empty_host_cache). Memory is unified, so page-locked staging buffers are not
// needed: pinned host memory is plain host memory, counted here, and there is no cache to empty.
class MlxHostAllocator final : public at::HostAllocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    auto* block = new HostBlock{c10::GetDefaultCPUAllocator()->allocate(nbytes), nbytes};
    void* data = block->cpu.get();
    if (data != nullptr) {
      const int64_t now = allocated_.fetch_add(static_cast<int64_t>(nbytes)) +
                          static_cast<int64_t>(nbytes);
      int64_t peak = peak_.load();
      while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
      }
      count_.fetch_add(1);
    }
    return {data, block, &free_host, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // Nothing is in flight on another stream (see MlxAllocator::recordStream).
  bool record_event(void* /*ptr*/, void* /*ctx*/, c10::Stream /*stream*/) override {
    return true;
  }

  void empty_cache() override {}  // no cache: blocks are freed when their tensors go

  at::HostStats get_stats() override {
    at::HostStats stats;
    stats.allocated_bytes.current = allocated_.load();
    stats.allocated_bytes.peak = peak_.load();
    stats.allocations.current = count_.load();
    return stats;
  }

  void reset_accumulated_stats() override {}

  void reset_peak_stats() override {
    peak_.store(allocated_.load());
  }

  struct HostBlock {
    c10::DataPtr cpu;  // from torch's CPU allocator; freed with the block
    size_t nbytes;
  };

  static void free_host(void* ctx) {
    auto* block = static_cast<HostBlock*>(ctx);
    if (block->cpu.get() != nullptr) {
      g_host_allocator_instance->release(block->nbytes);
    }
    delete block;
  }

  void release(size_t nbytes) {
    allocated_.fetch_sub(static_cast<int64_t>(nbytes));
    count_.fetch_sub(1);
  }

  static MlxHostAllocator* g_host_allocator_instance;

 private:
  std::atomic<int64_t> allocated_{0};
  std::atomic<int64_t> peak_{0};
  std::atomic<int64_t> count_{0};
};

MlxHostAllocator g_host_allocator;
MlxHostAllocator* MlxHostAllocator::g_host_allocator_instance = &g_host_allocator;

}  // namespace

REGISTER_HOST_ALLOCATOR(at::kPrivateUse1, &g_host_allocator);

}  // namespace torch_mlx
