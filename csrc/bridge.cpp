#include "bridge.h"

#include <algorithm>
#include <atomic>
#include <numeric>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <mlx/ops.h>
#include <mlx/transforms.h>

#include "launch.h"
#include "storage.h"

namespace mx = mlx::core;

namespace torch_mlx {

void check_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kDouble:
      TORCH_CHECK_TYPE(false,
                       "mlx does not support dtype torch.float64 (MLX's GPU has no 64-bit "
                       "floats); use torch.float32, e.g. tensor.float().to('mlx')");
    case c10::kComplexDouble:
      TORCH_CHECK_TYPE(false,
                       "mlx does not support dtype torch.complex128; use torch.complex64, "
                       "e.g. tensor.to(torch.complex64).to('mlx')");
    default:
      (void)to_mlx_dtype(dtype);
  }
}

mx::Dtype to_mlx_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat: return mx::float32;
    case c10::kHalf: return mx::float16;
    case c10::kBFloat16: return mx::bfloat16;
    case c10::kBool: return mx::bool_;
    case c10::kByte: return mx::uint8;
    case c10::kChar: return mx::int8;
    case c10::kShort: return mx::int16;
    case c10::kInt: return mx::int32;
    case c10::kLong: return mx::int64;
    case c10::kUInt16: return mx::uint16;
    case c10::kUInt32: return mx::uint32;
    case c10::kUInt64: return mx::uint64;
    case c10::kComplexFloat: return mx::complex64;
    case c10::kDouble:
    case c10::kComplexDouble:
      check_dtype(dtype);
    default:
      TORCH_CHECK_TYPE(false, "mlx does not support dtype ", c10::toString(dtype),
                       "; supported: float32, float16, bfloat16, complex64, bool, uint8, int8, "
                       "int16, int32, int64, uint16, uint32, uint64");
  }
}

c10::ScalarType to_torch_dtype(mx::Dtype dtype) {
  switch (dtype.val()) {
    case mx::Dtype::Val::float32: return c10::kFloat;
    case mx::Dtype::Val::float16: return c10::kHalf;
    case mx::Dtype::Val::bfloat16: return c10::kBFloat16;
    case mx::Dtype::Val::bool_: return c10::kBool;
    case mx::Dtype::Val::uint8: return c10::kByte;
    case mx::Dtype::Val::int8: return c10::kChar;
    case mx::Dtype::Val::int16: return c10::kShort;
    case mx::Dtype::Val::int32: return c10::kInt;
    case mx::Dtype::Val::int64: return c10::kLong;
    case mx::Dtype::Val::uint16: return c10::kUInt16;
    case mx::Dtype::Val::uint32: return c10::kUInt32;
    case mx::Dtype::Val::uint64: return c10::kUInt64;
    case mx::Dtype::Val::complex64: return c10::kComplexFloat;
    case mx::Dtype::Val::float64:
      TORCH_CHECK_TYPE(false,
                       "mlx: float64 arrays cannot become 'mlx' tensors; cast with "
                       "a.astype(mx.float32) first");
  }
  TORCH_CHECK_TYPE(false, "mlx: unknown MLX dtype");
}

namespace {

// MLX layout flags for a strided view (all strides non-negative, no zero-sized dims).
mx::array::Flags layout_flags(const mx::Shape& shape, const mx::Strides& strides,
                              size_t data_size) {
  mx::array::Flags flags{};
  int64_t expected = 1;
  bool row = true;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    if (shape[i] == 1) continue;
    row &= strides[i] == expected;
    expected *= shape[i];
  }
  expected = 1;
  bool col = true;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 1) continue;
    col &= strides[i] == expected;
    expected *= shape[i];
  }
  // contiguous: the non-broadcast dims form a dense permutation covering data_size elements.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] > 1 && strides[i] > 0) dims.emplace_back(strides[i], shape[i]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;
  bool dense = true;
  for (auto& [stride, size] : dims) {
    dense &= stride == span;
    span *= size;
  }
  flags.row_contiguous = row;
  flags.col_contiguous = col;
  flags.contiguous = dense && static_cast<size_t>(span) == data_size;
  return flags;
}

}  // namespace

