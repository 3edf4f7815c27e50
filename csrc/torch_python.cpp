#include "torch_python.h"

#include <torch/csrc/autograd/python_variable.h>

namespace torch_mlx {

bool is_tensor(PyObject* obj) {
  return THPVariable_Check(obj);
}

const at::Tensor& unpack_tensor(PyObject* obj) {
  return THPVariable_Unpack(obj);
}

PyObject* wrap_tensor(at::Tensor t) {
  return THPVariable_Wrap(std::move(t));
}

}  // namespace torch_mlx

#include <torch/csrc/Generator.h>

namespace torch_mlx {

PyObject* wrap_default_generator(const at::Generator& gen) {
  return THPGenerator_initDefaultGenerator(gen);
}

}  // namespace torch_mlx
