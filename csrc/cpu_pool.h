// A small thread pool for the CPU kernels that stream weights (quantized matmul): the caller and
// the workers claim chunks of one job from a shared counter (see cpu_pool.cpp).
#pragma once

#include <cstdint>
#include <functional>

namespace torch_mlx {

// Runs fn(begin, end) over [0, total) in chunks of `chunk`, on the calling thread and the pool's
// workers; returns when every chunk is done. One job at a time (callers are MLX's CPU stream).
void parallel_chunks(int64_t total, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

// Threads a job may use, the caller included.
int pool_threads();

}  // namespace torch_mlx
