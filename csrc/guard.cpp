// Device guard for "mlx": one device (index 0) and one in-order stream, MLX's default stream.
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <mlx/transforms.h>

namespace torch_mlx {
namespace {

using c10::Device;
using c10::DeviceType;
using c10::Stream;

void check_index(const Device& d) {
  TORCH_CHECK(d.type() == DeviceType::PrivateUse1, "mlx guard got device ", d);
  TORCH_CHECK(!d.has_index() || d.index() == 0, "mlx has a single device, mlx:0; got ", d);
}

struct MlxGuardImpl final : public c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override {
    return DeviceType::PrivateUse1;
  }
  Device exchangeDevice(Device d) const override {
    check_index(d);
    return Device(DeviceType::PrivateUse1, 0);
  }
  Device getDevice() const override {
    return Device(DeviceType::PrivateUse1, 0);
  }
  void setDevice(Device d) const override {
    check_index(d);
  }
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device d) const override {
    return Stream(Stream::DEFAULT, Device(DeviceType::PrivateUse1, 0));
  }
  Stream getDefaultStream(Device d) const override {
    return getStream(d);
  }
  Stream exchangeStream(Stream s) const override {
    return Stream(Stream::DEFAULT, Device(DeviceType::PrivateUse1, 0));
  }
  c10::DeviceIndex deviceCount() const noexcept override {
    return 1;
  }
  // Every eager op has finished when it returns; only work queued directly on MLX by the user
  // can still be running.
  void synchronizeStream(const Stream&) const override {
    mlx::core::synchronize();
  }
  void synchronizeDevice(const c10::DeviceIndex) const override {
    mlx::core::synchronize();
  }
  bool queryStream(const Stream&) const override {
    return true;
  }
  // Events are no-ops: there is one in-order stream and eager ops complete before returning.
  void record(void**, const Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override {
    return true;
  }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, MlxGuardImpl);

}  // namespace
}  // namespace torch_mlx