mx::array tensor_to_array(const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "to_mlx: got an undefined tensor");
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1,
              "to_mlx expects a tensor on device 'mlx', got one on '", t.device(),
              "'; move it first with t.to('mlx')");
  mx::Dtype dtype = to_mlx_dtype(t.scalar_type());
  const int64_t itemsize = t.element_size();

  mx::Shape shape;
  mx::Strides strides;
  shape.reserve(t.dim());
  strides.reserve(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) <= std::numeric_limits<int32_t>::max(),
                "to_mlx: dimension ", d, " has size ", t.size(d), ", above MLX's int32 limit");
    TORCH_CHECK(t.stride(d) >= 0, "to_mlx: negative strides are not supported");
    shape.push_back(static_cast<int32_t>(t.size(d)));
    strides.push_back(t.stride(d));
  }

  const c10::Storage& storage = t.storage();
  StorageCtx& ctx = storage_ctx(storage);
  settle_write(ctx);
  ctx.exposed = true;
  // The array's deleter holds a reference to the torch storage: the bytes stay valid until both
  // the torch side and every array over them are gone.
  c10::intrusive_ptr<c10::StorageImpl> keep = c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(
      storage.unsafeGetStorageImpl());
  mx::allocator::Deleter deleter = [keep](mx::allocator::Buffer) mutable { keep.reset(); };

  size_t data_size = 0;
  if (t.numel() > 0) {
    data_size = 1;
    for (size_t i = 0; i < shape.size(); ++i) data_size += (shape[i] - 1) * strides[i];
  }
  mx::array out(std::move(shape), dtype, nullptr, {});
  auto flags = layout_flags(out.shape(), strides, data_size);
  int64_t byte_offset = ctx.byte_offset + t.storage_offset() * itemsize;
  out.set_data(mx::allocator::Data(ctx.buffer, std::move(deleter)), data_size,
               std::move(strides), flags, byte_offset);
  if (ctx.producer && !ctx.producer->is_available()) {
    // the GPU is still writing these bytes: MLX waits on the event where it must
    out.set_status(mx::array::Status::evaluated);
    out.attach_event(ctx.producer->event());
  } else {
    ctx.producer.reset();
    out.set_status(mx::array::Status::available);
  }
  return out;
}

at::Tensor array_to_tensor(mx::array arr, bool result) {
  auto scalar_type = to_torch_dtype(arr.dtype());
  run_first_use_hook();
  auto options = at::TensorOptions().dtype(scalar_type).device(c10::DeviceType::PrivateUse1, 0);
  std::vector<int64_t> sizes(arr.shape().begin(), arr.shape().end());
  // An empty result needs no computation, and is never evaluated: MLX's CUDA backend kills the
  // process launching some kernels over zero elements (exp, sigmoid, erfc of a (1, 0, 3) array:
  // SIGFPE / SIGSEGV on the H100).
  if (arr.size() == 0) return at::empty(sizes, options);
  bool running = launch(arr);
  const int64_t itemsize = arr.itemsize();
  bool torch_layout = arr.offset() % itemsize == 0;
  for (auto s : arr.strides()) torch_layout &= s >= 0;
  if (!torch_layout) {
    arr = mx::contiguous(arr);
    running = launch(arr);
  }
  std::vector<int64_t> strides(arr.strides().begin(), arr.strides().end());
  if (arr.buffer().ptr() == nullptr) {
    return at::empty(sizes, options);
  }
  // Storage spans the whole buffer from its start, so views keep their offset and strides.
  size_t nbytes = arr.buffer_size();
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                       data_ptr_for_array(arr, 0, /*hold=*/result), mlx_allocator(),
                       /*resizable=*/true);
  if (running) storage_ctx(storage).producer = arr;
  at::Tensor t = at::empty({0}, options);
  t.unsafeGetTensorImpl()->set_storage_keep_dtype(std::move(storage));
  t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, arr.offset() / itemsize);
  return t;
}

