"""The package as installed: where torch_mlx comes from when tools/test_wheel.sh runs this suite
against the installed wheel (TORCH_MLX_TEST_INSTALLED=1), and its compiled parts."""
import os
import sys
import sysconfig

import pytest
import torch

import torch_mlx


@pytest.mark.skipif(os.environ.get("TORCH_MLX_TEST_INSTALLED") != "1",
                    reason="tools/test_wheel.sh runs this against the installed wheel")
def test_the_suite_runs_against_the_installed_wheel():
    pkg = os.path.dirname(os.path.abspath(torch_mlx.__file__))
    site = os.path.realpath(sysconfig.get_paths()["platlib"])
    assert os.path.realpath(os.path.dirname(pkg)) == site, (pkg, site)
    assert not os.path.exists(os.path.join(pkg, "..", "csrc")), "a source tree's torch_mlx"
    assert os.path.dirname(torch_mlx._C.__file__) == pkg
    assert not any(p and os.path.exists(os.path.join(p, "setup.py")) and
                   os.path.isdir(os.path.join(p, "torch_mlx")) for p in sys.path)


def test_blas_info_names_the_blas_in_use():
    info = torch.mlx.blas_info()
    assert info["library"] in ("openblas", "reference", "platform"), info
    assert info["reason"]
    if info["library"] == "openblas":
        assert os.path.exists(info["path"]) and info["version"].startswith("0.3.")
