// Crossing torch tensors between Python and C++, kept in its own translation unit so torch's
// pybind11-based headers never meet nanobind's.
#pragma once

#include <Python.h>
#include <ATen/Tensor.h>
#include <ATen/core/Generator.h>

namespace torch_mlx {

bool is_tensor(PyObject* obj);
const at::Tensor& unpack_tensor(PyObject* obj);  // requires is_tensor(obj)
PyObject* wrap_tensor(at::Tensor t);             // new reference
PyObject* wrap_default_generator(const at::Generator& gen);  // new reference

}  // namespace torch_mlx
