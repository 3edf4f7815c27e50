"""MLX's optimized BLAS on Linux (torch_mlx/blas.py): selected, correct, switchable, private."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU backend")

PROBE = r"""
import ctypes, json
import torch, mlx.core as mx
a = torch.randn(64, 300); b = torch.randn(300, 40)
got = torch.from_numpy(__import__('numpy').array(mx.array(a.numpy()) @ mx.array(b.numpy())))
print(json.dumps({
    "info": torch.mlx.blas_info(),
    "max_err": (got - a @ b).abs().max().item(),
    # OpenBLAS must stay out of the global symbol scope that torch's own kernels resolve in.
    "openblas_global": hasattr(ctypes.CDLL(None), "openblas_get_num_threads"),
}))
"""


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_selected_blas_is_correct_and_private():
    result = _probe()
    assert result["max_err"] < 1e-3
    assert result["openblas_global"] is False
    from torch_mlx import blas

    if blas.find_openblas() is not None and os.path.exists(os.path.join(blas.SHIM_DIR, "TARGET")):
        assert result["info"]["library"] == "openblas", result["info"]


def test_reference_switch():
    result = _probe(TORCH_MLX_BLAS="reference")
    assert result["info"] == {"library": "reference", "path": None,
                              "reason": "TORCH_MLX_BLAS=reference"}
    assert result["max_err"] < 1e-3


def test_invalid_value_names_the_variable():
    out = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                         env=dict(os.environ, TORCH_MLX_BLAS="fast"))
    assert out.returncode != 0 and "TORCH_MLX_BLAS" in out.stderr
