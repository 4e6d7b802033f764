"""Build fastattn: C kernels in csrc/ behind one Cython extension.

Each group of C files is compiled with its own flags and linked into the
extension as extra objects (the cython-blis approach):

* baseline files (drivers, dispatch, the scalar kernels): no ISA flags, so the
  package imports on any x86-64 (or aarch64) CPU;
* ``*_avx2.c``: ``-mavx2 -mfma``;
* ``*_avx512.c``: ``-mavx512f -mavx512dq -mavx512bw -mavx512vl``.

The CPU is detected at import (CPUID + XGETBV) and the best compiled level is
selected; ``FASTATTN_ISA`` lowers it. Never ``-march=native`` (the wheel must
run elsewhere) and never ``-ffast-math`` (it breaks -inf masking and NaN
propagation).

Environment switches:

``FASTATTN_OPENMP=0``
    build serially even when the compiler supports OpenMP.
``FASTATTN_SANITIZE=address,undefined``
    build the C code with ``-fsanitize=...`` (see docs/reliability.md).
``FASTATTN_CYTHON_DEBUG=1``
    Cython bounds and wraparound checks on.
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
BASE_CFLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-function"]
ISA_CFLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
}


def _env_flag(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _source_groups():
    """Map each flag group to its C files."""
    all_c = sorted(glob.glob(os.path.join(CSRC, "*.c")))
    groups = {"base": [], "avx2": [], "avx512": []}
    for path in all_c:
        stem = os.path.basename(path)[:-2]
        if stem.endswith("_avx512"):
            groups["avx512"].append(path)
        elif stem.endswith("_avx2"):
            groups["avx2"].append(path)
        else:
            groups["base"].append(path)
    if not IS_X86:
        groups["avx2"] = []
        groups["avx512"] = []
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

    def build_extension(self, ext):
        if ext.name == "fastattn._blas":
            # its GEMMs split their columns over the OpenMP threads (prange),
            # the same libgomp pool as the C kernels
            omp = self._probe_openmp()
            ext.extra_compile_args = list(ext.extra_compile_args or []) + omp
            ext.extra_link_args = list(ext.extra_link_args or []) + omp
            return super().build_extension(ext)
        if ext.name != "fastattn._kernels":
            return super().build_extension(ext)
        omp = self._probe_openmp()
        sanitize = os.environ.get("FASTATTN_SANITIZE", "").strip()
        san_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []

        groups = _source_groups()
        macros = [("FA_HAVE_X86_KERNELS", "1")] if IS_X86 else []
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
            for name in ("base", "avx2", "avx512")
            if groups[name]
        )
        with open(os.path.join(cfg_dir, "fa_build_config.h"), "w") as f:
            f.write(f"#define FA_BUILD_COMPILER {_c_string(version)}\n")
            f.write(f"#define FA_BUILD_FLAGS {_c_string(flag_text)}\n")

        objects = []
        for name, sources in groups.items():
            if not sources:
                continue
            objects += self.compiler.compile(
                sources,
                output_dir=self.build_temp,
                macros=macros,
                include_dirs=[CSRC, cfg_dir],
                extra_postargs=BASE_CFLAGS + ISA_CFLAGS.get(name, []) + omp + san_flags,
                depends=glob.glob(os.path.join(CSRC, "*.h")),
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        ext.extra_compile_args = list(ext.extra_compile_args or []) + omp + san_flags
        ext.extra_link_args = list(ext.extra_link_args or []) + omp + san_flags
        ext.depends = list(ext.depends or []) + sorted(glob.glob(os.path.join(CSRC, "*")))
        super().build_extension(ext)


def _c_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
        Extension(
            "fastattn._kernels",
            sources=["fastattn/_kernels.pyx"],
            include_dirs=[CSRC, numpy.get_include()],
            define_macros=np_macros,
        ),
        # The projections' GEMMs: scipy.linalg.cython_blas (sgemm/dgemm), so
        # no BLAS is linked by hand; cython finds its .pxd in the installed
        # scipy (a build requirement).
        Extension(
            "fastattn._blas",
            sources=["fastattn/_blas.pyx"],
            include_dirs=[CSRC, numpy.get_include()],
            define_macros=np_macros,
        ),
    ]
    return cythonize(exts, compiler_directives=directives, quiet=True)


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": FastattnBuildExt},
)
