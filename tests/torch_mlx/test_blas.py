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
    # OpenBLAS and the shims must stay out of the global symbol scope that torch's own kernels
    # resolve in.
    "openblas_global": any(hasattr(ctypes.CDLL(None), name) for name in
                           ("scipy_openblas_get_num_threads", "openblas_get_num_threads",
                            "cblas_sgemm", "sgetrf_")),
}))
"""


def _probe(cwd=None, **env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env=dict(os.environ, **env), cwd=cwd)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_selected_blas_is_correct_and_private():
    result = _probe()
    assert result["max_err"] < 1e-3
    assert result["openblas_global"] is False
    from torch_mlx import blas

    if blas.shims_current(blas.find_openblas()):
        assert result["info"]["library"] == "openblas", result["info"]
        assert result["info"]["version"].startswith("0.3."), result["info"]


def test_an_mlx_folder_in_the_working_directory_does_not_hide_the_wheel(tmp_path):
    # `python -c` puts the working directory first on sys.path: a folder named mlx there makes
    # mlx a namespace package with two locations, and the shims must still be found.
    from torch_mlx import blas

    if not blas.shims_current(blas.find_openblas()):
        pytest.skip("no OpenBLAS shims built")
    (tmp_path / "mlx").mkdir()
    assert _probe(cwd=tmp_path)["info"]["library"] == "openblas"


def test_reference_switch():
    result = _probe(TORCH_MLX_BLAS="reference")
    assert result["info"] == {"library": "reference", "path": None,
                              "reason": "TORCH_MLX_BLAS=reference"}
    assert result["max_err"] < 1e-3


def test_invalid_value_names_the_variable():
    out = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                         env=dict(os.environ, TORCH_MLX_BLAS="fast"))
    assert out.returncode != 0 and "TORCH_MLX_BLAS" in out.stderr


GEMV_PROBE = r"""
import json
import numpy as np
import torch, mlx.core as mx
rng = np.random.default_rng(0)
errors = []
# matrix-vector products take the shim's GEMV route (M == 1 or N == 1), in every layout MLX
# hands to cblas_sgemm (transposed operands are strided views), with and without addmm's beta;
# the large ones reach the shim's own kernel (K not a multiple of 16 included). Errors are
# against float64, per unit of K.
for M, N, K in [(1, 7, 5), (7, 1, 5), (1, 1, 5), (3, 4, 5), (1, 300, 70), (90, 1, 64),
                (1, 301, 1000), (999, 1, 333), (1, 2048, 1536)]:
    for ta in (False, True):
        for tb in (False, True):
            a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
            b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
            c = rng.standard_normal((M, N)).astype(np.float32)
            A = mx.array(a).T if ta else mx.array(a)
            B = mx.array(b).T if tb else mx.array(b)
            ref = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
            errors.append(float(np.abs(np.array(A @ B) - ref).max()) / K)
            got = np.array(mx.addmm(mx.array(c), A, B, alpha=0.5, beta=2.0))
            errors.append(float(np.abs(got - (2 * c + 0.5 * ref)).max()) / K)
print(json.dumps({"info": torch.mlx.blas_info(), "max_err": max(errors)}))
"""


@pytest.mark.parametrize("gemv", ["own", "openblas"])
def test_matrix_vector_products_in_every_layout(gemv):
    out = subprocess.run([sys.executable, "-c", GEMV_PROBE], capture_output=True, text=True,
                         check=True, env=dict(os.environ, TORCH_MLX_GEMV=gemv))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_err"] < 2e-6, result
