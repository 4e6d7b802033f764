"""Build and runtime configuration: ISA dispatch, threads, show_config."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _python(code, **env_changes):
    """Run `code` in a fresh interpreter with the environment changed as
    given (a value of None removes the variable) and return its stdout."""
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()


def test_best_isa_is_selected_by_default():
    """The level picked at import is the best one this CPU supports, judged
    independently from /proc/cpuinfo (which reflects CPUID and OS support)."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to cross-check CPU features")
    avx512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags
    avx512bf16 = avx512 and "avx512_bf16" in flags
    avx2 = {"avx2", "fma"} <= flags
    expected = ("avx512bf16" if avx512bf16 else "avx512" if avx512 else "avx2" if avx2
                else "scalar")
    # amx also needs this build's AMX kernels and the OS's grant of the tile
    # data (which /proc/cpuinfo does not show): either level is right there
    allowed = {expected}
    if avx512bf16 and {"amx_tile", "amx_bf16"} <= flags and _compiled_amx():
        allowed.add("amx")
    assert _python("import fastattn; print(fastattn.get_isa())", FASTATTN_ISA=None) in allowed
    assert fastattn.available_isas()[-1] in allowed


def test_fastattn_isa_env_forces_a_lower_level():
    assert _python("import fastattn; print(fastattn.get_isa())", FASTATTN_ISA="scalar") == "scalar"


def test_set_isa_rejects_unsupported_levels():
    with pytest.raises(ValueError, match="isa must be one of"):
        fastattn.set_isa("sse9")
    if "avx512" not in fastattn.available_isas():
        with pytest.raises(ValueError, match="not supported on this CPU"):
            fastattn.set_isa("avx512")


def _import_with_isa(name):
    """(the level selected, the FASTATTN_ISA warnings raised) on importing
    fastattn in a fresh interpreter with FASTATTN_ISA=name."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import fastattn\n"
            "print(fastattn.get_isa(), sum('FASTATTN_ISA' in str(x.message) for x in w))")
    return tuple(_python(code, FASTATTN_ISA=name).split())


def test_avx512bf16_level_follows_the_cpu():
    """The avx512bf16 level is listed exactly where the CPU has AVX512_BF16
    (with the avx512 level below it); FASTATTN_ISA=avx512bf16 selects it
    there and is ignored with a warning elsewhere; set_isa refuses it
    cleanly on a CPU without it."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to cross-check CPU features")
    has = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    assert ("avx512bf16" in fastattn.available_isas()) == has
    isa, n_warnings = _import_with_isa("avx512bf16")
    if has:
        levels = fastattn.available_isas()
        assert levels[levels.index("avx512bf16") - 1] == "avx512"
        assert (isa, n_warnings) == ("avx512bf16", "0")
        before = fastattn.get_isa()
        try:
            fastattn.set_isa("avx512bf16")
            assert fastattn.get_isa() == "avx512bf16"
            fastattn.set_isa("avx512")
            assert fastattn.get_isa() == "avx512"
        finally:
            fastattn.set_isa(before)
    else:
        assert isa == fastattn.available_isas()[-1] and n_warnings == "1"
        with pytest.raises(ValueError, match="not supported on this CPU"):
            fastattn.set_isa("avx512bf16")


def _compiled_amx():
    return "amx" in fastattn.show_config(print_output=False)["isa_compiled"]


def test_amx_level_follows_the_cpu():
    """amx is listed only where the CPU has AMX-TILE and AMX-BF16 (and the
    avx512bf16 level below it) and this build has the AMX kernels; then it
    runs the bfloat16 GEMM and is selectable. Elsewhere FASTATTN_ISA=amx is
    ignored with a warning and set_isa refuses it."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to cross-check CPU features")
    cpu = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"} <= flags
    levels = fastattn.available_isas()
    if "amx" in levels:
        assert cpu and _compiled_amx() and levels[-2:] == ["avx512bf16", "amx"]
        before = fastattn.get_isa()
        try:
            fastattn.set_isa("amx")
            assert fastattn.get_isa() == "amx"
        finally:
            fastattn.set_isa(before)
        return
    isa, n_warnings = _import_with_isa("amx")
    assert isa == levels[-1] and n_warnings == "1"
    with pytest.raises(ValueError, match="not supported on this CPU"):
        fastattn.set_isa("amx")


def test_omp_num_threads_sets_the_default():
    assert _python("import fastattn; print(fastattn.get_num_threads())", OMP_NUM_THREADS="1") == "1"


def test_default_follows_affinity():
    out = _python("import fastattn; print(fastattn.get_num_threads())", OMP_NUM_THREADS=None)
    if fastattn.show_config(print_output=False)["openmp"]:
        assert int(out) == len(os.sched_getaffinity(0))


def test_set_num_threads_and_threadpoolctl():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    try:
        fastattn.set_num_threads(1)
        assert fastattn.get_num_threads() == 1
    finally:
        fastattn.set_num_threads(None)
    if fastattn.show_config(print_output=False)["openmp"]:
        with threadpoolctl.threadpool_limits(1):
            assert fastattn.get_num_threads() == 1
    with pytest.raises(ValueError, match="n must be >= 1"):
        fastattn.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be a positive integer"):
        fastattn.set_num_threads(1.5)


def test_show_config(capsys):
    info = fastattn.show_config()
    printed = capsys.readouterr().out
    for key in ("version", "isa_selected", "isa_available", "openmp", "num_threads", "compiler", "flags"):
        assert key in info and key in printed
    assert info["isa_selected"] == fastattn.get_isa()
    assert "-march=native" not in info["flags"] and "fast-math" not in info["flags"]


def test_results_do_not_depend_on_threads():
    x = np.random.default_rng(1).standard_normal((4, 8, 64, 64)).astype(np.float32)
    one = fastattn.masked_softmax(x, key_lengths=[64, 3, 40, 0], num_threads=1)
    two = fastattn.masked_softmax(x, key_lengths=[64, 3, 40, 0], num_threads=2)
    assert np.array_equal(one, two)