mx::array buffer_holder(const mx::array& arr) {
  mx::array holder({1}, mx::uint8, nullptr, {});
  // from the buffer's first byte, wherever arr starts in it
  holder.copy_shared_buffer(arr, {1}, {true, true, true}, 1, -static_cast<int64_t>(arr.offset()));
  holder.set_status(mx::array::Status::available);
  return holder;
}

void settle_write(StorageCtx& ctx) {
  if (!ctx.pending_write) return;
  mx::array result = *ctx.pending_write;
  if (!result.is_available()) {
    mx::eval(result);
    result.wait();
  }
  // scatter_in_place checked every condition of MLX's donation, and nothing else held the lent
  // array: a different buffer here means MLX changed its rule, and the storage's bytes are gone
  TORCH_CHECK(result.buffer().ptr() == ctx.buffer.ptr(),
              "torch_mlx internal error: an in-place write into an 'mlx' storage was done out "
              "of place (MLX did not donate the buffer); please report it with your MLX "
              "version");
  ctx.holder = buffer_holder(result);  // not `result`: it keeps its inputs, the lent array too
  ctx.pending_write.reset();
}

std::optional<mx::array> lend_buffer(const at::Tensor& t) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1,
              "lend_buffer expects an 'mlx' tensor, got one on ", t.device());
  StorageCtx& ctx = storage_ctx(t.storage());
  settle_write(ctx);
  // MLX's donation rule (mlx/backend/common/utils.h is_donatable, copy.h): the input is the
  // sole array over data its allocator owns, row-contiguous, of the result's item size, and its
  // buffer is at most 16 KiB bigger than the result. The holder must be donatable itself: no
  // other array (a previous write's result still referenced, from_mlx's) shares the data.
  // (A view that starts past the buffer's first byte is not lent: MLX's scatter output takes
  // the buffer, not the input's offset.)
  if (!ctx.holder || !ctx.holder->is_donatable() || !t.is_contiguous() || t.numel() < 2 ||
      ctx.byte_offset != 0 || t.storage_offset() != 0 ||
      mx::allocator::allocator().size(ctx.buffer) > static_cast<size_t>(t.nbytes()) + 16384) {
    return std::nullopt;
  }
  mx::Shape shape(t.sizes().begin(), t.sizes().end());
  mx::Strides strides(t.strides().begin(), t.strides().end());
  mx::array lent(std::move(shape), to_mlx_dtype(t.scalar_type()), nullptr, {});
  auto flags = layout_flags(lent.shape(), strides, t.numel());
  lent.copy_shared_buffer(*ctx.holder, strides, flags, t.numel(), 0);
  lent.set_status(mx::array::Status::available);
  ctx.holder.reset();  // `lent` is the buffer's sole owner now
  ctx.exposed = true;
  return lent;
}

void finish_lend(const at::Tensor& t, const mx::array& result) {
  StorageCtx& ctx = storage_ctx(t.storage());
  TORCH_CHECK(result.status() != mx::array::Status::unscheduled,
              "finish_lend: launch the write (mx.async_eval) before handing it back");
  // MLX allocated (or donated) the result's buffer when it launched it, on this thread
  TORCH_CHECK(result.buffer().ptr() == ctx.buffer.ptr(),
              "torch_mlx internal error: an in-place write into an 'mlx' storage inside a "
              "compiled graph was done out of place (MLX did not donate the lent buffer); "
              "please report it with your MLX version");
  ctx.pending_write = result;
}

