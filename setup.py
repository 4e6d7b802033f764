"""Build fastattn: C kernels in csrc/ behind one Cython extension.

Each group of C files is compiled with its own flags and linked into the
extension as extra objects (the cython-blis approach):

* baseline files (drivers, dispatch, the scalar kernels): no ISA flags, so the
  package imports on any x86-64 (or aarch64) CPU;
* ``*_avx2.c``: ``-mavx2 -mfma -mf16c``;
* ``*_avx512.c``: ``-mavx2 -mfma -mf16c -mavx512f -mavx512dq -mavx512bw -mavx512vl``
  (GCC's ``-mavx512f`` does not imply FMA);
* ``*_avx512bf16.c``: the avx512 flags plus ``-mavx512bf16 -mf16c``;
* ``*_amx.c``: the avx512bf16 flags plus ``-mamx-tile -mamx-bf16``, where the
  compiler has them (GCC 11, clang 12); without them the amx level is not
  built and ``FA_HAVE_AMX_KERNELS`` stays undefined;
* a file listed in ``FILE_CFLAGS`` adds its flags to its group's.

The CPU is detected at import (CPUID + XGETBV) and the best compiled level is
selected; ``FASTATTN_ISA`` lowers it. No host-specific tuning flag (the wheel
must run on other CPUs) and no fast-math flag (it breaks -inf masking and NaN
propagation).

Environment switches:

``FASTATTN_OPENMP=0``
    build serially even when the compiler supports OpenMP.
``FASTATTN_SANITIZE=address,undefined``
    build the C code with ``-fsanitize=...`` (see docs/reliability.md).
``FASTATTN_CYTHON_DEBUG=1``
    Cython bounds and wraparound checks on.
``FASTATTN_CUDA=1``
    also build the optional GPU extension ``fastattn._cuda`` from
    ``csrc/cuda/*.cu`` with nvcc, linked against cuBLAS and the CUDA runtime
    (see docs/gpu.md). Without it nothing CUDA is looked for or built.
"""

import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")

IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")

# -O3 for the vectoriser; C11 for _Pragma, static inline and __has_include.
# -fno-math-errno lets sqrt/nearbyint inline; it changes no results.
# -ffp-contract=off: a * b + c rounds twice with every compiler (GCC's ISO
# mode already does so; clang would fuse it where the ISA has FMA), so the
# scalar kernels round as fa_math.h and the accuracy notes say.
BASE_CFLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wextra",
               "-Wno-unused-function"]
ISA_CFLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512dq", "-mavx512bw",
               "-mavx512vl"],
    "avx512bf16": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl",
                   "-mavx512bf16", "-mf16c"],
}
ISA_CFLAGS["amx"] = ISA_CFLAGS["avx512bf16"] + ["-mamx-tile", "-mamx-bf16"]
GROUPS = ("base", "avx2", "avx512", "avx512bf16", "amx")
# Flags a single file adds to its group's (none at present: F16C, which the
# half-precision conversions use, is part of the avx2 level, cpu_features.c).
FILE_CFLAGS = {}


