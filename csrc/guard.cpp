// Device guard for "mlx": one device (index 0) and one in-order stream, MLX's default stream.
#include <chrono>

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <mlx/transforms.h>

#include "launch.h"

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
  // Launched eager results (the GPU default, launch.h) and work queued on MLX directly may
  // still be running: both are waited for.
  void synchronizeStream(const Stream&) const override {
    synchronize_all();
  }
  void synchronizeDevice(const c10::DeviceIndex) const override {
    synchronize_all();
  }
  // Done when every launched eager result has finished (a polling loop ends once they do);
  // work queued on MLX directly cannot be queried, as before.
  bool queryStream(const Stream&) const override {
    return launches_done();
  }
  // Events: recording waits for all of torch's MLX work (launched results included) and stamps
  // the time, so an event is complete once recorded and torch.Event(enable_timing=True)
  // .elapsed_time measures host-observed intervals that include the device's work.
  void record(void** event, const Stream&, const c10::DeviceIndex,
              const c10::EventFlag) const override {
    synchronize_all();
    if (*event == nullptr) {
      *event = new Clock::time_point();
    }
    *static_cast<Clock::time_point*>(*event) = Clock::now();
  }
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override {
    return true;
  }
  void synchronizeEvent(void*) const override {}
  double elapsedTime(void* start, void* end, const c10::DeviceIndex) const override {
    TORCH_CHECK(start != nullptr && end != nullptr,
                "elapsed_time: both events must be recorded first");
    const auto& t0 = *static_cast<Clock::time_point*>(start);
    const auto& t1 = *static_cast<Clock::time_point*>(end);
    return std::chrono::duration<double, std::milli>(t1 - t0).count();
  }
  void destroyEvent(void* event, const c10::DeviceIndex) const noexcept override {
    delete static_cast<Clock::time_point*>(event);
  }

 private:
  using Clock = std::chrono::steady_clock;
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, MlxGuardImpl);

}  // namespace
}  // namespace torch_mlx