std::optional<mx::array> scatter_in_place(const at::Tensor& t,
                                          const std::vector<mx::array>& indices,
                                          const mx::array& updates, const std::vector<int>& axes) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1,
              "scatter_in_place expects an 'mlx' tensor, got one on ", t.device());
  std::optional<mx::array> lent = lend_buffer(t);
  if (!lent) return std::nullopt;
  StorageCtx& ctx = storage_ctx(t.storage());
  try {
    mx::array result = mx::scatter(*lent, indices, updates, axes);
    lent.reset();  // `lent`, an input of `result` only, is the buffer's sole owner
    ctx.pending_write = result;
    return result;
  } catch (...) {
    ctx.holder = buffer_holder(*lent);  // a bad argument: the storage keeps its buffer
    throw;
  }
}

namespace {

// The storage's holder, taken out of the context to be lent, when it is the sole array over the
// buffer; empty (the storage unchanged) when another array holds it too. The storage's own
// previous write (or result) holds the buffer while it runs (MLX keeps it until its kernel
// completes): a chain of in-place ops on one tensor waits for that one array, not for every
// launch as a host write would.
std::optional<mx::array> take_buffer_owner(StorageCtx& ctx) {
  if (!ctx.holder) return std::nullopt;
  if (ctx.producer && !ctx.producer->is_available() && !ctx.holder->is_donatable() &&
      ctx.producer->buffer().ptr() == ctx.buffer.ptr()) {
    wait_for(*ctx.producer);
  }
  if (ctx.producer && ctx.producer->is_available()) {
    // a finished writer: its array (and the launch record's copy) no longer holds the buffer
    ctx.producer.reset();
    launches_done();
  }
  if (!ctx.holder->is_donatable()) return std::nullopt;
  std::optional<mx::array> owner = std::move(ctx.holder);
  ctx.holder.reset();
  return owner;
}

std::atomic<uint64_t> g_device_writes{0};

}  // namespace

uint64_t device_write_count(bool reset) {
  return reset ? g_device_writes.exchange(0) : g_device_writes.load();
}

