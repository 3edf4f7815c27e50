// The worker pool of the weight-streaming CPU kernels.
//
// A decode step is a few hundred such products a few hundred microseconds apart, so the pool is
// built for latency, like the GEMV pool of torch_mlx's BLAS shim: an idle worker spins for
// TORCH_MLX_GEMV_SPIN_US (2 ms) before it sleeps on a futex (waking a sleeping thread costs
// about 40 us on a VM's halted vCPU), and the work is shared dynamically: the caller and the
// workers claim chunks from one counter tagged with the job's id, so a worker that starts late or
// loses its core is covered by the others instead of waited for, and one that wakes after its
// job is done cannot claim chunks of the next. A job is published under a sequence lock, so a
// worker never uses a half-written one. Workers: one per further CPU of this process's affinity
// mask, at most 7 (TORCH_MLX_QMM_THREADS sets the total, caller included).
#include "cpu_pool.h"

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define TMX_PAUSE() _mm_pause()
#else
#define TMX_PAUSE() std::this_thread::yield()
#endif

namespace torch_mlx {
namespace {

struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t total = 0, chunk = 1;
  uint32_t id = 0;
};

Job g_job;
std::atomic<uint32_t> g_seq{0};          // odd while g_job is being written
std::atomic<uint64_t> g_claim{0};        // job id << 32 | next index
std::atomic<int64_t> g_done{0};          // items finished in the current job
std::atomic<uint32_t> g_generation{0};   // bumped once per job: wakes the workers
std::atomic<int> g_sleeping{0};
std::once_flag g_started;
std::mutex g_run;  // one job at a time
int g_threads = 1;
double g_spin_us = 2000.0;

int configured_threads() {
  if (const char* env = std::getenv("TORCH_MLX_QMM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  int n = 1;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  return n < 1 ? 1 : (n > 8 ? 8 : n);
}

bool read_job(Job& job) {
  uint32_t s1 = g_seq.load(std::memory_order_acquire);
  if (s1 & 1) return false;
  job = g_job;
  std::atomic_thread_fence(std::memory_order_acquire);
  return g_seq.load(std::memory_order_relaxed) == s1;
}

// Claims and runs chunks of `job` until none is left (or the job is no longer current).
void work(const Job& job) {
  uint64_t claim = g_claim.load(std::memory_order_acquire);
  while ((claim >> 32) == job.id) {
    int64_t begin = static_cast<int64_t>(claim & 0xffffffffu);
    if (begin >= job.total) return;
    int64_t end = std::min(begin + job.chunk, job.total);
    if (!g_claim.compare_exchange_weak(claim, claim + static_cast<uint64_t>(end - begin),
                                       std::memory_order_acq_rel)) {
      continue;
    }
    (*job.fn)(begin, end);
    g_done.fetch_add(end - begin, std::memory_order_release);
    claim = g_claim.load(std::memory_order_acquire);
  }
}

void worker_loop() {
  uint32_t seen = g_generation.load();
  for (;;) {
    auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(
                                                       static_cast<int64_t>(g_spin_us));
    for (int i = 0; g_generation.load(std::memory_order_acquire) == seen; ++i) {
      TMX_PAUSE();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) break;
    }
    while (g_generation.load() == seen) {
      g_sleeping.fetch_add(1);
      g_generation.wait(seen);
      g_sleeping.fetch_sub(1);
    }
    seen = g_generation.load();
    Job job;
    if (read_job(job)) work(job);
  }
}

void start_workers() {
  g_threads = configured_threads();
  if (const char* spin = std::getenv("TORCH_MLX_GEMV_SPIN_US")) g_spin_us = std::atof(spin);
  for (int i = 1; i < g_threads; ++i) std::thread(worker_loop).detach();
}

}  // namespace

int pool_threads() {
  std::call_once(g_started, start_workers);
  return g_threads;
}

void parallel_chunks(int64_t total, int64_t chunk,
                     const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  if (total <= chunk || pool_threads() == 1) {
    fn(0, total);
    return;
  }
  std::lock_guard<std::mutex> lock(g_run);
  uint32_t id = g_job.id + 1;
  g_seq.fetch_add(1, std::memory_order_acq_rel);
  g_job = Job{&fn, total, chunk, id};
  g_seq.fetch_add(1, std::memory_order_release);
  g_done.store(0, std::memory_order_relaxed);
  g_claim.store(static_cast<uint64_t>(id) << 32, std::memory_order_release);
  g_generation.fetch_add(1);
  if (g_sleeping.load() > 0) g_generation.notify_all();
  work(g_job);
  while (g_done.load(std::memory_order_acquire) < total) TMX_PAUSE();
}

}  // namespace torch_mlx
