#include "launch.h"

#include <Python.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
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
// The arrays launched since the last wait. A wait waits for each of them, not for a stream: MLX
// gives each thread its own default streams (mlx/stream.cpp), so work is launched on torch's
// autograd thread's streams as well as the main thread's. (Arrays, not their events: libmlx
// exports array::wait, not Event::wait.)
std::mutex g_launched_mutex;
std::vector<mx::array> g_launched_arrays;

// After the launch: a wait that runs between the two then still finds the flag set
void note_launch(const mx::array& arr) {
  std::lock_guard<std::mutex> lock(g_launched_mutex);
  g_launched.store(true, std::memory_order_release);
  if (g_launched_arrays.size() >= 1024) {  // launches with no host read: drop the finished
    std::erase_if(g_launched_arrays, [](mx::array& a) { return a.is_available(); });
  }
  g_launched_arrays.push_back(arr);
}

// Host time spent evaluating eager results (sync mode: launch and wait, one per op) and waiting
// for launched work (host reads): what a profile of a decode step attributes to "host" but is
// the host waiting for MLX (tools/profile_decode.py reads it through _C.host_wait_stats).
std::atomic<uint64_t> g_eval_count{0}, g_eval_ns{0}, g_wait_count{0}, g_wait_ns{0};

struct Timed {
  std::atomic<uint64_t>& count;
  std::atomic<uint64_t>& ns;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  ~Timed() {
    count.fetch_add(1, std::memory_order_relaxed);
    ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(
                     std::chrono::steady_clock::now() - start).count(),
                 std::memory_order_relaxed);
  }
};

// Waits with the GIL released when this thread holds it: MLX's stream thread, finishing a task,
// drops its inputs, and the last reference to a torch storage (bridge.cpp's deleter) takes the
// GIL to release the storage's Python object. Waiting with the GIL held deadlocked a vLLM engine
// (DeepSeek-V2 eager under TORCH_MLX_ASYNC=1, where Python had already dropped the tensor).
template <typename F>
void without_gil(F&& wait) {
  if (Py_IsInitialized() && PyGILState_Check()) {
    PyThreadState* state = PyEval_SaveThread();
    try {
      wait();
    } catch (...) {
      PyEval_RestoreThread(state);
      throw;
    }
    PyEval_RestoreThread(state);
  } else {
    wait();
  }
}

bool on_mlx_cuda() {
  static const bool cuda = mx::gpu::is_available() && !mx::metal::is_available();
  return cuda;
}

}  // namespace

bool async_launch() {
  // Default: on where MLX has a GPU (Metal, CUDA), off on the CPU-only backend. Measured on the
  // H100 (ninth visit, vLLM 0.5B bf16): 95.4 vs 79.1 tok/s at batch 1, 1923 vs 1889 at 32, same
  // tokens. On the CPU backend the synchronous mode measured faster (tools/bench_decode.py: 17.0
  // vs 15.2 tok/s at batch 1): there a wait is a thread hand-off, not a device round trip.
  static const bool on = [] {
    const char* v = std::getenv("TORCH_MLX_ASYNC");
    if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return mx::gpu::is_available();
    if (std::strcmp(v, "1") == 0) return true;
    if (std::strcmp(v, "0") == 0) return false;
    throw std::invalid_argument(std::string("TORCH_MLX_ASYNC=") + v +
                                ": use 1 (launch without waiting), 0 (wait for each result) or "
                                "auto (1 where MLX has a GPU)");
  }();
  return on;
}

bool launch(mx::array& arr) {
  if (async_launch()) {
    if (arr.status() == mx::array::Status::unscheduled) {
      mx::async_eval({arr});
      note_launch(arr);
      return !arr.is_available();
    }
    // launched already (mx.async_eval from Python: a compiled forward's outputs), or made from
    // a storage whose work is still running: its event goes on, and is waited for
    if (arr.status() == mx::array::Status::evaluated && !arr.is_available()) {
      note_launch(arr);
      return true;
    }
  }
  Timed timed{g_eval_count, g_eval_ns};
  mx::eval(arr);
  without_gil([&] { arr.wait(); });
  return false;
}

HostWaitStats host_wait_stats(bool reset) {
  auto take = [reset](std::atomic<uint64_t>& a) { return reset ? a.exchange(0) : a.load(); };
  HostWaitStats stats;
  stats.evals = take(g_eval_count);
  stats.eval_seconds = take(g_eval_ns) * 1e-9;
  stats.waits = take(g_wait_count);
  stats.wait_seconds = take(g_wait_ns) * 1e-9;
  return stats;
}

void wait_for(mx::array arr) {
  if (arr.is_available()) return;
  Timed timed{g_wait_count, g_wait_ns};
  without_gil([&] { arr.wait(); });
}

void wait_for_launches() {
  if (g_launched.exchange(false, std::memory_order_acq_rel)) {
    std::vector<mx::array> launched;
    {
      std::lock_guard<std::mutex> lock(g_launched_mutex);
      launched.swap(g_launched_arrays);
    }
    Timed timed{g_wait_count, g_wait_ns};
    without_gil([&] {
      for (auto& a : launched) a.wait();
    });
  }
}

bool launches_done() {
  std::lock_guard<std::mutex> lock(g_launched_mutex);
  std::erase_if(g_launched_arrays, [](mx::array& a) { return a.is_available(); });
  if (!g_launched_arrays.empty()) return false;
  // under the lock note_launch takes, so a launch recorded after the erase keeps its flag
  g_launched.store(false, std::memory_order_release);
  return true;
}

void synchronize_all() {
  wait_for_launches();
  mx::synchronize();
}

void* buffer_address(mx::allocator::Buffer buffer) {
  if (async_launch() && on_mlx_cuda() && buffer.ptr() != nullptr) {
    return static_cast<CudaBufferHead*>(buffer.ptr())->data;
  }
  return buffer.raw_ptr();
}

void* host_data(const c10::Storage& storage, bool for_write) {
  StorageCtx& ctx = storage_ctx(storage);
  if (ctx.buffer.ptr() == nullptr) return storage.mutable_data();
  // A launched kernel may still read the bytes a host write replaces: wait for all launched
  // work, unless MLX never had an array over this storage (StorageCtx::exposed) or the host
  // only reads
  if (ctx.exposed && for_write) wait_for_launches();
  settle_write(ctx);
  if (ctx.producer) {  // the storage's own writer, whichever stream it ran on
    Timed timed{g_wait_count, g_wait_ns};
    without_gil([&] { ctx.producer->wait(); });
  }
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
