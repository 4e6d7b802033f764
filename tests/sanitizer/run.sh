#!/usr/bin/env bash
# Sanitizer job: build fastattn's C kernels with AddressSanitizer and
# UndefinedBehaviorSanitizer in a scratch copy of the tree (the normal
# in-place build is untouched), run the kernel tests under it with the ASan
# runtime preloaded, fail on any sanitizer report, then show that a planted
# out-of-bounds write is caught. See docs/reliability.md.
#
#   bash tests/sanitizer/run.sh            # from the repository root, in the venv
#   SANITIZER_TESTS="tests/test_x.py ..." bash tests/sanitizer/run.sh
#
# Needs gcc with libasan/libubsan, and Cython + setuptools + numpy in the
# current Python (installed here with pip if missing).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python}"
# the kernel tests: every public kernel against the oracle (layouts, masks,
# threads, ISA levels), numerics, bad inputs, memory/aliasing, concurrency,
# and the projections of csrc/linear.c (edge cases, RoPE epilogue)
SANITIZER_TESTS="${SANITIZER_TESTS:-tests/test_properties.py tests/test_numerics.py tests/test_half_dtypes.py tests/test_bad_input.py tests/test_memory.py tests/test_concurrency.py tests/test_attention.py tests/test_mha.py::test_linear_edge_cases tests/test_mha.py::test_blas_matmul_rope_epilogue}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "== sanitizer job: copying the tree to $WORK/src"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$WORK/src")

"$PY" -c "import Cython, setuptools" 2>/dev/null ||
    "$PY" -m pip install -q "Cython>=3.0" "setuptools>=77"

echo "== building with FASTATTN_SANITIZE=address,undefined"
(cd "$WORK/src" && FASTATTN_SANITIZE=address,undefined "$PY" setup.py -q build_ext --inplace \
    > "$WORK/build.log" 2>&1) || { cat "$WORK/build.log"; exit 1; }

ASAN_LIB="$(gcc -print-file-name=libasan.so)"
export LD_PRELOAD="$ASAN_LIB"
# leaks: CPython itself "leaks" at exit; allocator_may_return_null: huge
# shapes must become MemoryError, as in a normal build
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:handle_segv=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-sanitize}"
cd "$WORK/src"

"$PY" - <<'PYEOF'
import fastattn, os
cfg = fastattn.show_config(print_output=False)
assert fastattn.__file__.startswith(os.getcwd()), fastattn.__file__
assert "-fsanitize=address,undefined" in cfg["flags"], cfg["flags"]
print("== sanitized build:", fastattn.__file__)
PYEOF

echo "== kernel tests under ASan+UBSan: $SANITIZER_TESTS"
set +e
"$PY" -m pytest -q -p no:cacheprovider -m "not no_sanitizer" $SANITIZER_TESTS 2>&1 | tee "$WORK/tests.log"
status=${PIPESTATUS[0]}
set -e
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$WORK/tests.log"; then
    echo "== FAIL: sanitizer report(s) above"
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "== FAIL: kernel tests failed under the sanitizer build (status $status)"
    exit "$status"
fi
echo "== no sanitizer reports"

echo "== planted out-of-bounds write (must be caught)"
set +e
PYTHONPATH="$WORK/src" "$PY" tests/sanitizer/planted_oob.py > "$WORK/oob.log" 2>&1
oob=$?
set -e
if [ "$oob" -eq 0 ] || ! grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$WORK/oob.log" ||
    ! grep -q "WRITE of size" "$WORK/oob.log"; then
    cat "$WORK/oob.log"
    echo "== FAIL: the planted out-of-bounds write was not caught"
    exit 1
fi
grep -E "ERROR: AddressSanitizer|WRITE of size|#[0-3] " "$WORK/oob.log" | head -6
echo "== planted out-of-bounds write caught (exit status $oob)"
