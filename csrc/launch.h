// How results become torch storages without waiting for the GPU, and how the host then reaches
// "mlx" memory safely. On by default where MLX has a GPU (TORCH_MLX_ASYNC=auto; 1 / 0 force it
// on / off): launch.cpp's async_launch() gives the measurements behind the default.
//
// Eagerly, every op's result becomes a torch storage. Waiting for each one costs a GPU round
// trip per op. With async launch, GPU work is launched (mx::async_eval encodes it and allocates
// the outputs on the calling thread) and the array's completion event is kept in the storage's
// context: an array made from that storage carries the event, so MLX itself waits where a host
// read or another stream needs the data. torch_mlx's own host accesses of "mlx" memory (copies,
// item, fill, in-place writes) wait for every launch first, which also orders a host write after
// GPU kernels still reading the old bytes. MLX gives each thread its own default streams (torch's
// autograd thread launches on others than the main thread), so each launched array is remembered
// and waited for, whatever stream it ran on; every wait releases the GIL (launch.cpp says why).
// The same holds on MLX's CPU backend, whose streams run on threads of their own: the mode works
// (and is tested) there too.
//
// On MLX CUDA a result lives in device memory, and Buffer::raw_ptr() moves it into managed
// memory (a copy not ordered with MLX's stream): torch is given the device address instead,
// and a host access moves the buffer and rebases the storage on the managed address.
#pragma once

#include <ATen/Tensor.h>
#include <mlx/allocator.h>
#include <mlx/array.h>

namespace torch_mlx {

bool async_launch();

// Evaluates `arr`; under async launch, GPU work is only launched: returns whether it may still
// be running (the array's event is signaled when it completes).
bool launch(mlx::core::array& arr);

// Waits for one launched array (a host wait, counted by host_wait_stats).
void wait_for(mlx::core::array arr);

// Waits for all GPU work launched by launch(); call before the host touches "mlx" memory.
void wait_for_launches();

// Whether every result launched by launch() has finished, without waiting (drops the finished
// ones). Work queued on MLX directly is not seen: MLX has no stream query.
bool launches_done();

// Waits for everything torch put on MLX: launched results (wait_for_launches), then MLX's default
// stream (work queued on MLX directly). torch's synchronize calls and event records use it.
void synchronize_all();

// Host time in eager evaluations (sync mode) and in waits for launched work, since the last reset.
struct HostWaitStats {
  uint64_t evals = 0, waits = 0;
  double eval_seconds = 0, wait_seconds = 0;
};
HostWaitStats host_wait_stats(bool reset);

// The address torch's DataPtr holds for a buffer.
void* buffer_address(mlx::core::allocator::Buffer buffer);

// Makes the storage's bytes host-accessible (waiting for launches, moving device memory to
// managed memory on MLX CUDA) and returns the storage's data pointer, rebased if it moved.
// for_write=false: the host only reads the bytes, so launched kernels that read them too are
// not waited for; the storage's own writer still is.
void* host_data(const c10::Storage& storage, bool for_write = true);

}  // namespace torch_mlx