bool write_in_place(const at::Tensor& dst, const mx::array& values) {
  if (dst.numel() == 0 || !dst.is_privateuseone() || !dst.is_contiguous() || dst.is_conj() ||
      dst.is_neg() || values.dtype() != to_mlx_dtype(dst.scalar_type())) {
    return false;
  }
  StorageCtx& ctx = storage_ctx(dst.storage());
  settle_write(ctx);
  if (!ctx.holder || ctx.byte_offset != 0) return false;
  // The lent array spans the whole buffer, so MLX's donation rule (sole owner, same item size,
  // buffer at most 16 KiB past the result) holds for any contiguous range of it. MLX copies a
  // one-element input as a scalar, never in place: a buffer of one element is lent as bytes.
  const int64_t itemsize = dst.element_size();
  const int64_t buffer_bytes = static_cast<int64_t>(mx::allocator::allocator().size(ctx.buffer));
  const bool as_bytes = buffer_bytes / itemsize < 2;
  const int64_t unit = as_bytes ? 1 : itemsize;
  const int64_t n = buffer_bytes / unit;
  const int64_t start = dst.storage_offset() * itemsize / unit;
  const int64_t count = dst.numel() * itemsize / unit;
  if (n < 2 || n > std::numeric_limits<int32_t>::max() || start + count > n) return false;
  mx::Shape shape(dst.sizes().begin(), dst.sizes().end());
  mx::array value = mx::reshape(mx::broadcast_to(values, shape), {-1});
  if (as_bytes) value = mx::view(value, mx::uint8);

  std::optional<mx::array> owner = take_buffer_owner(ctx);
  if (!owner) return false;
  std::optional<mx::Event> writer;  // the storage's own writer, if it still runs
  if (ctx.producer && !ctx.producer->is_available()) writer = ctx.producer->event();
  // The dynamic form of mx::slice_update: the static one returns the update itself (nothing
  // written into the buffer) when it covers the whole array
  mx::array result = [&] {
    mx::array lent({static_cast<int32_t>(n)}, as_bytes ? mx::uint8 : value.dtype(), nullptr, {});
    // a holder starts at the buffer's first byte (buffer_holder)
    lent.copy_shared_buffer(*owner, {1}, {true, true, true}, static_cast<size_t>(n), 0);
    owner.reset();
    ctx.producer.reset();  // `lent`, an input of the write only, owns the buffer alone now
    if (writer) {
      lent.set_status(mx::array::Status::evaluated);  // ordered after the writer
      lent.attach_event(*writer);
    } else {
      lent.set_status(mx::array::Status::available);
    }
    return mx::slice_update(lent, value, mx::array({static_cast<int32_t>(start)}), {0});
  }();
  ctx.exposed = true;
  // MLX allocates (and donates) as it launches, on this thread, then detaches the write from
  // its inputs: the buffer is the write's from here on
  bool running = launch(result);
  TORCH_CHECK(result.buffer().ptr() == ctx.buffer.ptr(),
              "torch_mlx internal error: an in-place copy into an 'mlx' storage was done out "
              "of place (MLX did not donate the buffer); please report it with your MLX "
              "version");
  ctx.holder = buffer_holder(result);
  if (running) ctx.producer = result;
  g_device_writes.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool adopt_storage(const at::Tensor& dst, const at::Tensor& src) {
  auto covers_its_storage = [](const at::Tensor& t) {
    return t.is_privateuseone() && t.is_contiguous() && t.storage_offset() == 0 &&
           !t.is_conj() && !t.is_neg() && t.storage().data() != nullptr &&
           static_cast<size_t>(t.nbytes()) == t.storage().nbytes();
  };
  if (!covers_its_storage(dst) || !covers_its_storage(src) ||
      dst.scalar_type() != src.scalar_type() || dst.nbytes() != src.nbytes() ||
      dst.storage().is_alias_of(src.storage())) {
    return false;
  }
  StorageCtx& to = storage_ctx(dst.storage());
  StorageCtx& from = storage_ctx(src.storage());
  if (to.owner || from.owner || to.pending_write || from.pending_write || !to.holder ||
      !from.holder ||
      to.byte_offset != 0 || from.byte_offset != 0) {
    return false;
  }
  auto* d = dst.storage().unsafeGetStorageImpl();
  auto* s = src.storage().unsafeGetStorageImpl();
  c10::DataPtr old = d->set_data_ptr(c10::DataPtr(nullptr, d->device()));
  d->set_data_ptr_noswap(s->set_data_ptr(std::move(old)));
  return true;
}

bool host_write_would_wait(const at::Tensor& dst, const at::Tensor* src) {
  auto running = [](const StorageCtx& ctx) {
    return ctx.pending_write || (ctx.producer && !ctx.producer->is_available());
  };
  const StorageCtx& ctx = storage_ctx(dst.storage());
  const bool src_running = src != nullptr && src->is_privateuseone() &&
                           running(storage_ctx(src->storage()));
  if (!running(ctx) && !src_running && !ctx.exposed) return false;  // a fresh storage
  // (async_launch() after that: a bad TORCH_MLX_ASYNC is reported by the first op's lowering)
  if (!async_launch()) return false;  // every result has finished before its op returned
  return running(ctx) || src_running || !launches_done();
}

at::Tensor cpu_alias(const at::Tensor& t, bool for_write) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1,
              "cpu_alias expects an 'mlx' tensor, got one on ", t.device());
  c10::Storage keep = t.storage();
  host_data(keep, for_write);  // waits for the GPU; the storage's address may move (launch.h)
  auto options = t.options().device(c10::kCPU);
  if (!t.storage().data()) {
    return at::empty_strided(t.sizes(), t.strides(), options);
  }
  return at::from_blob(
      t.data_ptr(), t.sizes(), t.strides(), [keep](void*) mutable { keep = c10::Storage(); },
      options);
}

}  // namespace torch_mlx
