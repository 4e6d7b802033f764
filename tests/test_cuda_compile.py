"""CPU-only checks of the CUDA sources: they compile with nvcc for sm_80 and
sm_90, link against cudart and cuBLAS without undefined symbols, and the C
ABI answers with status codes (never a crash) when no GPU is present.

These run wherever nvcc is on the PATH, GPU or not, so a build break in
csrc/cuda/ is caught on CPU-only machines. They skip with the reason when
nvcc (or, for blas.cu and the link check, cuBLAS) is missing.
"""

import ast
import ctypes
import glob
import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")
SOURCES = sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu")))
ARCHS = ["80", "90"]
NVCC = shutil.which("nvcc")
# the flags setup.py uses, minus the architectures (one per test here)
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC"]

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH: CUDA sources not compile-checked")


def _toolkit_root():
    root = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if root:
        return root
    dry = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=120)
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line.split("=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))


def _search_dirs(kind):
    """Toolkit, then nvidia-* wheel, folders for 'include' or 'lib'."""
    root = _toolkit_root()
    target = os.path.join("targets", f"{platform.machine()}-linux")
    if kind == "include":
        dirs = [os.path.join(root, "include"), os.path.join(root, target, "include")]
    else:
        dirs = [os.path.join(root, d) for d in ("lib64", "lib", os.path.join(target, "lib"))]
    for entry in sys.path:
        for sub in ("nvidia/cu13", "nvidia/cublas", "nvidia/cuda_runtime"):
            d = os.path.join(entry or ".", sub, kind)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def _find(kind, patterns):
    for d in _search_dirs(kind):
        for pattern in patterns:
            hits = sorted(glob.glob(os.path.join(d, pattern)))
            if hits:
                return hits[0]
    return None


def _cublas_include():
    header = _find("include", ["cublas_v2.h"])
    return os.path.dirname(header) if header else None


def _compile(src, arch, out_dir):
    obj = os.path.join(out_dir, f"{os.path.basename(src)[:-3]}_sm{arch}.o")
    args = [NVCC, "-c", src, "-o", obj] + NVCC_FLAGS + [
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I" + CUDA_SRC]
    inc = _cublas_include()
    if inc:
        args.append("-I" + inc)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for {os.path.basename(src)} sm_{arch}:\n{proc.stderr}"
    return obj


def test_sources_exist():
    names = {os.path.basename(p) for p in SOURCES}
    assert {"softmax.cu", "copy.cu", "position.cu", "blas.cu", "attention.cu", "runtime.cu"} <= names
    assert os.path.exists(os.path.join(CUDA_SRC, "fastattn_cuda.h"))


def test_no_fast_math():
    """--use_fast_math (or the approximate intrinsics it selects) would flush
    denormals and approximate exp/sin: it breaks -inf masking and the oracle
    tolerances."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    flags = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("CUDA_FLAGS", "CUDA_GENCODE", "BASE_CFLAGS"):
                flags[node.targets[0].id] = ast.literal_eval(node.value)
    assert "CUDA_FLAGS" in flags and "CUDA_GENCODE" in flags
    for name, values in flags.items():
        for value in values:
            assert "fast_math" not in value and "fast-math" not in value, (name, value)
    gencode = " ".join(flags["CUDA_GENCODE"])
    assert "sm_80" in gencode and "sm_90" in gencode
    for path in SOURCES:
        with open(path) as f:
            text = f.read()
        for intrinsic in ("__expf(", "__sinf(", "__cosf(", "__powf(", "__logf("):
            assert intrinsic not in text, f"{os.path.basename(path)} uses {intrinsic}"


@pytest.fixture(scope="module")
def object_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cuda_objects"))


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_nvcc_compiles(src, arch, object_dir):
    if os.path.basename(src) == "blas.cu" and _cublas_include() is None:
        pytest.skip("cublas_v2.h not found (toolkit or nvidia-cublas wheel): blas.cu not compile-checked")
    obj = _compile(src, arch, object_dir)
    assert os.path.getsize(obj) > 0


class View4(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64 * 4)]


class SdpaArgs(ctypes.Structure):
    class Mask(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("kind", ctypes.c_int), ("stride", ctypes.c_int64 * 4)]

    class Lengths(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("stride_b", ctypes.c_int64), ("stride_m", ctypes.c_int64)]

    _fields_ = [("dtype", ctypes.c_int)] + [(n, ctypes.c_int64) for n in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv")] + [
        ("scale", ctypes.c_double), ("causal", ctypes.c_int), ("mask", Mask), ("key_len", Lengths),
        ("query_len", Lengths), ("alibi_slopes", ctypes.c_void_p), ("alibi_offset", ctypes.c_int64),
        ("key_extent", ctypes.POINTER(ctypes.c_int64))]


@pytest.fixture(scope="module")
def abi_library(object_dir):
    """The CUDA sources linked into one shared library, loaded with ctypes."""
    if NVCC is None:
        pytest.skip("nvcc is not on the PATH")
    cublas = _find("lib", ["libcublas.so", "libcublas.so.[0-9]*"])
    cudart = _find("lib", ["libcudart.so", "libcudart.so.[0-9]*"])
    if _cublas_include() is None or cublas is None or cudart is None:
        pytest.skip("cuBLAS or cudart not found: link check skipped")
    objects = []
    for src in SOURCES:
        obj = os.path.join(object_dir, f"{os.path.basename(src)[:-3]}_sm80.o")
        if not os.path.exists(obj):
            obj = _compile(src, "80", object_dir)
        objects.append(obj)
    lib = os.path.join(object_dir, "libfastattn_cuda_check.so")
    rpath = ":".join(sorted({os.path.dirname(os.path.realpath(p)) for p in (cublas, cudart)}))
    proc = subprocess.run(
        ["g++", "-shared", "-o", lib] + objects + [cudart, cublas, "-Wl,--no-undefined",
                                                    "-Wl,-rpath," + rpath, "-lstdc++"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"link failed (undefined symbol?):\n{proc.stderr}"
    handle = ctypes.CDLL(lib)
    handle.fa_cuda_last_error.restype = ctypes.c_char_p
    i32, i64, dbl, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    handle.fa_cuda_masked_softmax.argtypes = [i32, View4, View4, i64, i64, i64, i64, dbl, ptr, ptr, ptr,
                                              i32, ptr]
    handle.fa_cuda_copy.argtypes = [i32, i32, View4, View4, i64, i64, i64, i64, ptr]
    handle.fa_cuda_append_rows.argtypes = [i32, View4, View4, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    handle.fa_cuda_apply_rotary.argtypes = [i32, View4, View4, i64, i64, i64, i64, View4, i32, dbl, ptr]
    handle.fa_cuda_position_encoding.argtypes = [i32, ptr, i64, i64, i64, i32, dbl, dbl, i64, ptr]
    handle.fa_cuda_linear.argtypes = [ptr, i32, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr]
    handle.fa_cuda_sdpa.argtypes = [ptr, ctypes.POINTER(SdpaArgs), ptr, ptr, ptr, ptr, ptr, i64, ptr]
    return handle


FA_CUDA_OK, FA_CUDA_ERR_INVALID, FA_CUDA_ERR_OVERFLOW = 0, 1, 2
FA_CUDA_ERR_NO_DEVICE = 7


def test_device_query_returns_a_status(abi_library):
    count = ctypes.c_int(-1)
    status = abi_library.fa_cuda_device_count(ctypes.byref(count))
    if status == FA_CUDA_OK:
        assert count.value >= 0
    else:
        # no driver / no GPU: a status and a description, never an abort
        assert status in (FA_CUDA_ERR_NO_DEVICE, 4), status
        assert b"cudaGetDeviceCount" in abi_library.fa_cuda_last_error()
    rt, drv = ctypes.c_int(), ctypes.c_int()
    assert abi_library.fa_cuda_versions(ctypes.byref(rt), ctypes.byref(drv)) == FA_CUDA_OK
    assert rt.value >= 12000


def test_abi_rejects_bad_arguments_before_touching_the_gpu(abi_library):
    lib = abi_library
    fake = View4(0x1000, (4, 4, 4, 1))
    # negative size
    assert lib.fa_cuda_masked_softmax(0, fake, fake, 1, 1, -2, 4, 1.0, None, None, None,
                                      0, None) == FA_CUDA_ERR_OVERFLOW
    assert b"negative" in lib.fa_cuda_last_error()
    # unknown causal mode and dtype
    assert lib.fa_cuda_masked_softmax(0, fake, fake, 1, 1, 2, 4, 1.0, None, None, None,
                                      7, None) == FA_CUDA_ERR_INVALID
    assert lib.fa_cuda_masked_softmax(9, fake, fake, 1, 1, 2, 4, 1.0, None, None, None,
                                      0, None) == FA_CUDA_ERR_INVALID
    # sizes whose product overflows int64
    big = 1 << 40
    assert lib.fa_cuda_copy(0, 0, fake, fake, big, big, 1, 1, None) == FA_CUDA_ERR_OVERFLOW
    # conversion to an integer type is not offered
    assert lib.fa_cuda_copy(8, 0, fake, fake, 1, 1, 1, 1, None) == FA_CUDA_ERR_INVALID
    # empty work is a no-op that succeeds without a device
    assert lib.fa_cuda_copy(0, 0, fake, fake, 0, 3, 3, 3, None) == FA_CUDA_OK
    # odd head dim for RoPE
    assert lib.fa_cuda_apply_rotary(0, fake, fake, 1, 1, 1, 3, fake, 0, 1e4, None) == FA_CUDA_ERR_INVALID
    # bad PE layout and timescales
    assert lib.fa_cuda_position_encoding(0, 0x1000, 4, 2, 4, 5, 1.0,
                                         1e4, 0, None) == FA_CUDA_ERR_INVALID
    assert lib.fa_cuda_position_encoding(0, 0x1000, 4, 2, 4, 0, -1.0,
                                         1e4, 0, None) == FA_CUDA_ERR_INVALID
    # the KV-cache causal mode (3) passes the checks; 4 does not
    assert lib.fa_cuda_masked_softmax(0, fake, fake, 1, 1, 0, 4, 1.0, None, None, None,
                                      3, None) == FA_CUDA_OK
    assert lib.fa_cuda_masked_softmax(0, fake, fake, 1, 1, 2, 4, 1.0, None, None, None,
                                      4, None) == FA_CUDA_ERR_INVALID
    # KV-cache append: float only, sizes checked, empty work and NULL row tables
    p = 0x1000
    assert lib.fa_cuda_append_rows(8, fake, fake, 1, 1, 1, 1, 4, p, p, None) == FA_CUDA_ERR_INVALID
    assert lib.fa_cuda_append_rows(0, fake, fake, 1, -1, 1, 1, 4, p, p, None) == FA_CUDA_ERR_OVERFLOW
    assert lib.fa_cuda_append_rows(1, fake, fake, big, big, 1, 1, 4, p, p, None) == FA_CUDA_ERR_OVERFLOW
    assert lib.fa_cuda_append_rows(0, fake, fake, 2, 2, 0, 4, 4, None, None, None) == FA_CUDA_OK
    assert lib.fa_cuda_append_rows(0, fake, fake, 2, 2, 3, 4, 0, None, None, None) == FA_CUDA_OK
    assert lib.fa_cuda_append_rows(0, fake, fake, 2, 2, 3, 4, 4, None, p, None) == FA_CUDA_ERR_INVALID
    assert b"NULL" in lib.fa_cuda_last_error()
    # linear: row stride shorter than a row
    assert lib.fa_cuda_linear(None, 0, 0x1000, 2, 0x1000, 4, None,
                              0x1000, 4, 3, 4, 4, None) == FA_CUDA_ERR_INVALID


def test_sdpa_abi_checks(abi_library):
    lib = abi_library
    args = SdpaArgs()
    args.dtype, args.B, args.H, args.Hkv, args.Lq, args.Lk, args.D, args.Dv = 0, 2, 6, 4, 3, 5, 8, 8
    args.scale = 0.5
    p = 0x1000
    # H not a multiple of Hkv
    assert lib.fa_cuda_sdpa(p, ctypes.byref(args), p, p, p, p, p, 2, None) == FA_CUDA_ERR_INVALID
    assert b"multiple" in lib.fa_cuda_last_error()
    # scores_batch out of range
    args.Hkv = 3
    assert lib.fa_cuda_sdpa(p, ctypes.byref(args), p, p, p, p, p, 3, None) == FA_CUDA_ERR_INVALID
    # key extent beyond Lk
    extent = (ctypes.c_int64 * 2)(5, 6)
    args.key_extent = extent
    assert lib.fa_cuda_sdpa(p, ctypes.byref(args), p, p, p, p, p, 2, None) == FA_CUDA_ERR_INVALID
    assert b"key_extent" in lib.fa_cuda_last_error()
    # no query rows: nothing to do, no device needed
    args.key_extent = None
    args.Lq = 0
    assert lib.fa_cuda_sdpa(p, ctypes.byref(args), p, p, p, p, p, 2, None) == FA_CUDA_OK
