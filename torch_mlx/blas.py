"""Give MLX's Linux CPU backend an optimized BLAS without touching torch's.

The mlx-cpu wheel links the reference (netlib) BLAS and LAPACK it bundles as
``mlx_cpu.libs/libblas-<hash>.so.3.10.0`` and ``liblapack-<hash>.so.3.10.0``: a 4096x4096 float32
matmul runs at about 3 GFLOP/s. Preloading OpenBLAS globally (LD_PRELOAD) fixes MLX but also
interposes on torch's own CPU kernels and slows them badly. Instead torch_mlx ships two tiny
*shim* libraries that carry exactly the bundled libraries' sonames and forward to OpenBLAS, and
this module loads them with RTLD_LOCAL before ``mlx.core`` is imported: the dynamic loader then
satisfies libmlx's dependencies with the shims (it matches already loaded objects by soname),
libmlx's BLAS/LAPACK symbols resolve to the shims, and nothing enters the global symbol scope
that torch sees.

The OpenBLAS is PyPI's ``scipy-openblas32`` (a requirement on Linux, so no system package and no
root are needed): a current release (0.3.34; Debian 12 ships 0.3.21, whose GEMV streams weights
about 13% slower here) with 32-bit integers, as libmlx calls BLAS, and every symbol prefixed
``scipy_``. The shims are built with the package (setup.py's build_ext, from
``csrc/blas/``: ``gemm_shim.c`` is the code they run themselves, ``build_shims.py`` says how they
are made) into ``torch_mlx/_blas/``, with a ``TARGET`` record of the mlx they were built for.

OpenBLAS starts its thread pool when it is loaded, and torch_mlx is loaded by every
``import torch``: so it is loaded with one thread, and its real thread count
(``OPENBLAS_NUM_THREADS`` or all cores) is set at the device's first use
(``_C._set_first_use_hook``).

``TORCH_MLX_BLAS``: ``auto`` (default: the shims), ``reference`` (off). When the shims are
missing or were built for another mlx, MLX keeps its reference BLAS, ``info()`` says why and a
warning says how to fix it (rebuild torch-mlx). ``torch.mlx.blas_info()`` returns
``info()``.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import logging
import os
import sys
import warnings

logger = logging.getLogger("torch_mlx")

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_blas")
PREFIX = "scipy_"  # scipy-openblas32's symbol prefix

_info = {"library": "reference", "path": None, "reason": "not selected yet"}
_threads = {"set_num_threads": None, "count": 0}


def info() -> dict:
    """Which BLAS MLX uses in this process, and why."""
    return dict(_info)


def _site_packages() -> str | None:
    """The directory holding the installed mlx package. An "mlx" folder elsewhere on sys.path
    (say in the current directory) makes "mlx" a namespace package with several locations: the
    installed one is the location that has mlx.core's extension."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if glob.glob(os.path.join(location, "core*.so")):
            return os.path.dirname(location)
    return None


def _bundled_libraries() -> list[str]:
    """File names (= sonames) of the reference BLAS/LAPACK bundled with the mlx-cpu wheel."""
    site = _site_packages()
    if site is None:
        return []
    libs = glob.glob(os.path.join(site, "mlx_cpu.libs", "libblas-*.so*"))
    libs += glob.glob(os.path.join(site, "mlx_cpu.libs", "liblapack-*.so*"))
    return sorted(os.path.basename(p) for p in libs)


def find_openblas() -> str | None:
    """scipy-openblas32's shared library, if the package is installed."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    libs = sorted(glob.glob(os.path.join(root, "lib", "libscipy_openblas*.so*")))
    return os.path.realpath(libs[0]) if libs else None


def _mlx_version(site: str) -> str | None:
    """The installed mlx's version, from its dist-info folder (no metadata scan at import)."""
    found = glob.glob(os.path.join(site, "mlx-*.dist-info"))
    return os.path.basename(found[0])[len("mlx-"):-len(".dist-info")] if len(found) == 1 else None


def _shim_paths() -> list[str]:
    return [os.path.join(SHIM_DIR, soname) for soname in _bundled_libraries()]


def shim_state() -> tuple[bool, str]:
    """Whether torch_mlx's shims fit the installed mlx, and if not, why."""
    sonames = _bundled_libraries()
    if not sonames:
        return False, "the installed mlx bundles no reference BLAS to replace (no mlx-cpu wheel)"
    target = os.path.join(SHIM_DIR, "TARGET")
    if not os.path.exists(target):
        return False, ("torch_mlx was built without its BLAS shims (no torch_mlx/_blas/TARGET: "
                       "a build from before they were part of it)")
    with open(target) as f:
        record = json.load(f)
    site = _site_packages()
    installed = _mlx_version(site) if site else None
    if record.get("sonames") != sonames or (installed and record.get("mlx") not in (None,
                                                                                 installed)):
        return False, (f"torch_mlx's BLAS shims were built for mlx {record.get('mlx')} "
                       f"({', '.join(record.get('sonames') or []) or 'no mlx-cpu'}), but mlx "
                       f"{installed} ({', '.join(sonames)}) is installed")
    if not all(map(os.path.exists, _shim_paths())):
        return False, "torch_mlx/_blas/ lacks a shim its TARGET lists"
    return True, "built for the installed mlx"


