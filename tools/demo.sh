#!/usr/bin/env bash
# The README's main-job command: set up .venv, build, serve a tiny model with `vllm serve`
# on the Metal platform and ask it a question (--keep-serving keeps the server up).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" "$ROOT/tools/serve_demo.py" "$@"
