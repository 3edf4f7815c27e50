// The cblas_sgemm that libmlx itself resolved: on Linux torch_mlx's shim over OpenBLAS (loaded
// RTLD_LOCAL, so invisible to a global lookup, see torch_mlx/blas.py), on macOS Accelerate.
// dlsym on libmlx's own handle searches libmlx and its dependencies, the scope MLX's matmul
// binds in, so a torch_mlx kernel multiplies with exactly the BLAS MLX uses (and its threads).
#include <dlfcn.h>

#include <mlx/stream.h>

#include "cpu_blas.h"

namespace torch_mlx {

SgemmFn mlx_sgemm() {
  static const SgemmFn fn = []() -> SgemmFn {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&mlx::core::default_stream), &info)) return nullptr;
    void* libmlx = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (libmlx == nullptr) return nullptr;
    auto found = reinterpret_cast<SgemmFn>(dlsym(libmlx, "cblas_sgemm"));
    dlclose(libmlx);  // RTLD_NOLOAD took a reference to the loaded library; it stays loaded
    return found;
  }();
  return fn;
}

}  // namespace torch_mlx
