// torch_mlx._C: the Python face of the C++ runtime. Built with nanobind in MLX's ABI domain so
// that mx.array arguments and results are mlx.core.array objects.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <mlx/array.h>
#include <mlx/memory.h>
#include <mlx/ops.h>

#include "launch.h"
#include "adapter.h"
#include "bridge.h"
#include "errors.h"
#include "fast_cpu.h"
#include "moe_cpu.h"
#include "polynomial_cpu.h"
#include "quantized_cpu.h"
#include "slot_write.h"
#include "storage.h"
#include "torch_python.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace torch_mlx {
namespace {

const at::Tensor& as_tensor(nb::handle h, const char* what) {
  if (!is_tensor(h.ptr())) {
    throw nb::type_error((std::string(what) + ": expected a torch.Tensor").c_str());
  }
  return unpack_tensor(h.ptr());
}

nb::object wrap(at::Tensor t) {
  return nb::steal(wrap_tensor(std::move(t)));
}

}  // namespace
}  // namespace torch_mlx

NB_MODULE(_C, m) {
  using namespace torch_mlx;
  // mx.array must be a registered type before it can cross this module's boundary.
  nb::module_::import_("mlx.core");
  register_adapter(m);
  register_slot_write(m);
  register_fast_cpu(m);
  register_moe_cpu(m);
  register_polynomial_cpu(m);
  register_quantized_cpu(m);

  m.def(
      "to_mlx",
      [](nb::handle t) { return translate([&] { return tensor_to_array(as_tensor(t, "to_mlx")); }); },
      nb::arg("tensor"),
      "An mx.array over the bytes of a tensor on 'mlx' (no copy; views keep offset and strides).");

  m.def(
      "from_mlx",
      [](mx::array a) {
        at::Tensor t;
        {
          nb::gil_scoped_release release;
          t = translate([&] { return array_to_tensor(std::move(a)); });
        }
        return wrap(std::move(t));
      },
      nb::arg("array"),
      "A tensor on 'mlx' over the bytes of an mx.array (evaluated first; no copy).");

  m.def(
      "scatter_in_place",
      [](nb::handle t, std::vector<mx::array> indices, mx::array updates,
         std::vector<int> axes) -> nb::object {
        auto result = translate([&] {
          return scatter_in_place(as_tensor(t, "scatter_in_place"), indices, updates, axes);
        });
        if (!result) return nb::none();
        return nb::cast(std::move(*result));
      },
      nb::arg("tensor"), nb::arg("indices"), nb::arg("updates"), nb::arg("axes"),
      "mx.scatter(tensor, indices, updates, axes) done in the tensor's own buffer, lazily: the "
      "result shares the buffer (read the new contents through it). None when the tensor "
      "cannot lend its buffer (not contiguous, shared, or not from the allocator).");

  m.def(
      "scatter",
      [](const mx::array& a, std::vector<mx::array> indices, const mx::array& updates,
         std::vector<int> axes) {
        return translate([&] { return mx::scatter(a, indices, updates, axes); });
      },
      nb::arg("a"), nb::arg("indices"), nb::arg("updates"), nb::arg("axes"),
      "MLX's scatter (mlx::core::scatter, which MLX's Python API lacks): one index array per "
      "axis in `axes`, `updates` of shape index shape + a's shape with those axes of size 1. "
      "Its input is `a` itself, so MLX computes it in a's buffer where it may donate it.");

  m.def(
      "lend_buffer",
      [](nb::handle t) -> nb::object {
        auto lent = translate([&] { return lend_buffer(as_tensor(t, "lend_buffer")); });
        if (!lent) return nb::none();
        return nb::cast(std::move(*lent));
      },
      nb::arg("tensor"),
      "An mx.array over the tensor's whole buffer, its sole owner (the storage holds nothing "
      "until finish_lend): the input of one op MLX computes in place. Drop every other "
      "reference to it before evaluating. None when the storage cannot lend its buffer.");

  m.def(
      "finish_lend",
      [](nb::handle t, const mx::array& result) {
        translate([&] { finish_lend(as_tensor(t, "finish_lend"), result); });
      },
      nb::arg("tensor"), nb::arg("result"),
      "Give a lend_buffer loan back: `result`, launched, is the op computed in the lent buffer.");

  m.def(
      "graph_inputs",
      [](nb::sequence inputs, nb::handle lend, nb::handle cpu_scalar) {
        // MlxGraph.forward's inputs, one call for all (a decode graph has ~200: parameters,
        // cache tensors, positions; converting each through Python cost ~4.6 us)
        nb::list arrays, loans;
        std::vector<uintptr_t> buffers;
        size_t i = 0;
        for (nb::handle item : inputs) {
          PyObject* obj = item.ptr();
          if (!is_tensor(obj)) {
            arrays.append(item);
          } else {
            const at::Tensor& t = unpack_tensor(obj);
            if (t.device().type() == c10::DeviceType::CPU && t.dim() == 0) {
              arrays.append(cpu_scalar(item));  // combines with "mlx" tensors as in eager torch
            } else if (t.device().type() != c10::DeviceType::PrivateUse1) {
              throw nb::builtin_exception(
                  nb::exception_type::runtime_error,
                  ("torch_mlx.compile: graph input on " + t.device().str() +
                   "; the mlx backend runs graphs whose tensors are on 'mlx'").c_str());
            } else {
              std::optional<mx::array> lent;
              translate([&] {
                if (t.numel()) {
                  buffers.push_back(
                      reinterpret_cast<uintptr_t>(storage_ctx(t.storage()).buffer.ptr()));
                  if (PySequence_Contains(lend.ptr(), nb::int_(i).ptr()) == 1) lent = lend_buffer(t);
                }
              });
              if (lent) {
                loans.append(nb::int_(i));
                arrays.append(nb::cast(std::move(*lent)));
              } else {
                arrays.append(nb::cast(translate([&] { return tensor_to_array(t); })));
              }
            }
          }
          ++i;
        }
        return nb::make_tuple(arrays, nb::cast(buffers), loans);
      },
      nb::arg("inputs"), nb::arg("lend"), nb::arg("cpu_scalar"),
      "A compiled graph's inputs as MLX values: (values, buffer addresses of the 'mlx' inputs, "
      "indices lent). A tensor on 'mlx' becomes an mx.array over its bytes, or, where its index "
      "is in `lend` and its storage can lend (lend_buffer), the loan; a CPU 0-d tensor becomes "
      "cpu_scalar(tensor); anything else that is not a tensor is passed as it is.");

  m.def(
      "adopt_storage",
      [](nb::handle dst, nb::handle src) {
        return translate([&] {
          return adopt_storage(as_tensor(dst, "adopt_storage"), as_tensor(src, "adopt_storage"));
        });
      },
      nb::arg("dst"), nb::arg("src"),
      "dst.copy_(src) for a fresh src as a rebinding: dst's storage takes src's buffer "
      "(csrc/bridge.h adopt_storage). False, nothing changed, where it does not apply.");

  m.def(
      "cpu_alias",
      [](nb::handle t, bool writes) {
        return wrap(translate([&] { return cpu_alias(as_tensor(t, "cpu_alias"), writes); }));
      },
      nb::arg("tensor"), nb::arg("writes") = true,
      "A CPU tensor over the same bytes as an 'mlx' tensor. writes=False: the caller only reads "
      "it, so kernels still running that only read the bytes are not waited for (the tensor's "
      "own writer is).");

  m.def(
      "buffer_address",
      [](nb::handle obj) -> uintptr_t {
        if (is_tensor(obj.ptr())) {
          const at::Tensor& t = unpack_tensor(obj.ptr());
          return translate([&] {
            return reinterpret_cast<uintptr_t>(storage_ctx(t.storage()).buffer.ptr());
          });
        }
        return reinterpret_cast<uintptr_t>(nb::cast<const mx::array&>(obj).buffer().ptr());
      },
      nb::arg("obj"),
      "Identity of the MLX buffer behind a tensor on 'mlx' or an mx.array (for sharing checks).");

  m.def("default_generator", []() {
    const auto& gen = at::detail::getPrivateUse1Hooks().getDefaultGenerator(0);
    return nb::steal(wrap_default_generator(gen));
  });

  m.def(
      "_set_first_use_hook",
      [](uintptr_t fn, int arg) { set_first_use_hook(reinterpret_cast<void (*)(int)>(fn), arg); },
      "Call the C function at address `fn` with `arg` once, at the device's first real use.");
  m.def("_set_tf32_follows_torch", &set_tf32_follows_torch,
        "At the device's first use, set MLX_ENABLE_TF32 from torch's float32 matmul precision.");

#if defined(__SANITIZE_ADDRESS__)
  // Only in a sanitizer build (setup.py's TORCH_MLX_SANITIZE): one deliberate error of the kind
  // named, so tools/sanitize.sh can show that its reports reach it before it trusts "no report".
  m.def("_sanitizer_probe", [](const std::string& kind) {
    if (kind == "undefined") {
      volatile int one = 1, shift = 40;
      return one << shift;  // shift exponent out of range: a UBSan report, execution goes on
    }
    char* bytes = new char[8];
    char* volatile p = bytes;  // (UBSan's object-size check cannot see through it; ASan can)
    p[8] = 1;                  // heap-buffer-overflow: an ASan report, the process stops
    delete[] bytes;
    return 0;
  });
#endif

  m.def(
      "host_wait_stats",
      [](bool reset) {
        HostWaitStats s = host_wait_stats(reset);
        return nb::make_tuple(s.evals, s.eval_seconds, s.waits, s.wait_seconds);
      },
      nb::arg("reset") = false,
      "(eager evaluations, their seconds, host waits for launched work, their seconds) since "
      "the last reset: host time that is the host waiting for MLX.");

  m.def("device_write_count", &device_write_count, nb::arg("reset") = false,
        "How many copy_ / fill_ writes into 'mlx' storages were made on the device, in place, "
        "since the last reset (where a host write would have waited for MLX).");

  m.def("synchronize", &synchronize_all,
        "Wait for every result launched without waiting (TORCH_MLX_ASYNC), on any thread's "
        "streams, then for MLX's default stream: what torch.mlx.synchronize() and "
        "torch.accelerator.synchronize() do.");

  m.def("async_launch", &async_launch,
        "Whether eager results and compiled forwards are launched without waiting for them "
        "(TORCH_MLX_ASYNC: 1, 0, or auto = where MLX has a GPU).");

  // Where the array's first byte is, as torch's data_ptr() of a storage made from it says:
  // array::data() would move an MLX CUDA buffer to managed memory first (Buffer::raw_ptr), so the
  // address is read the way storages read it (launch.cpp's buffer_address).
  m.def("array_data_address", [](const mx::array& a) {
    return reinterpret_cast<uintptr_t>(static_cast<char*>(buffer_address(a.buffer())) +
                                       a.offset());
  });
}
