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
    assert result["info"]["library"] == "reference" and result["info"]["path"] is None
    assert result["info"]["reason"].startswith("TORCH_MLX_BLAS=reference")
    assert result["max_err"] < 1e-3


def test_invalid_value_names_the_variable():
    out = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                         env=dict(os.environ, TORCH_MLX_BLAS="fast"))
    assert out.returncode != 0 and "TORCH_MLX_BLAS" in out.stderr


GEMV_PROBE = r"""
import json, time
import numpy as np
import torch, mlx.core as mx
torch.empty(1, device="mlx")  # the device's first use sizes the GEMV pool (all cores)
rng = np.random.default_rng(0)
errors = []
# matrix-vector products take the shim's GEMV route (M == 1 or N == 1), and x @ W.T with up to
# 12 rows of x its own kernel, in every layout MLX hands to cblas_sgemm (transposed operands are
# strided views), with and without addmm's beta; the large ones reach the shim's own kernel (K
# not a multiple of 16, M and N not multiples of 4, and 13 rows, past it, included). Errors are
# against float64, per unit of K.
for M, N, K in [(1, 7, 5), (7, 1, 5), (1, 1, 5), (3, 4, 5), (1, 300, 70), (90, 1, 64),
                (1, 301, 1000), (999, 1, 333), (1, 2048, 1536), (2, 300, 333), (8, 512, 1000),
                (11, 333, 517), (12, 256, 1536), (13, 256, 1536)]:
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
# a burst of products of changing shapes, with pauses that let the pool's workers fall asleep
# (TORCH_MLX_GEMV_SPIN_US=0) or not: a worker waking late must not touch a later product
shapes = [(2048, 1536), (333, 4096), (4096, 64), (1000, 1000)]
weights = [rng.standard_normal(s).astype(np.float32) for s in shapes]
for i in range(240):
    w = weights[i % len(weights)]
    x = rng.standard_normal((1 + i % 11, w.shape[1])).astype(np.float32)
    got = np.array(mx.array(x) @ mx.array(w).T)
    errors.append(float(np.abs(got - x.astype(np.float64) @ w.T.astype(np.float64)).max())
                  / w.shape[1])
    if i % 7 == 0:
        time.sleep(0.001)
print(json.dumps({"info": torch.mlx.blas_info(), "max_err": max(errors)}))
"""


@pytest.mark.parametrize("gemv,spin_us", [("own", "2000"), ("own", "0"), ("openblas", "")])
def test_matrix_vector_products_in_every_layout(gemv, spin_us):
    env = dict(os.environ, TORCH_MLX_GEMV=gemv, TORCH_MLX_GEMV_SPIN_US=spin_us)
    out = subprocess.run([sys.executable, "-c", GEMV_PROBE], capture_output=True, text=True,
                         check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_err"] < 2e-6, result


POOL_PROBE = r"""
import ctypes, json, sys, time
import numpy as np
from torch_mlx import blas
shim = ctypes.CDLL(blas._shim_paths()[0], mode=ctypes.RTLD_LOCAL)  # the loaded BLAS shim
shim.tmx_set_num_threads(3)  # more threads than cores: workers lose their core mid-product
f32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
sgemm = shim.cblas_sgemm
sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, f32, ctypes.c_int, f32, ctypes.c_int,
                                       ctypes.c_float, f32, ctypes.c_int]
rng = np.random.default_rng(0)
# long rows make each claimed chunk long (8 rows of 64K floats), so a product that returned
# before every chunk was finished would show unwritten outputs
weights = [rng.standard_normal(s).astype(np.float32) for s in [(64, 65536), (2048, 1536), (96, 700)]]
worst = 0.0
for i in range(150):
    w = weights[i % len(weights)]
    n, k = w.shape
    m = 1 + i % 10
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = np.full((m, n), np.nan, np.float32)
    sgemm(101, 111, 112, m, n, k, 1.0, x, k, w, k, 0.0, y, n)  # y = x @ w.T
    got = y.copy()  # at once: chunks still being written would show as NaN
    err = np.abs(got - x.astype(np.float64) @ w.T.astype(np.float64))
    worst = max(worst, float(np.nan_to_num(err, nan=1e9).max()) / k)
    if i % 5 == 0:
        time.sleep(0.002)  # long enough for workers with TORCH_MLX_GEMV_SPIN_US=0 to sleep
print(json.dumps({"max_err": worst}))
"""


@pytest.mark.parametrize("spin_us", ["2000", "0"])
def test_gemv_pool_returns_only_finished_products(spin_us):
    from torch_mlx import blas

    if not blas.shims_current(blas.find_openblas()):
        pytest.skip("no OpenBLAS shims built")
    out = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True,
                         check=True, env=dict(os.environ, TORCH_MLX_GEMV_SPIN_US=spin_us))
    assert json.loads(out.stdout.strip().splitlines()[-1])["max_err"] < 2e-6


def test_shims_are_built_with_the_package_and_record_their_mlx():
    # setup.py's build_ext builds the shims from csrc/blas/ into torch_mlx/_blas/ beside _C
    from torch_mlx import blas

    if not blas._bundled_libraries():
        pytest.skip("the installed mlx bundles no reference BLAS")
    with open(os.path.join(blas.SHIM_DIR, "TARGET")) as f:
        record = json.load(f)
    assert record["sonames"] == blas._bundled_libraries()
    assert record["mlx"] == blas._mlx_version(blas._site_packages())
    assert blas.shim_state() == (True, "built for the installed mlx")


def test_missing_or_stale_shims_keep_the_reference_blas_and_say_why(tmp_path, monkeypatch):
    from torch_mlx import blas

    if not blas._bundled_libraries():
        pytest.skip("the installed mlx bundles no reference BLAS")
    monkeypatch.setattr(blas, "SHIM_DIR", str(tmp_path))
    ok, why = blas.shim_state()
    assert not ok and "built without its BLAS shims" in why
    (tmp_path / "TARGET").write_text(json.dumps({"mlx": "0.1.0", "sonames": ["libblas-x.so.3"]}))
    ok, why = blas.shim_state()
    assert not ok and "built for mlx 0.1.0" in why and blas._bundled_libraries()[0] in why
    monkeypatch.setattr(blas, "_info", dict(blas._info))
    with pytest.warns(RuntimeWarning, match="rebuild torch-mlx"):
        info = blas._fall_back(why)
    assert info["reason"] == why
