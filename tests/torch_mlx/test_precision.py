"""float32 matrix products follow torch's float32 matmul precision (torch_mlx/precision.py).

On MLX's GPU the default is full float32 (MLX alone would use TF32), TF32 is opt-in through
torch's own switch, and "highest" after a TF32 opt-in is honoured by 3xTF32 products. On MLX's
CPU backend every product is float32 and the GPU mode is never fixed.
"""
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

import torch_mlx
from torch_mlx import precision

ON_GPU = mx.default_device() == mx.gpu

PROGRAM = r"""
import json, sys, torch, torch_mlx
torch.manual_seed(0)
a, b = torch.randn(256, 256), torch.randn(256, 256)
ref = a.double() @ b.double()
errors = []
for prec in sys.argv[1:]:
    torch.set_float32_matmul_precision(prec)
    out = (a.to("mlx") @ b.to("mlx")).cpu().double()
    errors.append(float((out - ref).abs().max()))
print(json.dumps({"errors": errors, "mode": torch.backends.mlx.mlx_float32_gemm_mode()}))
"""


def _products(*precisions):
    done = subprocess.run([sys.executable, "-c", PROGRAM, *precisions], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# torch's float32 tolerance for a 256-term product of N(0, 1) values, as torch on the CPU (or
# on CUDA by default) meets it: far below TF32's ~1e-2 on this product.
FLOAT32_ERR = 2e-4


def test_default_float32_product_is_float32():
    res = _products("highest")
    assert res["errors"][0] < FLOAT32_ERR
    assert res["mode"] == ("ieee" if ON_GPU else None)


def test_tf32_is_opt_in_through_torchs_switch_and_highest_is_still_honoured():
    # "high" before the first product puts MLX's GPU in TF32 mode for the process; a later
    # "highest" is then computed as 3xTF32 products, with float32's error.
    res = _products("high", "highest")
    high, highest = res["errors"]
    assert highest < FLOAT32_ERR
    if ON_GPU:
        assert res["mode"] == "tf32"
        assert high > 10 * FLOAT32_ERR  # TF32-class: the opt-in is real
    else:
        assert res["mode"] is None and high < FLOAT32_ERR


def test_split_is_exact_and_3xtf32_product_meets_float32_error():
    x = mx.array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    hi, lo = precision._split(x)
    bits = np.array(mx.view(hi, mx.uint32))
    assert (bits & 0x1FFF == 0).all()  # 10 mantissa bits left
    assert np.array_equal(np.array(hi + lo), np.array(x))
    ref = np.array(x).astype(np.float64) @ np.array(x).astype(np.float64)
    assert np.abs(np.array(precision._product_3xtf32(x, x)) - ref).max() < 1e-4
    c = (x + 1j * x).astype(mx.complex64)
    ref_c = (np.array(c).astype(np.complex128) @ np.array(c).astype(np.complex128))
    assert np.abs(np.array(precision._product_3xtf32(c, c)) - ref_c).max() < 4e-4


def test_backends_mlx_mirrors_torchs_switch():
    before = torch.get_float32_matmul_precision()
    try:
        torch.backends.mlx.matmul.allow_tf32 = True
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.mlx.matmul.fp32_precision == "tf32"
        torch.backends.mlx.matmul.fp32_precision = "ieee"
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.mlx.matmul.allow_tf32 is False
        with pytest.raises(ValueError, match="fp32_precision"):
            torch.backends.mlx.matmul.fp32_precision = "bf16"
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch_mlx  # imported for the backend module


@pytest.mark.parametrize("inherited,user_set", [({}, False),
                                                ({"MLX_ENABLE_TF32": "1"}, True),
                                                ({"MLX_ENABLE_TF32": "0", "TORCH_MLX_SET_TF32": "1"},
                                                 False)])
def test_a_child_tells_torch_mlx_setting_from_the_users(inherited, user_set):
    # vLLM's engine core and other children inherit the variable torch_mlx set in their parent:
    # they must still follow torch's switch, while a user's own MLX_ENABLE_TF32 is kept
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("MLX_ENABLE_TF32", "TORCH_MLX_SET_TF32")}
    env.update(inherited)
    done = subprocess.run([sys.executable, "-c", "import os, torch_mlx.precision as p; "
                           "print(p._USER_SET, os.environ['MLX_ENABLE_TF32'])"],
                          capture_output=True, text=True, env=env, timeout=300, check=True)
    got_user_set, value = done.stdout.split()
    assert got_user_set == str(user_set)
    assert value == inherited.get("MLX_ENABLE_TF32", "0")
