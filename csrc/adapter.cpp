// The per-call steps of torch_mlx.ops.registry's kernel adapter: the meta-cache key, the
// conversion of arguments to MLX and of the result back. They run for every eager op, and in
// Python they cost about as much as a small MLX op itself. Anything the argument walkers do not
// recognise is handed to a Python fallback, which stays the one definition of the rules.
#include "adapter.h"

#include <optional>
#include <string>

#include <ATen/MemoryOverlap.h>
#include <ATen/ScalarOps.h>
#include <mlx/ops.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "bridge.h"
#include "errors.h"
#include "storage.h"
#include "torch_python.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace torch_mlx {
namespace {

nb::object int_tuple(c10::IntArrayRef values) {
  PyObject* tup = PyTuple_New(static_cast<Py_ssize_t>(values.size()));
  if (tup == nullptr) throw nb::python_error();
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* v = PyLong_FromLongLong(values[i]);
    if (v == nullptr) {
      Py_DECREF(tup);
      throw nb::python_error();
    }
    PyTuple_SET_ITEM(tup, static_cast<Py_ssize_t>(i), v);
  }
  return nb::steal(tup);
}

bool is_plain_scalar(PyObject* obj) {
  return PyBool_Check(obj) || PyLong_CheckExact(obj) || PyFloat_CheckExact(obj) ||
         PyComplex_CheckExact(obj) || PyUnicode_CheckExact(obj);
}

// The key of one argument; sets `unhashable` (and returns None) for a value with no key.
nb::object key_of(nb::handle obj, nb::handle fallback, nb::handle unhashable_marker,
                  bool& unhashable) {
  PyObject* p = obj.ptr();
  if (is_tensor(p)) {
    const at::Tensor& t = unpack_tensor(p);
    return nb::make_tuple(static_cast<int>(t.scalar_type()), int_tuple(t.sizes()),
                          int_tuple(t.strides()), static_cast<int>(t.device().type()));
  }
  if (p == Py_None) return nb::none();
  // The type is part of the key: 1, 1.0 and True are equal and hash alike in Python.
  if (is_plain_scalar(p)) {
    return nb::make_tuple(nb::handle(reinterpret_cast<PyObject*>(Py_TYPE(p))), obj);
  }
  if (PyTuple_Check(p) || PyList_Check(p)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(p);
    PyObject** items = PySequence_Fast_ITEMS(p);
    nb::object tup = nb::steal(PyTuple_New(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      nb::object k = key_of(items[i], fallback, unhashable_marker, unhashable);
      if (unhashable) return nb::none();
      PyTuple_SET_ITEM(tup.ptr(), i, k.release().ptr());
    }
    return tup;
  }
  nb::object k = fallback(obj);
  if (k.is(unhashable_marker)) unhashable = true;
  return k;
}

bool aliases(const at::Tensor& t, const nb::list& buffers) {
  if (t.numel() == 0 || buffers.size() == 0) return false;
  const auto address = reinterpret_cast<uintptr_t>(storage_ctx(t.storage()).buffer.ptr());
  for (nb::handle b : buffers) {
    if (nb::cast<uintptr_t>(b) == address) return true;
  }
  return false;
}

void check_shape(const mx::array& result, nb::handle shape, const char* op_name) {
  const Py_ssize_t ndim = PyTuple_GET_SIZE(shape.ptr());
  bool same_shape = ndim == static_cast<Py_ssize_t>(result.ndim());
  for (Py_ssize_t d = 0; same_shape && d < ndim; ++d) {
    same_shape = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), d)) == result.shape(d);
  }
  if (same_shape) return;
  nb::list got;
  for (auto size : result.shape()) got.append(size);
  nb::object got_shape = nb::steal(PySequence_Tuple(got.ptr()));
  PyErr_Format(PyExc_AssertionError,
               "torch_mlx: the lowering of aten::%s returned shape %S, torch expects %S "
               "(a bug in the lowering)",
               op_name, got_shape.ptr(), shape.ptr());
  throw nb::python_error();
}

// torch's meta kernel gives a result's strides; MLX picks its own. They agree wherever a
// dimension has more than one element, except after ops whose layout MLX chooses differently
// (left as MLX made them). On a size-1 dimension the stride addresses nothing, but torch's
// choice is visible: dynamo guards on it (a clone(memory_format=contiguous_format) that kept
// an input's stride there recompiled transformers' generate graph every step), and so do
// OpInfo's stride checks. So size-1 strides follow torch's.
void adopt_size_one_strides(at::Tensor& t, nb::handle strides) {
  const Py_ssize_t ndim = PyTuple_GET_SIZE(strides.ptr());
  if (ndim != t.dim()) return;
  std::vector<int64_t> torch_strides(ndim);
  bool differ = false;
  for (Py_ssize_t d = 0; d < ndim; ++d) {
    torch_strides[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), d));
    if (torch_strides[d] == t.stride(d)) continue;
    if (t.size(d) != 1) return;
    differ = true;
  }
  if (differ) {
    t.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), torch_strides, t.storage_offset());
  }
}

