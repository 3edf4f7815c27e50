#!/usr/bin/env bash
# tests/torch_mlx against an ASan + UBSan build of csrc/ (torch_mlx._C and the BLAS shims).
#
#   bash tools/sanitize.sh [PYTEST ARGS...]     (default: the whole tests/torch_mlx, CI subset)
#
# 1. Builds the package with TORCH_MLX_SANITIZE=address,undefined (setup.py's build switch:
#    -fsanitize=address,undefined -fno-omit-frame-pointer -fno-wrapv -g -O1 for every csrc/ source
#    and the shims; -fno-wrapv undoes the -fwrapv of Python's extension flags, under which signed
#    overflow is defined and UBSan would not check it) out of tree, into build/sanitize/ (SANITIZE_BUILD), so the checkout's own _C is
#    untouched. SANITIZE overrides the sanitizer list.
# 2. Runs pytest with that build first on PYTHONPATH, from outside the source tree. Python itself
#    is not instrumented, so libasan is preloaded (LD_PRELOAD: ASan's runtime must come before
#    every other library; libubsan is _C's own dependency), with libstdc++ (see below).
#    Subprocesses the tests start inherit it. Options:
#    - ASAN_OPTIONS detect_leaks=0: LeakSanitizer would report the interpreter's and torch's
#      deliberate process-lifetime allocations (interned objects, registries, static caches) at
#      every exit, thousands of reports that are not ours; use-after-free, overflows, double
#      frees and the rest stay on and abort the process (halt_on_error).
#      allocator_may_return_null=1: tests that ask for impossible sizes get torch's/MLX's own
#      out-of-memory error, as without ASan, instead of ASan's abort.
#    - UBSAN_OPTIONS print_stacktrace=1, halt_on_error=1: an undefined-behaviour report stops the
#      process too, so it fails its test. (GCC's libubsan ignores log_path beside ASan and prints
#      to stderr, which pytest shows only for failing tests: without halting, a report in a
#      passing test would go unseen.)
#    ASan writes its reports to files under REPORTS (default build/sanitize/reports); pytest's
#    output is kept there too (pytest.log) and searched for UBSan's.
# 3. Reports: the pytest outcome and every sanitizer report (deduplicated by its first frame in
#    csrc/ or, failing that, its first line). Exit status: pytest's, or 1 when any report exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
SANITIZE="${SANITIZE:-address,undefined}"
OUTDIR="${SANITIZE_BUILD:-$ROOT/build/sanitize}"
REPORTS="${REPORTS:-$OUTDIR/reports}"

mkdir -p "$(dirname "$OUTDIR")"
echo "sanitize: building with TORCH_MLX_SANITIZE=$SANITIZE into $OUTDIR"
t0=$(date +%s)
(cd "$ROOT" && TORCH_MLX_SANITIZE="$SANITIZE" TORCH_DEVICE_BACKEND_AUTOLOAD=0 \
  MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build --build-base "$OUTDIR" >"$OUTDIR.log" 2>&1) \
  || { tail -n 30 "$OUTDIR.log"; exit 2; }
echo "sanitize: built in $(( $(date +%s) - t0 )) s"
LIB="$(ls -d "$OUTDIR"/lib.* | head -n1)"
ls "$LIB"/torch_mlx/_C*.so >/dev/null
ldd "$LIB"/torch_mlx/_C*.so | grep -q libasan || { echo "sanitize: _C is not instrumented" >&2; exit 2; }

PROBES="$OUTDIR/probe-reports"
rm -rf "$REPORTS" "$PROBES"; mkdir -p "$REPORTS" "$PROBES"
ASAN_LIB="$(${CC:-cc} -print-file-name=libasan.so)"
# libstdc++ beside it: ASan resolves the real __cxa_throw when it starts, and python does not
# link libstdc++ (without it the first C++ exception aborts with "real___cxa_throw != 0")
CXX_LIB="$(${CXX:-c++} -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$ASAN_LIB $CXX_LIB${LD_PRELOAD:+ $LD_PRELOAD}"
ASAN_BASE="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=0"
UBSAN_BASE="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$LIB"
export CI="${CI:-true}"
if [ "$#" -eq 0 ]; then set -- "$ROOT/tests/torch_mlx"; fi

cd "$(mktemp -d /tmp/torch-mlx-sanitize.XXXXXX)"
# The reports reach us: one deliberate error of each kind (_C._sanitizer_probe, in sanitizer
# builds only) must leave a report naming it, or "no report" below would prove nothing.
for kind in undefined address; do
  ASAN_OPTIONS="$ASAN_BASE:log_path=$PROBES/asan" UBSAN_OPTIONS="$UBSAN_BASE" \
    "$PY" -c "import torch, torch_mlx; torch_mlx._C._sanitizer_probe('$kind')" \
    >"$PROBES/$kind.out" 2>&1 && { echo "sanitize: the $kind probe did not stop" >&2; exit 2; }
done
grep -q "shift exponent 40 is too large" "$PROBES"/* 2>/dev/null \
  || { echo "sanitize: UBSan's probe left no report in $PROBES" >&2; exit 2; }
grep -q "heap-buffer-overflow" "$PROBES"/* 2>/dev/null \
  || { echo "sanitize: ASan's probe left no report in $PROBES" >&2; exit 2; }
echo "sanitize: the probes' deliberate errors were reported (UBSan and ASan work)"

export ASAN_OPTIONS="$ASAN_BASE:log_path=$REPORTS/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="$UBSAN_BASE:${UBSAN_OPTIONS:-}"
"$PY" - <<'EOF2'
import torch, torch_mlx, os
assert os.environ["PYTHONPATH"] in torch_mlx._C.__file__, torch_mlx._C.__file__
print("sanitize: torch_mlx from", os.path.dirname(torch_mlx.__file__), "| BLAS",
      torch.mlx.blas_info()["library"])
EOF2
status=0
t0=$(date +%s)
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$REPORTS/pytest.log"
status=${PIPESTATUS[0]}
set -e
echo "sanitize: pytest exit status $status in $(( $(date +%s) - t0 )) s"

# every report, once per distinct place
unset LD_PRELOAD
rc=0
"$PY" - "$REPORTS" <<'EOF' || rc=$?
import collections, glob, os, re, sys
reports = sorted(glob.glob(os.path.join(sys.argv[1], "*")))  # ASan's files and pytest.log
places = collections.Counter()
example = {}
for path in reports:
    text = open(path, errors="replace").read()
    for block in re.split(r"\n(?==+\n|\S+:\d+:\d+: runtime error)", text):
        if "ERROR: AddressSanitizer" not in block and "runtime error:" not in block:
            continue  # pytest's own output between reports
        frame = re.search(r"#\d+ .* (\S*csrc/\S+)", block)
        head = next((l for l in block.splitlines() if "ERROR" in l or "runtime error" in l),
                    block.strip().splitlines()[0])
        key = (frame.group(1) if frame else "") + " | " + re.sub(r"0x[0-9a-f]+", "0x?", head)
        places[key] += 1
        example.setdefault(key, block[:3000])
print(f"sanitize: {len(places)} distinct report(s), {sum(places.values())} in all")
for key, n in places.most_common():
    print(f"--- {n}x {key}\n{example[key]}")
sys.exit(1 if places else 0)
EOF
exit $(( status ? status : rc ))
