// c10 errors as the Python exceptions torch itself would raise (nanobind would make them all
// RuntimeError, with the C++ backtrace in the message).
#pragma once

#include <string>

#include <Python.h>
#include <c10/util/Exception.h>
#include <nanobind/nanobind.h>

namespace torch_mlx {

template <typename F>
auto translate(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::TypeError& e) {
    throw nanobind::type_error(e.what_without_backtrace());
  } catch (const c10::NotImplementedError& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    throw nanobind::python_error();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

}  // namespace torch_mlx
