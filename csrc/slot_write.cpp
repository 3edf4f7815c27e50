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

// cache: [num_blocks, heads, block_size, Dk + Dv] (any strides, content contiguous);
// key [tokens, heads, Dk] and value [tokens, heads, Dv] of the cache's dtype, any strides (slices
// of a fused qkv projection are written without a copy first); slots: [tokens] integers, slot < 0
// skipped. Slot s is block s / block_size, offset s % block_size.
class SlotWrite : public mx::UnaryPrimitive {
 public:
  explicit SlotWrite(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& cache = inputs[0];
    const mx::array& key = inputs[1];
    const mx::array& value = inputs[2];
    const mx::array& slots = inputs[3];
    out.copy_shared_buffer(cache);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) encoder.set_input_array(in);
    encoder.set_output_array(out);
    struct Part {
      const char* data;
      int64_t token_stride, head_stride, item_stride, width, offset;  // strides in bytes
    };
    size_t item = cache.itemsize();
    auto part = [&](const mx::array& a, int64_t offset) {
      return Part{a.data<char>(), a.strides()[0] * static_cast<int64_t>(item),
                  a.strides()[1] * static_cast<int64_t>(item),
                  a.strides()[2] * static_cast<int64_t>(item), a.shape(2), offset};
    };
    Part parts[2] = {part(key, 0), part(value, key.shape(2))};
    char* dst = out.data<char>();
    const char* slot_data = slots.data<char>();
    int64_t slot_stride = slots.strides()[0] * slots.itemsize();
    bool wide = slots.itemsize() == 8;
    int64_t num_slots = static_cast<int64_t>(cache.shape(0)) * cache.shape(2);
    int64_t tokens = key.shape(0), heads = key.shape(1), block_size = cache.shape(2);
    int64_t block_stride = cache.strides()[0] * item, head_stride = cache.strides()[1] * item,
            offset_stride = cache.strides()[2] * item;
    encoder.dispatch([=]() {
      for (int64_t t = 0; t < tokens; ++t) {
        const char* at = slot_data + t * slot_stride;
        int64_t slot = wide ? *reinterpret_cast<const int64_t*>(at)
                            : *reinterpret_cast<const int32_t*>(at);
        if (slot < 0) continue;  // padding token
        if (slot >= num_slots) {
          throw std::out_of_range("write_slots: slot " + std::to_string(slot) +
                                  " is outside the cache (" + std::to_string(num_slots) +
                                  " slots)");
        }
        char* base = dst + (slot / block_size) * block_stride + (slot % block_size) * offset_stride;
        for (const Part& p : parts) {
          for (int64_t h = 0; h < heads; ++h) {
            char* to = base + h * head_stride + p.offset * item;
            const char* from = p.data + t * p.token_stride + h * p.head_stride;
            if (p.item_stride == static_cast<int64_t>(item)) {
              std::memcpy(to, from, p.width * item);
            } else {
              for (int64_t i = 0; i < p.width; ++i) {
                std::memcpy(to + i * item, from + i * p.item_stride, item);
              }
            }
          }
        }
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    throw std::runtime_error("write_slots runs on MLX's CPU stream only");
  }

  const char* name() const override { return "SlotWrite"; }
};

mx::array write_slots(const mx::array& cache, mx::array key, mx::array value,
                      const mx::array& slots) {
  if (cache.ndim() != 4) {
    throw nb::value_error("write_slots: cache must be [num_blocks, heads, block_size, content]");
  }
  if (cache.strides()[3] != 1) {
    throw nb::value_error("write_slots: the cache's last axis must be contiguous");
  }
  if (key.ndim() != 3 || value.ndim() != 3 || key.shape(0) != value.shape(0) ||
      key.shape(1) != cache.shape(1) || value.shape(1) != cache.shape(1) ||
      key.shape(2) + value.shape(2) != cache.shape(3)) {
    throw nb::value_error("write_slots: key [tokens, heads, Dk] and value [tokens, heads, Dv] "
                          "must match the cache's heads and Dk + Dv");
  }
  if (slots.ndim() != 1 || slots.shape(0) != key.shape(0) ||
      (slots.dtype() != mx::int32 && slots.dtype() != mx::int64)) {
    throw nb::value_error("write_slots: slots must be int32 or int64 [tokens]");
  }
  mx::Stream cpu = mx::default_stream(mx::Device::cpu);
  if (key.dtype() != cache.dtype()) key = mx::astype(key, cache.dtype(), cpu);
  if (value.dtype() != cache.dtype()) value = mx::astype(value, cache.dtype(), cpu);
  return mx::array(cache.shape(), cache.dtype(), std::make_shared<SlotWrite>(cpu),
                   {cache, key, value, slots});
}

}  // namespace

void register_slot_write(nb::module_& m) {
  m.def("write_slots", &write_slots, nb::arg("cache"), nb::arg("key"), nb::arg("value"),
        nb::arg("slots"),
        "The cache with key[t] and value[t] side by side at slot slots[t] (slots < 0 skipped), "
        "in place, as a lazy MLX node: the result shares the cache's buffer; read the cache "
        "through it.");
}

}  // namespace torch_mlx