// One argument as a lowering sees it.
nb::object to_lowering_arg(nb::handle obj, nb::list& buffers, nb::handle fallback) {
  PyObject* p = obj.ptr();
  if (is_tensor(p)) {
    const at::Tensor& t = unpack_tensor(p);
    if (t.device().type() != c10::DeviceType::PrivateUse1) return fallback(obj, buffers);
    return translate([&] {
      buffers.append(reinterpret_cast<uintptr_t>(storage_ctx(t.storage()).buffer.ptr()));
      return nb::cast(tensor_to_array(t));
    });
  }
  if (p == Py_None || is_plain_scalar(p)) return nb::borrow(obj);
  if (PyTuple_Check(p) || PyList_Check(p)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(p);
    PyObject** items = PySequence_Fast_ITEMS(p);
    nb::list out;
    for (Py_ssize_t i = 0; i < n; ++i) out.append(to_lowering_arg(items[i], buffers, fallback));
    if (PyList_CheckExact(p)) return std::move(out);
    if (PyTuple_CheckExact(p)) return nb::steal(PySequence_Tuple(out.ptr()));
    return nb::borrow(reinterpret_cast<PyObject*>(Py_TYPE(p)))(out);  // e.g. torch.Size
  }
  return fallback(obj, buffers);
}

}  // namespace

void register_adapter(nb::module_& m) {
  m.def(
      "meta_key",
      [](nb::handle args, nb::dict kwargs, nb::handle fallback, nb::handle unhashable_marker)
          -> nb::object {
        bool unhashable = false;
        nb::object args_key = key_of(args, fallback, unhashable_marker, unhashable);
        if (unhashable) return nb::none();
        nb::list items;
        for (auto [name, value] : kwargs) {
          nb::object k = key_of(value, fallback, unhashable_marker, unhashable);
          if (unhashable) return nb::none();
          items.append(nb::make_tuple(name, k));
        }
        return nb::make_tuple(args_key, nb::steal(PySequence_Tuple(items.ptr())));
      },
      nb::arg("args"), nb::arg("kwargs"), nb::arg("fallback"), nb::arg("unhashable"),
      "The meta-cache key of a call's arguments: (dtype, sizes, strides, device) for tensors, "
      "(type, value) for plain scalars, fallback(x) for anything else; None if unhashable.");

  m.def(
      "lowering_args",
      [](nb::handle args, nb::list buffers, nb::handle fallback) {
        return to_lowering_arg(args, buffers, fallback);
      },
      nb::arg("args"), nb::arg("buffers"), nb::arg("fallback"),
      "args with every 'mlx' tensor replaced by an mx.array over its bytes (its buffer's address "
      "appended to buffers); fallback(x, buffers) converts anything else but plain values.");

  m.def(
      "wrapped_number",
      [](nb::handle value) {
        PyObject* p = value.ptr();
        c10::Scalar scalar;
        if (PyBool_Check(p)) {
          scalar = c10::Scalar(p == Py_True);
        } else if (PyLong_Check(p)) {
          const long long v = PyLong_AsLongLong(p);
          if (v == -1 && PyErr_Occurred()) throw nb::python_error();
          scalar = c10::Scalar(static_cast<int64_t>(v));
        } else if (PyFloat_Check(p)) {
          scalar = c10::Scalar(PyFloat_AS_DOUBLE(p));
        } else if (PyComplex_Check(p)) {
          scalar = c10::Scalar(
              c10::complex<double>(PyComplex_RealAsDouble(p), PyComplex_ImagAsDouble(p)));
        } else {
          throw nb::type_error("wrapped_number: expected a bool, int, float or complex");
        }
        at::Tensor t = at::scalar_to_tensor(scalar);
        t.unsafeGetTensorImpl()->set_wrapped_number(true);
        return nb::steal(wrap_tensor(std::move(t)));
      },
      nb::arg("value"),
      "A Python number as torch's dispatcher passes it in a Tensor argument: a 0-d CPU tensor "
      "(bool, int64, float64 or complex128) marked as a wrapped number, which type promotion "
      "treats as a Python scalar and which reaches Python kernels as the number again.");

  m.def(
      "cast_arrays",
      [](nb::list args, mx::Dtype dtype) {
        for (size_t i = 0; i < args.size(); ++i) {
          nb::handle a = args[i];
          if (nb::isinstance<mx::array>(a)) {
            const auto& arr = nb::cast<const mx::array&>(a);
            if (arr.dtype() != dtype) args[i] = nb::cast(mx::astype(arr, dtype));
          }
        }
        return args;
      },
      nb::arg("args"), nb::arg("dtype"),
      "Casts, in place, the mx.array items of a list that are not of dtype (lazily).");

  m.def(
      "wrap_result",
      [](mx::array result, nb::handle shape, std::optional<mx::Dtype> dtype, nb::list buffers,
         const char* op_name, nb::handle strides) {
        if (!shape.is_none()) check_shape(result, shape, op_name);
        if (dtype && result.dtype() != *dtype) result = mx::astype(result, *dtype);
        at::Tensor t;
        {
          nb::gil_scoped_release release;
          t = translate([&] { return array_to_tensor(std::move(result), /*result=*/true); });
        }
        // A functional op must return fresh storage, not an input's buffer, and no element
        // twice: MLX gives an elementwise op on a broadcast input the input's stride-0 layout
        // (torch's result is dense, and an in-place op on it would raise torch's overlap error).
        if (aliases(t, buffers) || at::has_internal_overlap(t) == at::MemOverlap::Yes) {
          t = translate([&] { return t.clone(at::MemoryFormat::Contiguous); });
        }
        if (!strides.is_none()) adopt_size_one_strides(t, strides);
        return nb::steal(wrap_tensor(std::move(t)));
      },
      nb::arg("result"), nb::arg("shape").none(), nb::arg("dtype").none(), nb::arg("buffers"),
      nb::arg("op_name"), nb::arg("strides").none() = nb::none(),
      "An mx.array result as an 'mlx' tensor, checked against torch's shape and cast to its "
      "dtype (each when given); a dense copy when it is the buffer of one of the inputs or has "
      "stride-0 (overlapping) dimensions. strides (torch's, from its meta kernel) are taken "
      "where they differ from MLX's only on dimensions of size 1.");
}

}  // namespace torch_mlx
