"""Build torch_mlx._C against torch's headers and the MLX C++ library inside the mlx wheel.

The extension speaks to mlx.core through nanobind with MLX's ABI domain (NB_DOMAIN=mlx), so the
mx.array objects it returns and accepts are the same Python type as mlx.core.array.
"""
import glob
import os
import sys

import mlx
import nanobind
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

MLX_DIR = list(mlx.__path__)[0]  # mlx is a namespace package
MLX_LIB = os.path.join(MLX_DIR, "lib")
NB_DIR = os.path.dirname(nanobind.__file__)

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
                        "-ffp-contract=off"],
    # libmlx.so is loaded by `import mlx.core` before _C; the rpath makes _C loadable on its own too.
    # The version script keeps every symbol but PyInit__C local (csrc/exports.map says why).
    extra_link_args=[f"-Wl,-rpath,{MLX_LIB}"] + (
        [f"-Wl,--version-script={os.path.abspath('csrc/exports.map')}"]
        if sys.platform.startswith("linux") else []),
)

setup(
    name="torch-mlx",
    version="0.1.0",
    description="PyTorch device backend on Apple MLX, and a vLLM platform plugin (vllm-metal)",
    packages=find_packages(include=["torch_mlx", "torch_mlx.*", "vllm_metal", "vllm_metal.*"]),
    # tools/bootstrap.sh builds _C in place (incrementally) and then installs the package
    # editable only for its metadata and entry points, with TORCH_MLX_SKIP_EXT=1.
    ext_modules=[] if os.environ.get("TORCH_MLX_SKIP_EXT") == "1" else [ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.11",
    entry_points={
        "torch.backends": ["mlx = torch_mlx:_autoload"],
        "vllm.platform_plugins": ["metal = vllm_metal:register"],
        # registers vllm_metal's quantization methods before vLLM reads a model's config
        "vllm.general_plugins": ["metal_quantization = vllm_metal.quantization:register"],
        "torch_dynamo_backends": ["mlx = torch_mlx.compile:mlx_backend"],
    },
)
