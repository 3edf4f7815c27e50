#!/usr/bin/env bash
# The README's test command: set up .venv (first run: a few minutes), build, run the test suite.
# Extra arguments go to pytest. pytest's "no tests collected" (exit code 5) fails this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "${@:-tests}"
