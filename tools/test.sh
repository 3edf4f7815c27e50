#!/usr/bin/env bash
# The README's test command: set up .venv (first run: a few minutes), build, run the test suite.
# Extra arguments go to pytest (one run). Without them the torch_mlx and vllm_metal suites run in
# separate pytest processes: OpInfo's test utilities import numba/llvmlite, whose objects break
# vLLM's Triton-override scan of sys.modules in the same process, and each suite gets a fresh
# MLX runtime. pytest's "no tests collected" (exit code 5) fails this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
if [ "$#" -gt 0 ]; then
  exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
fi
# both suites run; the script fails if either fails (or collects nothing)
status=0
"$ROOT/.venv/bin/python" -m pytest -q tests/torch_mlx || status=$?
"$ROOT/.venv/bin/python" -m pytest -q tests/vllm_metal || status=$((status ? status : $?))
exit "$status"
