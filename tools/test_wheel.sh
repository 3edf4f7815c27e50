#!/usr/bin/env bash
# The package as a user installs it: `pip install .` (a wheel, not editable) into a fresh
# virtualenv that already has torch, vllm and mlx, then tests/torch_mlx against the installed
# wheel from outside the source tree.
#
#   bash tools/test_wheel.sh [PYTEST ARGS...]     (default: the whole tests/torch_mlx, CI subset)
#
# The fresh venv gets its torch, vllm, mlx (and the rest of requirements.txt) from an existing
# environment, BASE_VENV (default: the repository's .venv, made by tools/bootstrap.sh), without
# downloading them again: a folder of links to every package of BASE_VENV's site-packages except
# torch-mlx's own (its editable install) is put on the fresh venv's path by a .pth file. pip sees
# those packages as installed but outside the venv, so it never changes them. WORK (default: a
# new temporary folder, removed at the end unless KEEP=1) holds the venv and the copied tests;
# PIP_ARGS (default ".") replaces pip install's arguments.
#
# Checks: pip builds (from a copy of the checkout: 5-6 minutes on 2 cores) and installs a wheel (no editable finder, no .egg-link); torch_mlx is
# imported from the venv's site-packages with its compiled code (_C, the BLAS shims) inside it;
# `import torch` autoloads it; torch.mlx.blas_info() reports OpenBLAS on Linux; vLLM finds the
# vllm_metal platform plugin; then pytest runs the copied tests with the working folder outside
# the source tree and PYTHONPATH unset.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_VENV="${BASE_VENV:-$ROOT/.venv}"
BASE_PY="$BASE_VENV/bin/python"
[ -x "$BASE_PY" ] || { echo "test_wheel: no $BASE_PY (run tools/bootstrap.sh, or set BASE_VENV)" >&2; exit 2; }
WORK="${WORK:-$(mktemp -d /tmp/torch-mlx-wheel.XXXXXX)}"
if [ "${KEEP:-0}" != "1" ]; then trap 'rm -rf "$WORK"' EXIT; fi
unset PYTHONPATH
export TORCH_MLX_TEST_INSTALLED=1

# 1. a fresh venv whose path holds the base environment's packages (links), torch-mlx excluded
BASE_SITE="$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$BASE_PY" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$WORK/base-site"
for entry in "$BASE_SITE"/* "$BASE_SITE"/.[!.]*; do
  [ -e "$entry" ] || continue
  name="$(basename "$entry")"
  case "$name" in
    torch_mlx|torch_mlx-*|vllm_metal|__editable__*torch_mlx*|*.pth) continue ;;
  esac
  ln -s "$entry" "$WORK/base-site/$name"
done
echo "$WORK/base-site" > "$SITE/00-torch-mlx-test-base.pth"  # before the .pth files below
# the base's own .pth files (namespace packages, distutils precedence) but the editable install's
for pth in "$BASE_SITE"/*.pth; do
  case "$(basename "$pth")" in __editable__*|*torch_mlx*) continue ;; esac
  cp "$pth" "$SITE/"
done
(cd "$WORK" && "$PY" -c "import torch_mlx" 2>/dev/null) \
  && { echo "test_wheel: torch_mlx importable before the install" >&2; exit 1; }

# 2. the install itself, what the README tells a user to run, in a copy of the checkout's files
# (tracked and untracked, not ignored ones: no build output of the checkout gets in, and the
# checkout's build/ is left alone)
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard | while IFS= read -r f; do
  if [ -e "$f" ]; then cp --parents -- "$f" "$WORK/src"; fi; done)
t0=$(date +%s)
(cd "$WORK/src" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --no-input ${PIP_ARGS:-.} 2>&1 \
  | tail -n 3)
echo "test_wheel: pip install . took $(( $(date +%s) - t0 )) s"

# 3. what the install gave
(cd "$WORK" && "$PY" - "$SITE" <<'EOF'
import importlib.metadata as md, json, os, sys
site = sys.argv[1]
import torch
import torch_mlx
from torch_mlx import _C
assert "torch_mlx" in sys.modules, "import torch did not autoload torch_mlx"
pkg = os.path.dirname(torch_mlx.__file__)
assert pkg == os.path.join(site, "torch_mlx"), f"torch_mlx imported from {pkg}, not {site}"
assert _C.__file__.startswith(pkg)
dist = md.distribution("torch-mlx")
direct = dist.read_text("direct_url.json")
assert direct is None or '"editable": true' not in direct, direct
files = sorted(str(f) for f in dist.files)
assert any(f.startswith("torch_mlx/_C") for f in files), files
info = torch.mlx.blas_info()
shims = [f for f in files if f.startswith("torch_mlx/_blas/")]
if sys.platform.startswith("linux"):
    assert info["library"] == "openblas", info
    assert shims, files
x = torch.arange(6.0).reshape(2, 3).to("mlx")
assert (x @ x.T).cpu().tolist() == [[5.0, 14.0], [14.0, 50.0]]
from vllm.platforms import current_platform
plat = type(current_platform).__module__
assert plat.startswith("vllm_metal"), plat
print("test_wheel: installed", dist.version, "requires", dist.requires)
print("test_wheel: shims", shims)
print("test_wheel: blas_info", json.dumps(info))
print("test_wheel: vLLM platform", plat)
EOF
)

# 4. tests/torch_mlx (and tools/, whose scripts some tests run), copied out of the source tree
# and run there
mkdir -p "$WORK/run/tests"
cp -r "$ROOT/tests/torch_mlx" "$WORK/run/tests/torch_mlx"
cp -r "$ROOT/tools" "$WORK/run/tools"
find "$WORK/run" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK/run"
export CI="${CI:-true}"
if [ "$#" -eq 0 ]; then set -- tests/torch_mlx; fi
"$PY" -m pytest -q -p no:cacheprovider --rootdir "$WORK/run" "$@"
