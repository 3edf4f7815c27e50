"""Give MLX's Linux CPU backend an optimized BLAS without touching torch's.

The mlx-cpu wheel links the reference (netlib) BLAS and LAPACK it bundles as
``mlx_cpu.libs/libblas-<hash>.so.3.10.0`` and ``liblapack-<hash>.so.3.10.0``: a 4096x4096 float32
matmul runs at about 3 GFLOP/s. Preloading OpenBLAS globally (LD_PRELOAD) fixes MLX but also
interposes on torch's own CPU kernels and slows them badly. Instead this module builds two tiny
*shim* libraries that carry exactly the bundled libraries' sonames and depend on OpenBLAS, and
loads them with RTLD_LOCAL before ``mlx.core`` is imported: the dynamic loader then satisfies
libmlx's dependencies with the shims (it matches already loaded objects by soname), libmlx's
BLAS/LAPACK symbols resolve to OpenBLAS through the shims' own dependency, and nothing enters the
global symbol scope that torch sees.

OpenBLAS starts its thread pool when it is loaded, and torch_mlx is loaded by every
``import torch``: so it is loaded with one thread, and its real thread count
(``OPENBLAS_NUM_THREADS`` or all cores) is set at the device's first use
(``_C._set_first_use_hook``).

``TORCH_MLX_BLAS``: ``auto`` (default: the shims when they were built), ``reference`` (off).
``python -m torch_mlx.blas --build`` builds the shims (tools/bootstrap.sh runs it).
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile

logger = logging.getLogger("torch_mlx")

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_blas")
OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
]

_info = {"library": "reference", "path": None, "reason": "not selected yet"}
_threads = {"set_num_threads": None, "count": 0}


def info() -> dict:
    """Which BLAS MLX uses in this process, and why."""
    return dict(_info)


def _bundled_libraries() -> list[str]:
    """File names (= sonames) of the reference BLAS/LAPACK bundled with the mlx-cpu wheel."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return []
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    libs = glob.glob(os.path.join(site, "mlx_cpu.libs", "libblas-*.so*"))
    libs += glob.glob(os.path.join(site, "mlx_cpu.libs", "liblapack-*.so*"))
    return sorted(os.path.basename(p) for p in libs)


def find_openblas() -> str | None:
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            return os.path.realpath(path)
    return None


# The BLAS shim's one function. MLX's CPU matmul calls cblas_sgemm for every float product,
# including matrix-vector ones (a decode step's x @ W.T has M = 1). OpenBLAS before 0.3.27 runs
# those through its packed GEMM path: 5x slower than its GEMV here (a 1x1536 @ 1536x4096 product:
# 7.8 ms vs 1.5 ms), so the shim forwards M == 1 / N == 1 products to cblas_sgemv, as newer
# OpenBLAS does itself (GEMM_GEMV_FORWARD). Everything else goes to OpenBLAS's cblas_sgemm.
_GEMM_SHIM = r"""
#include <dlfcn.h>
#include <stdlib.h>
#include <stdio.h>
enum { RowMajor = 101, NoTrans = 111 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
__attribute__((constructor)) static void bind(void) {
  void *h = dlopen(OPENBLAS, RTLD_NOW | RTLD_NOLOAD);
  if (!h) h = dlopen(OPENBLAS, RTLD_NOW | RTLD_LOCAL);
  real_sgemm = h ? (sgemm_fn)dlsym(h, "cblas_sgemm") : 0;
  real_sgemv = h ? (sgemv_fn)dlsym(h, "cblas_sgemv") : 0;
  if (!real_sgemm || !real_sgemv) {
    fprintf(stderr, "torch_mlx BLAS shim: cannot bind %s\n", OPENBLAS);
    abort();
  }
}
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  if (order == RowMajor && K > 0 && M == 1 && N > 1) {
    /* C[1, N] = alpha * a[1, K] op(B)[K, N] + beta * C: y = op(B)^T a */
    int inc_a = ta == NoTrans ? 1 : lda;
    if (tb == NoTrans) real_sgemv(RowMajor, 112, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
    else real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
    return;
  }
  if (order == RowMajor && K > 0 && N == 1 && M > 1) {
    /* C[M, 1] (stride ldc) = alpha * op(A)[M, K] b[K, 1] + beta * C */
    int inc_b = tb == NoTrans ? ldb : 1;
    if (ta == NoTrans) real_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
    else real_sgemv(RowMajor, 112, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
    return;
  }
  real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
"""


