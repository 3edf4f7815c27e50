"""Build torch_mlx._C against torch's headers and the MLX C++ library inside the mlx wheel, and
(Linux) the BLAS shims that give MLX's CPU backend OpenBLAS (csrc/blas/build_shims.py).

The extension speaks to mlx.core through nanobind with MLX's ABI domain (NB_DOMAIN=mlx), so the
mx.array objects it returns and accepts are the same Python type as mlx.core.array. It links the
torch and mlx installed in the environment it is built in, so the wheel's metadata pins those
versions (and the build backend in tools/build_backend/ builds against them; see pyproject.toml).

Build switches (environment):
- TORCH_MLX_SANITIZE=address,undefined (any -fsanitize= list): build csrc/ and the shims with
  those sanitizers (tools/sanitize.sh builds and tests such a build out of tree).
- TORCH_MLX_SKIP_EXT=1: no compiled code (tools/bootstrap.sh's editable install of the metadata).
"""
import glob
import os
import sys

# importing torch below must not autoload an installed torch_mlx (an older build, or none)
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = os.path.dirname(os.path.abspath(__file__))
# torch's ninja build looks for `ninja` on PATH: the interpreter's own scripts folder has it when
# the ninja wheel is installed there, which PATH lacks when pip runs outside an activated venv.
os.environ["PATH"] = os.pathsep.join(
    [os.environ.get("PATH", ""), os.path.dirname(sys.executable)])

import mlx  # noqa: E402
import nanobind  # noqa: E402
import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "csrc", "blas"))
import build_shims  # noqa: E402

MLX_DIR = list(mlx.__path__)[0]  # mlx is a namespace package
MLX_LIB = os.path.join(MLX_DIR, "lib")
NB_DIR = os.path.dirname(nanobind.__file__)

SANITIZE = os.environ.get("TORCH_MLX_SANITIZE", "").strip()
# -O1 and frame pointers give sanitizer reports usable stacks; -g their file:line; -fno-wrapv
# undoes Python's -fwrapv (extension flags), under which signed overflow is defined and UBSan
# does not check it
SANITIZE_CFLAGS = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-fno-wrapv", "-g",
                   "-O1"] if SANITIZE else []
SANITIZE_LDFLAGS = [f"-fsanitize={SANITIZE}"] if SANITIZE else []

ext = CppExtension(
    name="torch_mlx._C",
    sources=sorted(glob.glob("csrc/*.cpp")) + [os.path.join(NB_DIR, "src", "nb_combined.cpp")],
    include_dirs=[
        os.path.abspath("csrc"),
        os.path.join(MLX_DIR, "include"),
        os.path.join(NB_DIR, "include"),
        os.path.join(NB_DIR, "ext", "robin_map", "include"),
    ],
    library_dirs=[MLX_LIB],
    libraries=["mlx"],
    define_macros=[("NB_DOMAIN", "mlx"), ("NDEBUG", None)],
    # -ffp-contract=off: csrc's kernels round as torch's reference code does (no fused
    # multiply-adds)
    extra_compile_args=["-std=c++20", "-O2", "-fvisibility=hidden", "-Wno-unused-parameter",
                        "-ffp-contract=off", *SANITIZE_CFLAGS],
    # libmlx.so is loaded by `import mlx.core` before _C; the rpath makes _C loadable on its own too
    # (the installed wheel's libmlx, where the wheel is installed beside it: $ORIGIN/../mlx/lib).
    # The version script keeps every symbol but PyInit__C local (csrc/exports.map says why).
    extra_link_args=[f"-Wl,-rpath,$ORIGIN/../mlx/lib:{MLX_LIB}", *SANITIZE_LDFLAGS] + (
        [f"-Wl,--version-script={os.path.abspath('csrc/exports.map')}"]
        if sys.platform.startswith("linux") else []),
)


class build_ext(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, then (Linux) the BLAS shims into torch_mlx/_blas/ beside _C."""

    def run(self):
        super().run()
        if sys.platform.startswith("linux"):
            out = os.path.join(ROOT if self.inplace else self.build_lib, "torch_mlx", "_blas")
            openblas = build_shims.find_openblas()
            # an in-place (development) build also finds the OpenBLAS it was built with
            rpaths = [os.path.dirname(openblas)] if self.inplace and openblas else []
            try:
                self._shims = build_shims.build(out, cflags=SANITIZE_CFLAGS,
                                                ldflags=SANITIZE_LDFLAGS, extra_rpaths=rpaths)
            except build_shims.ShimBuildError as e:
                sys.exit(f"error: {e}")

    def get_outputs(self):
        return super().get_outputs() + list(getattr(self, "_shims", []))


def _pinned(dist: str, version: str) -> str:
    return f"{dist}=={version.split('+')[0]}"  # 2.13.0+cpu -> torch==2.13.0 (any local build)


def _requirements() -> list[str]:
    """The compiled code is built against this environment's torch and mlx (C++ ABI), and the
    shims link scipy-openblas32: the wheel requires exactly those."""
    import importlib.metadata as md

    reqs = [_pinned("torch", torch.__version__), _pinned("mlx", md.version("mlx")), "numpy"]
    if sys.platform.startswith("linux"):
        try:
            reqs.append(_pinned("scipy-openblas32", md.version("scipy-openblas32")))
        except md.PackageNotFoundError:
            pass  # no shims to link (build_shims says whether that is an error)
    return reqs


skip_ext = os.environ.get("TORCH_MLX_SKIP_EXT") == "1"
setup(
    name="torch-mlx",
    version="0.1.0",
    description="PyTorch device backend on Apple MLX, and a vLLM platform plugin (vllm-metal)",
    packages=find_packages(include=["torch_mlx", "torch_mlx.*", "vllm_metal", "vllm_metal.*"]),
    # tools/bootstrap.sh builds _C in place (incrementally) and then installs the package
    # editable only for its metadata and entry points, with TORCH_MLX_SKIP_EXT=1.
    ext_modules=[] if skip_ext else [ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.11",
    install_requires=[] if skip_ext else _requirements(),
    extras_require={"vllm": ["vllm==0.32.0"]},
    entry_points={
        "torch.backends": ["mlx = torch_mlx:_autoload"],
        "vllm.platform_plugins": ["metal = vllm_metal:register"],
        # registers vllm_metal's quantization methods before vLLM reads a model's config
        "vllm.general_plugins": ["metal_quantization = vllm_metal.quantization:register"],
        "torch_dynamo_backends": ["mlx = torch_mlx.compile:mlx_backend"],
    },
)
