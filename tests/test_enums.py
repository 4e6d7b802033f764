"""The enum codes Python hands to the kernels are the values C compiled.

Python reads every code from csrc/fastattn.h through the Cython bindings; here
a small C program (and, with nvcc, a CUDA one) prints the same enumerators as
the compiler sees them, so a header edit that the bindings missed, or a CUDA
value that drifted from the CPU one, fails."""

import os
import shutil
import subprocess

import pytest

from fastattn import _kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# (C enumerator, the value Python passes for it)
PYTHON_VALUES = {
    "FA_DTYPE_F32": _kernels.DTYPE_CODES["float32"],
    "FA_DTYPE_F64": _kernels.DTYPE_CODES["float64"],
    "FA_ISA_SCALAR": _kernels.ISA_CODES["scalar"],
    "FA_ISA_AVX2": _kernels.ISA_CODES["avx2"],
    "FA_ISA_AVX512": _kernels.ISA_CODES["avx512"],
    "FA_MASK_NONE": _kernels.MASK_NONE,
    "FA_MASK_BOOL": _kernels.MASK_BOOL,
    "FA_MASK_ADD": _kernels.MASK_ADD,
    "FA_CAUSAL_NONE": _kernels.CAUSAL_NONE,
    "FA_CAUSAL_TOP_LEFT": _kernels.CAUSAL_ALIGNMENTS["top_left"],
    "FA_CAUSAL_BOTTOM_RIGHT": _kernels.CAUSAL_ALIGNMENTS["bottom_right"],
    "FA_SEQMASK_MUL": _kernels.SEQUENCE_MASK_MODES["mul"],
    "FA_SEQMASK_ADD": _kernels.SEQUENCE_MASK_MODES["add"],
    "FA_PE_CONCAT": _kernels.PE_LAYOUTS["concat"],
    "FA_PE_INTERLEAVED": _kernels.PE_LAYOUTS["interleaved"],
    "FA_ROPE_NONE": _kernels.ROPE_NONE,
    "FA_ROPE_NEOX": _kernels.ROPE_LAYOUTS["neox"],
    "FA_ROPE_GPTJ": _kernels.ROPE_LAYOUTS["gptj"],
}

# the CUDA header's renamings of the shared enumerators
CUDA_TWINS = {
    "FA_CUDA_F32": "FA_DTYPE_F32",
    "FA_CUDA_F64": "FA_DTYPE_F64",
    "FA_CUDA_MASK_NONE": "FA_MASK_NONE",
    "FA_CUDA_MASK_BOOL": "FA_MASK_BOOL",
    "FA_CUDA_MASK_ADD": "FA_MASK_ADD",
    "FA_CUDA_CAUSAL_NONE": "FA_CAUSAL_NONE",
    "FA_CUDA_CAUSAL_TOP_LEFT": "FA_CAUSAL_TOP_LEFT",
    "FA_CUDA_CAUSAL_BOTTOM_RIGHT": "FA_CAUSAL_BOTTOM_RIGHT",
    "FA_CUDA_PE_CONCAT": "FA_PE_CONCAT",
    "FA_CUDA_PE_INTERLEAVED": "FA_PE_INTERLEAVED",
    "FA_CUDA_ROPE_NEOX": "FA_ROPE_NEOX",
    "FA_CUDA_ROPE_GPTJ": "FA_ROPE_GPTJ",
}


def _printed_values(compiler, header, names, tmp_path, suffix, extra_flags=()):
    """{name: value} as a program compiled by ``compiler`` prints them."""
    src = tmp_path / f"enums{suffix}"
    lines = [f'#include "{header}"', "#include <stdio.h>", "int main(void) {"]
    lines += [f'    printf("%s %d\\n", "{n}", (int){n});' for n in names]
    lines += ["    return 0;", "}"]
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / f"enums{suffix}.out"
    subprocess.run([compiler, *extra_flags, f"-I{CSRC}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@pytest.mark.skipif(CC is None, reason="no C compiler on the PATH")
def test_python_codes_are_the_c_values(tmp_path):
    c_values = _printed_values(CC, "fastattn.h", PYTHON_VALUES, tmp_path, ".c", ["-std=c11"])
    assert c_values == PYTHON_VALUES


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_cuda_codes_are_the_cpu_values(tmp_path):
    names = list(CUDA_TWINS) + ["FA_CUDA_CAUSAL_LENGTHS"]
    cuda_values = _printed_values(shutil.which("nvcc"), "cuda/fastattn_cuda.h", names, tmp_path, ".cu")
    for cuda_name, cpu_name in CUDA_TWINS.items():
        assert cuda_values[cuda_name] == PYTHON_VALUES[cpu_name], cuda_name
    # the CUDA-only causal mode must not collide with a shared one
    assert cuda_values["FA_CUDA_CAUSAL_LENGTHS"] not in (
        PYTHON_VALUES["FA_CAUSAL_NONE"], PYTHON_VALUES["FA_CAUSAL_TOP_LEFT"],
        PYTHON_VALUES["FA_CAUSAL_BOTTOM_RIGHT"])
