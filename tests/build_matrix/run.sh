#!/usr/bin/env bash
# Build-matrix job: the configurations users build that the main CI job does
# not, each built in its own scratch copy of the tree (the in-place build is
# untouched) and each running the kernel tests under the derandomized
# hypothesis profile. Every job is timed; any failure fails the script.
#
#   serial    FASTATTN_OPENMP=0 with the current Python (no OpenMP runtime)
#   clang     CC=clang with the current Python (clang's OpenMP, libomp)
#   py-oldest the oldest Python that pyproject.toml's requires-python admits
#   py-newest the newest Python this machine has
#
#   bash tests/build_matrix/run.sh                    # every job
#   BUILD_MATRIX_JOBS="serial clang" bash tests/build_matrix/run.sh
#
# The Python jobs build a fresh venv from pyenv's interpreters
# (PY_OLDEST / PY_NEWEST override the paths) and install the build and test
# requirements from the package index; clang is installed with apt-get when
# missing (CI runs as root on Debian).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python}"
JOBS="${BUILD_MATRIX_JOBS:-serial clang py-oldest py-newest}"
PY_OLDEST="${PY_OLDEST:-$HOME/.pyenv/versions/3.10.13/bin/python3.10}"
PY_NEWEST="${PY_NEWEST:-$HOME/.pyenv/versions/3.13.0/bin/python3.13}"
# the C kernels against the oracle: every public kernel, every ISA level,
# 1 and N threads, layouts, numerics; the layer and the peers are left to
# the main job, which runs them once
KERNEL_TESTS="${BUILD_MATRIX_TESTS:-tests/test_attention.py tests/test_masked_softmax.py tests/test_half_dtypes.py tests/test_numerics.py tests/test_rotary.py tests/test_heads.py tests/test_position.py tests/test_sequence_mask.py}"
# what the kernel tests import, beyond the package's own dependencies
TEST_REQS=("pytest>=7" "hypothesis>=6")
BUILD_REQS=("numpy>=2.0" "scipy>=1.10" "Cython>=3.0" "setuptools>=77")

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
declare -a SUMMARY=()

copy_tree() {  # copy_tree DEST: the tracked and untracked, non-ignored files
    mkdir -p "$1"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
        xargs -0 cp --parents -t "$1")
}

# run_job NAME PYTHON EXPECT_OPENMP [ENV=VALUE ...]: build the scratch copy
# with PYTHON and the given environment, check the build is what was asked
# for, run the kernel tests
run_job() {
    local name="$1" py="$2" expect_omp="$3"; shift 3
    local src="$WORK/$name" start=$SECONDS
    echo "== [$name] copying the tree to $src"
    copy_tree "$src"
    echo "== [$name] building: $* $("$py" --version)"
    (cd "$src" && env "$@" "$py" setup.py -q build_ext --inplace > "$WORK/$name.build.log" 2>&1) ||
        { cat "$WORK/$name.build.log"; echo "== [$name] FAIL: build"; return 1; }
    (cd "$src" && "$py" - "$expect_omp" "$name" <<'PYEOF'
import os, sys
import fastattn
expect_omp, name = sys.argv[1] == "1", sys.argv[2]
cfg = fastattn.show_config(print_output=False)
assert fastattn.__file__.startswith(os.getcwd()), fastattn.__file__
assert cfg["openmp"] == expect_omp, f"openmp={cfg['openmp']}, expected {expect_omp}"
if name == "clang":
    assert "clang" in cfg["compiler"], cfg["compiler"]
print(f"== [{name}] built: python {cfg['python']}, numpy {cfg['numpy']}, "
      f"{cfg['compiler']}, openmp={cfg['openmp']}, isa {cfg['isa_compiled']}")
PYEOF
    ) || { echo "== [$name] FAIL: wrong build"; return 1; }
    echo "== [$name] kernel tests (HYPOTHESIS_PROFILE=$HYPOTHESIS_PROFILE)"
    # shellcheck disable=SC2086
    if (cd "$src" && "$py" -m pytest -q -p no:cacheprovider $KERNEL_TESTS > "$WORK/$name.tests.log" 2>&1); then
        tail -1 "$WORK/$name.tests.log"
    else
        tail -80 "$WORK/$name.tests.log"; echo "== [$name] FAIL: tests"; return 1
    fi
    echo "== [$name] build and tests: $((SECONDS - start)) s"
}

# make_venv NAME INTERPRETER: a fresh venv with the build and test
# requirements; prints the venv's python
make_venv() {
    local name="$1" interp="$2" venv="$WORK/venv-$1"
    [ -x "$interp" ] || { echo "== [$name] FAIL: no interpreter at $interp" >&2; return 1; }
    "$interp" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    # --only-binary: a dependency without a wheel for this Python is a
    # finding to report, not something to compile from source here
    "$venv/bin/python" -m pip install -q --only-binary=:all: "${BUILD_REQS[@]}" "${TEST_REQS[@]}" >&2 ||
        { echo "== [$name] FAIL: no wheels of the requirements for $("$interp" --version)" >&2; return 1; }
    echo "$venv/bin/python"
}

status=0
for job in $JOBS; do
    t0=$SECONDS
    case "$job" in
        serial)
            run_job serial "$PY" 0 FASTATTN_OPENMP=0 || status=1 ;;
        clang)
            if ! command -v clang >/dev/null 2>&1; then
                echo "== [clang] installing clang and its OpenMP runtime"
                apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libomp-dev >/dev/null
            fi
            # LDSHARED too: the interpreter's own link line names gcc
            run_job clang "$PY" 1 CC=clang LDSHARED="clang -shared" || status=1 ;;
        py-oldest|py-newest)
            interp="$PY_OLDEST"; [ "$job" = py-newest ] && interp="$PY_NEWEST"
            if venv_py="$(make_venv "$job" "$interp")"; then
                run_job "$job" "$venv_py" 1 || status=1
            else
                status=1
            fi ;;
        *) echo "unknown job $job"; status=1 ;;
    esac
    echo "== [$job] took $((SECONDS - t0)) s"
    SUMMARY+=("$job total (venv + build + tests): $((SECONDS - t0)) s")
done
echo "== build matrix summary"
printf '   %s\n' "${SUMMARY[@]}"
exit $status