def build_shims(openblas: str, out_dir: str = SHIM_DIR) -> list[str]:
    """Compile one library per bundled BLAS/LAPACK soname, depending on ``openblas``: the BLAS
    one carries the GEMV forwarding above, the LAPACK one is empty (its soname and dependency
    are all that matter). Each is written beside its final name and renamed over it, so
    processes that have the old one loaded keep a valid file."""
    os.makedirs(out_dir, exist_ok=True)
    built = []
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.c")
        gemm = os.path.join(tmp, "gemm.c")
        with open(empty, "w") as f:
            f.write("/* torch_mlx LAPACK shim: only its soname and its dependency matter. */\n")
        with open(gemm, "w") as f:
            f.write(_GEMM_SHIM)
        for soname in _bundled_libraries():
            out = os.path.join(out_dir, soname)
            src = gemm if soname.startswith("libblas") else empty
            subprocess.run(
                ["cc", "-O2", "-shared", "-fPIC", "-o", out + ".tmp", src,
                 f"-DOPENBLAS=\"{openblas}\"", f"-Wl,-soname,{soname}",
                 "-Wl,--no-as-needed", f"-L{os.path.dirname(openblas)}",
                 f"-l:{os.path.basename(openblas)}", f"-Wl,-rpath,{os.path.dirname(openblas)}",
                 "-ldl"],
                check=True)
            os.replace(out + ".tmp", out)
            built.append(out)
    with open(os.path.join(out_dir, "TARGET"), "w") as f:
        f.write(openblas + "\n")
    return built


def select() -> dict:
    """Load the shims before mlx.core is imported, unless disabled or impossible."""
    choice = os.environ.get("TORCH_MLX_BLAS", "auto").strip().lower()
    if choice not in ("auto", "reference"):
        raise ValueError(f"TORCH_MLX_BLAS must be 'auto' or 'reference', got {choice!r}")
    if not sys.platform.startswith("linux"):
        _info.update(library="platform", reason="macOS: MLX uses Accelerate / Metal")
        return info()
    if choice == "reference":
        _info.update(reason="TORCH_MLX_BLAS=reference")
        return info()
    if "mlx.core" in sys.modules:
        _info.update(reason="mlx.core was imported before torch_mlx; import torch first")
        return info()
    shims = [os.path.join(SHIM_DIR, s) for s in _bundled_libraries()]
    target_file = os.path.join(SHIM_DIR, "TARGET")
    if not shims or not all(os.path.exists(s) for s in shims) or not os.path.exists(target_file):
        _info.update(reason="no BLAS shims built (python -m torch_mlx.blas --build)")
        return info()
    target = open(target_file).read().strip()
    if not os.path.exists(target):
        _info.update(reason=f"shim target {target} is missing")
        return info()
    wanted = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # no thread pool at import time
    try:
        for shim in shims:
            ctypes.CDLL(shim, mode=os.RTLD_LOCAL)
    finally:
        if wanted is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = wanted
    openblas = ctypes.CDLL(target, mode=os.RTLD_LOCAL)  # the same, already loaded library
    _threads["set_num_threads"] = ctypes.cast(openblas.openblas_set_num_threads, ctypes.c_void_p)
    _threads["count"] = int(wanted) if wanted and wanted.isdigit() else (os.cpu_count() or 1)
    _info.update(library="openblas", path=target, reason="shims loaded before mlx.core")
    logger.debug("torch_mlx: MLX uses %s", target)
    return info()


def install_first_use_hook(c_module) -> None:
    """Have the C++ runtime give OpenBLAS its threads at the first use of the device."""
    if _threads["set_num_threads"] is not None:
        c_module._set_first_use_hook(_threads["set_num_threads"].value, _threads["count"])
        _info["threads"] = _threads["count"]


def main(argv: list[str]) -> int:
    if argv[1:] != ["--build"]:
        print(__doc__)
        return 2
    openblas = find_openblas()
    if openblas is None:
        print("torch_mlx.blas: no system OpenBLAS found (Debian: apt-get install "
              "libopenblas0-pthread); MLX keeps its reference BLAS")
        return 0
    for path in build_shims(openblas):
        print(f"torch_mlx.blas: built {path} -> {openblas}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
