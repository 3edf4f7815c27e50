// Native memory ops of device "mlx": allocation, views, resize, set_, copies and fills.
//
// Views reuse ATen's device-generic implementations. Copies and fills run on CPU aliases of the
// same bytes: memory is unified, every eager MLX op has completed when it returns, and this keeps
// a write into part of a large buffer at O(bytes written).
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/copy_native.h>
#include <ATen/ops/fill_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <ATen/ops/zero_native.h>
#include <torch/library.h>

#include <mlx/allocator.h>
#include <mlx/ops.h>

#include "bridge.h"
#include "storage.h"

namespace mx = mlx::core;

namespace torch_mlx {
namespace {

constexpr c10::DispatchKeySet kMlxKeys(c10::DispatchKey::PrivateUse1);

void check_options(std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                   std::optional<bool> pin_memory) {
  TORCH_CHECK(c10::layout_or_default(layout) == c10::Layout::Strided,
              "mlx supports only strided tensors");
  auto dev = c10::device_or_default(device);
  TORCH_CHECK(dev.type() == c10::DeviceType::PrivateUse1 && (!dev.has_index() || dev.index() == 0),
              "mlx has a single device, mlx:0; got ", dev);
}

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> layout,
                               std::optional<c10::Device> device, std::optional<bool> pin_memory,
                               std::optional<c10::MemoryFormat> memory_format) {
  check_options(layout, device, pin_memory);
  auto st = c10::dtype_or_default(dtype);
  check_dtype(st);
  return at::detail::empty_generic(size, mlx_allocator(), kMlxKeys, st, memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride,
                         std::optional<c10::ScalarType> dtype, std::optional<c10::Layout> layout,
                         std::optional<c10::Device> device, std::optional<bool> pin_memory) {
  check_options(layout, device, pin_memory);
  auto st = c10::dtype_or_default(dtype);
  check_dtype(st);
  return at::detail::empty_strided_generic(size, stride, mlx_allocator(), kMlxKeys, st);
}

at::Tensor as_strided(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride,
                      std::optional<int64_t> storage_offset) {
  return at::native::as_strided_tensorimpl(self, size, stride, storage_offset);
}

at::Tensor view(const at::Tensor& self, c10::IntArrayRef size) {
  return at::native::view(self, size);
}

at::Tensor reshape_alias(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride) {
  return at::native::_reshape_alias(self, size, stride);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<c10::MemoryFormat> memory_format) {
  // ATen's CPU resize grows the storage through the storage's own allocator (ours).
  return at::native::resize_(self, size, memory_format);
}

at::Tensor& set_empty(at::Tensor& self) {
  c10::Storage storage(c10::Storage::use_byte_size_t(), 0, mlx_allocator(), true);
  return self.set_(storage, 0, {0}, {});
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source) {
  return at::native::set_(self, source);
}

at::Tensor& set_storage_offset(at::Tensor& self, c10::Storage source, int64_t storage_offset,
                               c10::IntArrayRef size, c10::IntArrayRef stride) {
  return at::native::set_storage_cpu_(self, source, storage_offset, size, stride);
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  return at::native::set_tensor_(self, source);
}

// A CPU alias of an "mlx" tensor with the same conjugate and negative view bits, so that the
// CPU copy resolves them (it conjugates / negates while copying, as CUDA's copy kernel does).
at::Tensor cpu_alias_with_math_bits(const at::Tensor& t) {
  at::Tensor alias = cpu_alias(t);
  if (t.is_conj()) alias._set_conj(true);
  if (t.is_neg()) alias._set_neg(true);
  return alias;
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  if (dst.numel() == 0) return dst;
  // Between two "mlx" tensors of one dtype, where a host copy would wait for the GPU: on the
  // device, in dst's own buffer (write_in_place), if it can be lent
  if (self.is_privateuseone() && dst.is_privateuseone() &&
      self.scalar_type() == dst.scalar_type() && !self.is_conj() && !self.is_neg() &&
      !self.storage().is_alias_of(dst.storage()) && host_write_would_wait(dst, &self) &&
      write_in_place(dst, tensor_to_array(self))) {
    return dst;
  }
  // "mlx" memory is host memory (unified, or CUDA managed memory under MLX's CUDA backend):
  // copies to and from another device (torch's CUDA, say) go through the host.
  at::Tensor src = self.is_privateuseone() ? cpu_alias_with_math_bits(self)
                   : self.is_cpu()         ? self
                                           : self.to(c10::kCPU);
  if (dst.is_privateuseone()) {
    at::Tensor dst_cpu = cpu_alias_with_math_bits(dst);
    dst_cpu.copy_(src);
  } else if (dst.is_cpu()) {
    const_cast<at::Tensor&>(dst).copy_(src, non_blocking);
  } else {
    // Another device's copy kernel sees the alias's pointer as its own memory when it is CUDA
    // managed memory (MLX's CUDA backend) and refuses a CPU tensor over it: stage the bytes in
    // ordinary host memory first.
    const_cast<at::Tensor&>(dst).copy_(src.is_cpu() ? src.clone() : src);
  }
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  at::native::resize_(dst, self.sizes(), std::nullopt);
  return copy_from(self, dst, false);
}

c10::Scalar local_scalar_dense(const at::Tensor& self) {
  return at::native::_local_scalar_dense_cpu(cpu_alias(self));
}

at::Tensor& fill_scalar(at::Tensor& self, const c10::Scalar& value) {
  if (self.numel() == 0) return self;
  if (!self.is_complex() && host_write_would_wait(self, nullptr)) {
    // the value converted (and range-checked) by torch's CPU fill, then written on the device
    at::Tensor host = at::empty({}, self.options().device(c10::kCPU)).fill_(value);
    mx::allocator::Data data = mx::allocator::malloc(host.element_size());
    std::memcpy(data.buffer().raw_ptr(), host.data_ptr(), host.element_size());
    if (write_in_place(self, mx::array(std::move(data), {}, to_mlx_dtype(self.scalar_type())))) {
      return self;
    }
  }
  cpu_alias(self).fill_(value);
  return self;
}

at::Tensor& fill_tensor(at::Tensor& self, const at::Tensor& value) {
  TORCH_CHECK(value.dim() == 0,
              "fill_ only supports 0-dimension value tensor but got tensor with ", value.dim(),
              " dimensions.");
  return fill_scalar(self, value.item());
}

// Zero is all-bits-zero for every dtype "mlx" has. A large contiguous zero_ (torch.zeros of a
// KV cache) is done by pages, committing no memory for pages not yet touched (zero_by_pages).
at::Tensor& zero_(at::Tensor& self) {
  if (self.numel() > 0 && self.is_contiguous() && !self.is_conj() && !self.is_neg() &&
      zero_by_pages(self.storage(), self.data_ptr(), self.numel() * self.element_size())) {
    return self;
  }
  return fill_scalar(self, 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("view", view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("resize_", resize_);
  m.impl("set_", set_empty);
  m.impl("set_.source_Storage", set_storage);
  m.impl("set_.source_Storage_storage_offset", set_storage_offset);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("_local_scalar_dense", local_scalar_dense);
  m.impl("fill_.Scalar", fill_scalar);
  m.impl("fill_.Tensor", fill_tensor);
  m.impl("zero_", zero_);
}

// Copies of conjugate / negative views. copy_ reaches _copy_from for every device ATen's copy
// does not handle itself (PrivateUse1 included), and _copy_from is not among the ops the
// Conjugate and Negative fallbacks let through: the fallback would materialise the view with
// clone(), whose copy_ reaches _copy_from with the same view again, recursing until the stack
// overflows (a segfault: x.conj().clone(), torch.fft.hfft). copy_from above resolves the bits on
// its CPU aliases instead, so these ops fall through to it. Devices whose copies never reach
// _copy_from (CPU, CUDA, MPS, ...) are unaffected.
TORCH_LIBRARY_IMPL(aten, Conjugate, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
  m.impl("_copy_from_and_resize", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, Negative, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
  m.impl("_copy_from_and_resize", torch::CppFunction::makeFallthrough());
}

}  // namespace torch_mlx
