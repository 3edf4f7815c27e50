#!/usr/bin/env bash
# Create (or reuse) .venv in the repository and build torch_mlx._C into it.
# Sourced by tools/demo.sh and tools/test.sh; safe to run again (it only redoes what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$PY" ]; then
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi

stamp="$VENV/.torch-mlx-deps"
reqs="$ROOT/requirements.txt"
if [ ! -f "$stamp" ] || [ "$reqs" -nt "$stamp" ]; then
  # torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
  "$PY" -m pip install -q torch==2.13.0
  if [ "$(uname -s)" = "Darwin" ]; then mlx_req="mlx==0.32.4"; else mlx_req="mlx[cpu]==0.32.4"; fi
  "$PY" -m pip install -q -r "$reqs" "$mlx_req"
  # vllm brings CUDA builds of these that cannot load beside the CPU torch and break
  # transformers' model imports; nothing here uses them.
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi

# Build the extension in place when a C++ source or setup.py is newer than the built module, and
# on Linux the BLAS shims (csrc/blas/: an optimized BLAS for MLX's CPU backend, torch_mlx/blas.py)
# when they are missing or older than their sources. TORCH_MLX_BLAS=reference turns those off at
# run time.
so=$(ls "$ROOT"/torch_mlx/_C*.so 2>/dev/null | head -n1 || true)
shims="$ROOT/torch_mlx/_blas/TARGET"
if [ -z "$so" ] || [ -n "$(find "$ROOT/csrc" "$ROOT/setup.py" -newer "$so" 2>/dev/null | head -n1)" ] \
   || { [ "$(uname -s)" = "Linux" ] && { [ ! -f "$shims" ] \
        || [ -n "$(find "$ROOT/csrc/blas" "$ROOT/setup.py" -newer "$shims" | head -n1)" ]; }; }; then
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" TORCH_DEVICE_BACKEND_AUTOLOAD=0 "$PY" setup.py -q build_ext --inplace >/dev/null)
fi
# Register the package and its entry points (torch.backends autoload, vllm.platform_plugins,
# vllm.general_plugins). (Checked by import: an editable install made before a package existed
# does not map it; and by the newest entry point: one made before it was declared lacks it.)
if ! (cd / && TORCH_DEVICE_BACKEND_AUTOLOAD=0 "$PY" -c "import torch_mlx, vllm_metal" 2>/dev/null) \
   || ! "$PY" -c "import importlib.metadata as m; m.distribution('torch-mlx'); assert any(
        e.name == 'metal_quantization' for e in m.entry_points(group='vllm.general_plugins'))" \
        2>/dev/null; then
  (cd "$ROOT" && TORCH_MLX_SKIP_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >/dev/null)
fi