def shims_current(openblas: str | None = None) -> bool:
    """Whether the shims built with the package fit the installed mlx (and, given, that
    ``openblas`` exists)."""
    return shim_state()[0] and (openblas is None or os.path.exists(openblas))


_REBUILD = ("MLX keeps its reference BLAS (about 100x slower float32 matmul); rebuild torch-mlx "
            "in this environment (`pip install --force-reinstall --no-deps .` from its source, "
            "or tools/bootstrap.sh in a checkout)")


def _fall_back(reason: str) -> dict:
    """Keep the reference BLAS where the shims should have been used, and say so."""
    _info.update(reason=reason)
    warnings.warn(f"torch_mlx: {reason}. {_REBUILD}", RuntimeWarning, stacklevel=3)
    return info()


def _reference_note() -> str:
    """The wheel's netlib cblas_* wrappers call the Fortran routines (sgemm_, ...) by name, and
    the dynamic linker binds those to the first definition in the global scope: in a process that
    imported torch, the MKL linked into libtorch_cpu (loaded there by torch)."""
    torch_lib = os.path.join(os.path.dirname(sys.modules["torch"].__file__), "lib",
                             "libtorch_cpu.so") if "torch" in sys.modules else None
    try:
        has_mkl = torch_lib is not None and hasattr(ctypes.CDLL(torch_lib), "sgemm_")
    except OSError:
        has_mkl = False
    return ("; netlib's cblas wrappers reach the Fortran BLAS of torch's libtorch_cpu (MKL) "
            "through the global symbol scope" if has_mkl else "")


def select() -> dict:
    """Load the shims before mlx.core is imported, unless disabled or impossible."""
    choice = os.environ.get("TORCH_MLX_BLAS", "auto").strip().lower()
    if choice not in ("auto", "reference"):
        raise ValueError(f"TORCH_MLX_BLAS must be 'auto' or 'reference', got {choice!r}")
    if not sys.platform.startswith("linux"):
        _info.update(library="platform", reason="macOS: MLX uses Accelerate / Metal")
        return info()
    if choice == "reference":
        _info.update(reason="TORCH_MLX_BLAS=reference" + _reference_note())
        return info()
    if "mlx.core" in sys.modules:
        _info.update(reason="mlx.core was imported before torch_mlx; import torch first")
        return info()
    if not _bundled_libraries():
        _info.update(reason="the installed mlx bundles no reference BLAS to replace "
                            "(no mlx-cpu wheel)")
        return info()
    target = find_openblas()
    if target is None:
        return _fall_back("scipy-openblas32 is not installed (pip install scipy-openblas32)")
    current, why = shim_state()
    if not current:
        return _fall_back(why)
    wanted = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # no thread pool at import time
    try:
        # the OpenBLAS first: the shims' dependency on it is then matched by soname, wherever
        # scipy-openblas32 is installed
        openblas = ctypes.CDLL(target, mode=os.RTLD_LOCAL)
        shims = {os.path.basename(p): ctypes.CDLL(p, mode=os.RTLD_LOCAL) for p in _shim_paths()}
    finally:
        if wanted is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = wanted
    # the BLAS shim's setter sizes OpenBLAS's pool and the shim's own GEMV pool
    blas_shim = next(lib for name, lib in shims.items() if name.startswith("libblas"))
    _threads["set_num_threads"] = ctypes.cast(blas_shim.tmx_set_num_threads, ctypes.c_void_p)
    _threads["count"] = int(wanted) if wanted and wanted.isdigit() else (os.cpu_count() or 1)
    config = getattr(openblas, PREFIX + "openblas_get_config")
    config.restype = ctypes.c_char_p
    _info.update(library="openblas", path=target, version=config().decode().split()[1],
                 reason="shims loaded before mlx.core")
    logger.debug("torch_mlx: MLX uses %s", target)
    return info()


def install_first_use_hook(c_module) -> None:
    """Have the C++ runtime give OpenBLAS its threads at the first use of the device."""
    if _threads["set_num_threads"] is not None:
        c_module._set_first_use_hook(_threads["set_num_threads"].value, _threads["count"])
        _info["threads"] = _threads["count"]
