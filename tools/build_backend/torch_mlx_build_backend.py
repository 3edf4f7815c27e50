"""PEP 517 build backend for torch-mlx: setuptools' own, built against the installing
environment's torch and mlx.

torch_mlx._C links the C++ libraries of the torch and mlx it will run with (their ABI), so it
must be built against the ones installed in the target environment, not copies a build
front-end puts in an isolated build environment (which would also mean downloading a multi-GB
torch). pip's build isolation hides the target environment's site-packages; when torch, mlx or
nanobind are then not importable, this appends that environment's site-packages (and the paths
its .pth files name) to sys.path, after the isolated build environment's own packages. With
--no-build-isolation nothing changes. So `pip install .` builds with no extra flag.
"""
import importlib.util
import os
import site
import sys
import sysconfig

_NEEDED = ("torch", "mlx", "nanobind")


def _installing_environment_paths() -> list[str]:
    dirs = []
    for d in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
              *site.getsitepackages()]:
        if d not in dirs and os.path.isdir(d):
            dirs.append(d)
    paths = []
    for d in dirs:
        paths.append(d)
        # path lines of .pth files only: their `import` lines (an editable install's finder,
        # setuptools' distutils hack) belong to that environment, not to this build
        for pth in sorted(f for f in os.listdir(d) if f.endswith(".pth")):
            try:
                with open(os.path.join(d, pth)) as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    p = os.path.join(d, line)
                    if os.path.isdir(p):
                        paths.append(os.path.abspath(p))
    return paths


if any(importlib.util.find_spec(name) is None for name in _NEEDED):
    for _p in _installing_environment_paths():
        if _p not in sys.path:
            sys.path.append(_p)
    _missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if _missing:
        raise ImportError(
            f"building torch-mlx needs {', '.join(_missing)} installed in the environment it is "
            "installed into (torch==2.13.0 CPU build, mlx==0.32.4 with [cpu] on Linux, "
            "nanobind==3.1.0; see README.md)")

from setuptools.build_meta import *  # noqa: E402,F401,F403
from setuptools.build_meta import __all__  # noqa: E402,F401