def _env_flag(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _source_groups():
    """Map each flag group to its C files."""
    all_c = sorted(glob.glob(os.path.join(CSRC, "*.c")))
    groups = {name: [] for name in GROUPS}
    for path in all_c:
        stem = os.path.basename(path)[:-2]
        if stem.endswith("_amx"):
            groups["amx"].append(path)
        elif stem.endswith("_avx512bf16"):
            groups["avx512bf16"].append(path)
        elif stem.endswith("_avx512"):
            groups["avx512"].append(path)
        elif stem.endswith("_avx2"):
            groups["avx2"].append(path)
        else:
            groups["base"].append(path)
    if not IS_X86:
        for name in GROUPS[1:]:
            groups[name] = []
    return groups


class FastattnBuildExt(build_ext):
    """build_ext that compiles csrc/ per flag group and probes for OpenMP."""

    def _probe_openmp(self):
        if not _env_flag("FASTATTN_OPENMP", True):
            print("fastattn: FASTATTN_OPENMP=0, building without OpenMP")
            return []
        flag = "-fopenmp"
        tmp = tempfile.mkdtemp(prefix="fastattn-omp-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(
                    "#include <omp.h>\n"
                    "int main(void) { int n = 0;\n"
                    "#pragma omp parallel reduction(+:n)\n"
                    "n += omp_get_num_threads() > 0;\n"
                    "return n > 0 ? 0 : 1; }\n"
                )
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            self.compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=[flag])
            subprocess.run([os.path.join(tmp, "probe")], check=True, timeout=60)
        except Exception as exc:  # any failure means "no usable OpenMP"
            print(
                "fastattn: WARNING: OpenMP not usable with this compiler "
                f"({type(exc).__name__}); building serially",
                file=sys.stderr,
            )
            return []
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [flag]

    def _compiler_accepts(self, flags):
        """Whether the C compiler compiles a file with these flags."""
        tmp = tempfile.mkdtemp(prefix="fastattn-flags-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("int fastattn_probe(void) { return 0; }\n")
            self.compiler.compile([src], output_dir=tmp, extra_postargs=BASE_CFLAGS + flags)
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def build_extension(self, ext):
        if ext.name == "fastattn._cuda":
            # objects before the libraries they use (matters under --as-needed)
            ext.extra_objects = _compile_cuda_sources(self) + list(ext.extra_objects or [])
        if ext.name != "fastattn._kernels":
            return super().build_extension(ext)
        omp = self._probe_openmp()
        sanitize = os.environ.get("FASTATTN_SANITIZE", "").strip()
        san_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []

        groups = _source_groups()
        macros = [("FA_HAVE_X86_KERNELS", "1")] if IS_X86 else []
        if groups["amx"]:
            if self._compiler_accepts(ISA_CFLAGS["amx"]):
                macros.append(("FA_HAVE_AMX_KERNELS", "1"))
            else:
                print("fastattn: the compiler has no -mamx-tile/-mamx-bf16; building without "
                      "the amx level", file=sys.stderr)
                groups["amx"] = []
        cfg_dir = os.path.join(self.build_temp, "fastattn_config")
        os.makedirs(cfg_dir, exist_ok=True)
        cc = " ".join(self.compiler.compiler_so[:1]) if hasattr(self.compiler, "compiler_so") else "cc"
        try:
            version = subprocess.run(
                [self.compiler.compiler_so[0], "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0]
        except Exception:
            version = cc
        flag_text = "; ".join(
            f"{name}: {' '.join(BASE_CFLAGS + ISA_CFLAGS.get(name, []) + omp + san_flags)}"
            for name in GROUPS
            if groups[name]
        )
        with open(os.path.join(cfg_dir, "fa_build_config.h"), "w") as f:
            f.write(f"#define FA_BUILD_COMPILER {_c_string(version)}\n")
            f.write(f"#define FA_BUILD_FLAGS {_c_string(flag_text)}\n")

        objects = []
        for name, sources in groups.items():
            # one compile call per distinct flag list (the group's, or the
            # group's plus a file's FILE_CFLAGS)
            batches = {}
            for src in sources:
                extra = tuple(FILE_CFLAGS.get(os.path.basename(src), ()))
                batches.setdefault(extra, []).append(src)
            for extra, batch in batches.items():
                objects += self.compiler.compile(
                    batch,
                    output_dir=self.build_temp,
                    macros=macros,
                    include_dirs=[CSRC, cfg_dir],
                    extra_postargs=BASE_CFLAGS + ISA_CFLAGS.get(name, []) + list(extra) + omp
                    + san_flags,
                    depends=glob.glob(os.path.join(CSRC, "*.h")),
                )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        ext.extra_compile_args = list(ext.extra_compile_args or []) + omp + san_flags
        ext.extra_link_args = list(ext.extra_link_args or []) + omp + san_flags
        ext.depends = list(ext.depends or []) + sorted(glob.glob(os.path.join(CSRC, "*")))
        super().build_extension(ext)


def _c_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- optional GPU extension (FASTATTN_CUDA=1) ---------------------------------

CUDA_SRC = os.path.join("csrc", "cuda")
# sm_80 machine code also runs on sm_86/sm_89 (same major version); sm_90 is
# Hopper; the compute_90 PTX lets the driver JIT for anything newer.
CUDA_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
# C++17, and never --use_fast_math: it flushes denormals and uses approximate
# exp/sin, which breaks -inf masking and the 1e-5 / 1e-12 tolerances.
CUDA_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC"]


def _cuda_fail(what, looked):
    raise SystemExit(
        f"fastattn: FASTATTN_CUDA=1 but {what} was not found.\n"
        f"  looked in: {', '.join(looked) or '(nowhere)'}\n"
        "  Install the CUDA toolkit (nvcc, cudart) and cuBLAS, or set CUDA_HOME;\n"
        "  cuBLAS and cudart may also come from the nvidia-cublas and\n"
        "  nvidia-cuda-runtime wheels (then build with --no-build-isolation).\n"
        "  See docs/gpu.md. Unset FASTATTN_CUDA to build the CPU package only."
    )


def _find_nvcc():
    looked = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            path = os.path.join(root, "bin", "nvcc")
            looked.append(path)
            if os.access(path, os.X_OK):
                return path, root
    path = shutil.which("nvcc")
    looked.append("nvcc on PATH")
    if path is None:
        looked.append("/usr/local/cuda/bin/nvcc")
        path = "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None
    if path is None:
        _cuda_fail("nvcc (the CUDA compiler)", looked)
    # nvcc may be a wrapper script: ask it where its toolkit is.
    root = os.path.dirname(os.path.dirname(os.path.realpath(path)))
    try:
        dry = subprocess.run([path, "--dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if line.startswith("#$ TOP="):
                root = os.path.normpath(line.split("=", 1)[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return path, root


def _wheel_roots():
    """Where the nvidia-* wheels put headers and libraries (CUDA 13 wheels
    share nvidia/cu13; CUDA 12 wheels use one folder per library)."""
    roots = []
    for entry in sys.path:
        for sub in ("nvidia/cu13", "nvidia/cublas", "nvidia/cuda_runtime"):
            path = os.path.join(entry or ".", sub)
            if os.path.isdir(path) and path not in roots:
                roots.append(path)
    return roots


def _find_file(dirs, names):
    for d in dirs:
        for name in names:
            hits = sorted(glob.glob(os.path.join(d, name)))
            if hits:
                return hits[0]
    return None


def _find_cuda_toolchain():
    """nvcc, include folders and the cudart/cuBLAS libraries, or SystemExit
    naming exactly what is missing."""
    nvcc, root = _find_nvcc()
    target = f"{platform.machine()}-linux"
    tk_inc = [os.path.join(root, "include"), os.path.join(root, "targets", target, "include")]
    tk_lib = [os.path.join(root, d) for d in ("lib64", "lib", os.path.join("targets", target, "lib"))]
    wheels = _wheel_roots()
    inc_dirs = tk_inc + [os.path.join(w, "include") for w in wheels]
    lib_dirs = tk_lib + [os.path.join(w, "lib") for w in wheels]

    found = {}
    for header in ("cuda_runtime.h", "cublas_v2.h"):
        path = _find_file(inc_dirs, [header])
        if path is None:
            _cuda_fail(f"{header} ({'cuBLAS' if 'cublas' in header else 'CUDA runtime'} header)", inc_dirs)
        found[header] = os.path.dirname(path)
    libs = []
    for lib, what in (("cudart", "the CUDA runtime library"), ("cublas", "the cuBLAS library")):
        # the unversioned name when a -dev package provides it, else the
        # versioned one a wheel ships (linked by path; its SONAME is recorded)
        path = _find_file(lib_dirs, [f"lib{lib}.so", f"lib{lib}.so.[0-9]*"])
        if path is None:
            _cuda_fail(f"lib{lib}.so ({what})", lib_dirs)
        libs.append(path)
    rpaths = []
    for path in libs:
        d = os.path.dirname(os.path.realpath(path))
        if d not in rpaths:
            rpaths.append(d)
        # wheels live in site-packages beside fastattn/: keep working if moved
        for marker in ("nvidia/cu13", "nvidia/cublas", "nvidia/cuda_runtime"):
            if marker + "/lib" in d.replace(os.sep, "/"):
                rel = "$ORIGIN/../" + marker + "/lib"
                if rel not in rpaths:
                    rpaths.append(rel)
    includes = []
    for d in found.values():
        if d not in includes:
            includes.append(d)
    print(f"fastattn: building fastattn._cuda with {nvcc}; cudart {libs[0]}; cuBLAS {libs[1]}")
    return {"nvcc": nvcc, "include_dirs": includes, "libraries": libs, "rpaths": rpaths}


_CUDA_TOOLCHAIN = None


def _compile_cuda_sources(cmd):
    """Compile csrc/cuda/*.cu with nvcc into objects for the _cuda extension."""
    tc = _CUDA_TOOLCHAIN
    out_dir = os.path.join(cmd.build_temp, "cuda")
    os.makedirs(out_dir, exist_ok=True)
    headers = glob.glob(os.path.join(CUDA_SRC, "*.h"))
    objects = []
    for src in sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu"))):
        obj = os.path.join(out_dir, os.path.basename(src)[:-3] + ".o")
        stale = cmd.force or not os.path.exists(obj) or any(
            os.path.getmtime(dep) > os.path.getmtime(obj) for dep in [src] + headers
        )
        if stale:
            args = [tc["nvcc"], "-c", src, "-o", obj] + CUDA_FLAGS + CUDA_GENCODE
            args += ["-I" + CUDA_SRC] + ["-I" + d for d in tc["include_dirs"]]
            print(" ".join(args))
            subprocess.run(args, check=True)
        objects.append(obj)
    return objects


def _cuda_extension():
    global _CUDA_TOOLCHAIN
    _CUDA_TOOLCHAIN = _find_cuda_toolchain()
    tc = _CUDA_TOOLCHAIN
    return Extension(
        "fastattn._cuda",
        sources=["fastattn/_cuda.pyx"],
        include_dirs=[CUDA_SRC],
        # the .cu objects are C++: link the C++ runtime the host compiler used
        libraries=["stdc++"],
        extra_objects=list(tc["libraries"]),
        extra_link_args=["-Wl,-rpath," + d for d in tc["rpaths"]],
        depends=sorted(glob.glob(os.path.join(CUDA_SRC, "*"))),
    )


def _extensions():
    debug = _env_flag("FASTATTN_CYTHON_DEBUG", False)
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "initializedcheck": debug,
        "embedsignature": True,
    }
    np_macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    exts = [
        # _kernels hands csrc/linear.c the BLAS of scipy.linalg.cython_blas
        # (sgemm/dgemm/sgemv/dgemv), so no BLAS is linked by hand; cython
        # finds its .pxd in the installed scipy (a build requirement).
        Extension(
            "fastattn._kernels",
            sources=["fastattn/_kernels.pyx"],
            include_dirs=[CSRC, numpy.get_include()],
            define_macros=np_macros,
        ),
    ]
    if _env_flag("FASTATTN_CUDA", False):
        exts.append(_cuda_extension())
    return cythonize(exts, compiler_directives=directives, quiet=True)


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": FastattnBuildExt},
)
