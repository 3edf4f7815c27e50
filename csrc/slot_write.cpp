// An in-place row write as an MLX primitive: the paged KV cache's write inside a lazy MLX graph.
//
// MLX arrays are immutable, so an MLX scatter into the KV cache would copy the whole cache. The
// eager path can write through a CPU alias because every op has finished when it returns; a
// compiled forward is one lazy graph, where the new keys/values are not computed yet when the
// write is recorded. SlotWrite is that write as a graph node: its output shares the cache's
// buffer, and evaluating it copies each new row into its slot, O(bytes written). Attention
// reads the cache through this output, so MLX orders the read after the write.
//
// It runs on MLX's CPU stream on every backend: memory is unified, and MLX orders a CPU-stream
// node after the GPU work that produced its inputs.
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include <mlx/backend/cpu/encoder.h>
#include <mlx/ops.h>
#include <mlx/primitives.h>
#include <mlx/stream.h>
#include <nanobind/nanobind.h>

#include "slot_write.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace torch_mlx {
namespace {

// cache: [num_blocks, heads, block_size, content] (any strides, content contiguous);
// rows: [tokens, heads, content] row-contiguous; slots: [tokens] integers, slot < 0 skipped.
// Slot s is block s / block_size, offset s % block_size.
class SlotWrite : public mx::UnaryPrimitive {
 public:
  explicit SlotWrite(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& cache = inputs[0];
    const mx::array& rows = inputs[1];
    const mx::array& slots = inputs[2];
    if (!rows.flags().row_contiguous) {
      throw std::runtime_error("write_slots: rows must be row-contiguous");
    }
    out.copy_shared_buffer(cache);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(rows);
    encoder.set_input_array(slots);
    encoder.set_output_array(out);
    char* dst = out.data<char>();
    const char* src = rows.data<char>();
    const void* slot_data = slots.data<void>();
    bool wide = slots.itemsize() == 8;
    int64_t num_slots = static_cast<int64_t>(cache.shape(0)) * cache.shape(2);
    int64_t tokens = rows.shape(0), heads = rows.shape(1), block_size = cache.shape(2);
    size_t item = cache.itemsize();
    size_t row_bytes = rows.shape(2) * item;
    int64_t block_stride = cache.strides()[0] * item, head_stride = cache.strides()[1] * item,
            offset_stride = cache.strides()[2] * item;
    encoder.dispatch([=]() {
      for (int64_t t = 0; t < tokens; ++t) {
        int64_t slot = wide ? static_cast<const int64_t*>(slot_data)[t]
                            : static_cast<const int32_t*>(slot_data)[t];
        if (slot < 0) continue;  // padding token
        if (slot >= num_slots) {
          throw std::out_of_range("write_slots: slot " + std::to_string(slot) +
                                  " is outside the cache (" + std::to_string(num_slots) +
                                  " slots)");
        }
        char* base = dst + (slot / block_size) * block_stride + (slot % block_size) * offset_stride;
        const char* row = src + t * heads * row_bytes;
        for (int64_t h = 0; h < heads; ++h) {
          std::memcpy(base + h * head_stride, row + h * row_bytes, row_bytes);
        }
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    throw std::runtime_error("write_slots runs on MLX's CPU stream only");
  }

  const char* name() const override { return "SlotWrite"; }
};

mx::array write_slots(const mx::array& cache, mx::array rows, mx::array slots) {
  if (cache.ndim() != 4) {
    throw nb::value_error("write_slots: cache must be [num_blocks, heads, block_size, content]");
  }
  if (cache.strides()[3] != 1) {
    throw nb::value_error("write_slots: the cache's last axis must be contiguous");
  }
  if (rows.ndim() != 3 || rows.shape(1) != cache.shape(1) || rows.shape(2) != cache.shape(3)) {
    throw nb::value_error("write_slots: rows must be [tokens, heads, content] matching the cache");
  }
  if (slots.ndim() != 1 || slots.shape(0) != rows.shape(0) ||
      (slots.dtype() != mx::int32 && slots.dtype() != mx::int64)) {
    throw nb::value_error("write_slots: slots must be int32 or int64 [tokens]");
  }
  mx::Stream cpu = mx::default_stream(mx::Device::cpu);
  if (rows.dtype() != cache.dtype()) rows = mx::astype(rows, cache.dtype(), cpu);
  rows = mx::contiguous(rows, false, cpu);
  slots = mx::contiguous(slots, false, cpu);
  return mx::array(cache.shape(), cache.dtype(), std::make_shared<SlotWrite>(cpu),
                   {cache, rows, slots});
}

}  // namespace

void register_slot_write(nb::module_& m) {
  m.def("write_slots", &write_slots, nb::arg("cache"), nb::arg("rows"), nb::arg("slots"),
        "The cache with rows[t] written at slot slots[t] (slots < 0 skipped), in place, as a lazy "
        "MLX node: the result shares the cache's buffer; read the cache through it.");
}

}  // namespace torch_mlx
