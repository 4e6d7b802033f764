"""The documentation's code runs: every ``>>>`` block of every page in docs/
runs as a doctest (without Sphinx), the plotting docstrings run with
matplotlib, and, when Sphinx is installed, the site builds with ``-W`` and
documents every public name.

A page block preceded by a MyST comment such as
``% doctest-requires: fastattn.MultiHeadAttention torch`` runs only when
every named attribute of fastattn and every named module is there; the test
reports the blocks it had to leave out as a skip, after the others passed.
"""

import doctest
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastattn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
REQUIRES = re.compile(r"^%\s*doctest-requires:\s*(.+)$")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def doctest_blocks(text):
    """``[(first_line, source, requirements), ...]`` for each fenced block
    holding ``>>>`` lines."""
    blocks, lines, i = [], text.splitlines(), 0
    pending = []
    while i < len(lines):
        req = REQUIRES.match(lines[i].strip())
        if req:
            pending = req.group(1).split()
            i += 1
            continue
        fence = FENCE.match(lines[i].strip())
        if fence:
            marker, start, body = fence.group(1), i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append(lines[i])
                i += 1
            source = "\n".join(body)
            if re.search(r"^\s*>>>", source, re.M):
                blocks.append((start, source + "\n", pending))
            pending = []
        elif lines[i].strip():
            pending = []
        i += 1
    return blocks


def missing(requirements):
    out = []
    for name in requirements:
        if name.startswith("fastattn."):
            if not hasattr(fastattn, name.split(".", 1)[1]):
                out.append(name)
        elif importlib.util.find_spec(name) is None:
            out.append(name)
    return out


def run_doctest(source, name, path, lineno=0, globs=None):
    test = doctest.DocTestParser().get_doctest(source, dict(globs or {}), name, str(path), lineno)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    runner.run(test, out=report.append, clear_globs=False)
    return runner.summarize(verbose=False), "".join(report), test.globs


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"index.md", "quickstart.md", "concepts.md", "masks.md", "performance.md",
            "building.md"} <= names
    index = (DOCS / "index.md").read_text()
    orphans = [p.stem for p in PAGES if p.stem != "index" and f"\n{p.stem}\n" not in index]
    assert not orphans, f"pages missing from the index toctree: {orphans}"
    assert any(doctest_blocks(p.read_text()) for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples(page):
    blocks = doctest_blocks(page.read_text())
    globs, skipped, ran = {}, [], 0
    try:
        for lineno, source, requirements in blocks:
            absent = missing(requirements)
            if absent:
                skipped.append((lineno, absent))
                continue
            result, report, globs = run_doctest(source, f"{page.name}:{lineno}", page, lineno,
                                                globs)
            assert result.failed == 0, f"{page.name}, block at line {lineno}:\n{report}"
            ran += result.attempted
    finally:
        fastattn.set_num_threads(None)  # a page may change it
    if skipped:
        where = "; ".join(f"line {n} needs {', '.join(a)}" for n, a in skipped)
        pytest.skip(f"{page.name}: {ran} examples passed; {len(skipped)} block(s) left out "
                    f"because this build lacks them ({where})")


def test_extractor_reads_fences_and_requirements():
    text = ("intro\n\n% doctest-requires: fastattn.Nope numpy\n\n```pycon\n>>> 1 + 1\n2\n```\n"
            "\n```console\n$ ls\n```\n\n~~~pycon\n>>> 3\n3\n~~~\n")
    blocks = doctest_blocks(text)
    assert [(b[0], b[2]) for b in blocks] == [(5, ["fastattn.Nope", "numpy"]), (14, [])]
    assert missing(["fastattn.Nope", "numpy", "fastattn.masked_softmax"]) == ["fastattn.Nope"]


def test_plotting_docstring_examples_run():
    """The plotting examples are marked +SKIP so that ``--doctest-modules``
    passes without matplotlib; here they run for real when it is there."""
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import fastattn.plotting as plotting

    attempted = 0
    try:
        for test in doctest.DocTestFinder().find(plotting, "fastattn.plotting"):
            if not test.examples:
                continue
            result, report, _ = run_doctest(without_skips(test), test.name, test.filename)
            assert result.failed == 0, report
            attempted += result.attempted
    finally:
        plt.close("all")
    assert attempted >= 8


def without_skips(test):
    """The examples of ``test`` as doctest text, with their +SKIP flags removed."""
    parts = []
    for ex in test.examples:
        lines = ex.source.replace("# doctest: +SKIP", "").rstrip().split("\n")
        parts.append(">>> " + lines[0])
        parts += ["... " + line for line in lines[1:]]
        if ex.want:
            parts.append(ex.want.rstrip("\n"))
    return "\n".join(parts) + "\n"


SPHINX_MODULES = ("sphinx", "numpydoc", "myst_parser")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in SPHINX_MODULES),
                    reason="sphinx, numpydoc or myst-parser not installed "
                           "(pip install -e '.[docs]')")
def test_sphinx_build_is_warning_free(tmp_path):
    out = tmp_path / "html"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stdout}\n{proc.stderr}"
    api = (out / "api.html").read_text()
    undocumented = [n for n in fastattn.__all__ if n != "__version__"
                    and f'id="fastattn.{n}"' not in api and f'id="module-fastattn.{n}"' not in api]
    assert not undocumented, f"public names missing from the API reference: {undocumented}"
    for page in ("quickstart", "concepts", "masks", "performance", "building"):
        assert (out / f"{page}.html").exists()
    for figure in ("attention_it.png", "attention_heads.png", "position_encodings.png",
                   "results.png", "kv_decode.png"):
        assert (out / "_images" / figure).exists(), figure


def test_figures_are_committed_and_small():
    figures = list((DOCS / "figures").glob("*.png")) + list((DOCS / "performance").glob("*.png"))
    names = {f.name for f in figures}
    assert {"attention_it.png", "attention_heads.png", "position_encodings.png",
            "results.png", "kv_decode.png"} <= names
    for f in figures:
        assert f.stat().st_size < 200_000, f"{f} is {f.stat().st_size} bytes"


def test_make_figures_runs(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    perf = tmp_path / "performance"
    perf.mkdir()
    shutil.copy(DOCS / "performance" / "results.json", perf / "results.json")
    proc = subprocess.run(
        [sys.executable, str(DOCS / "make_figures.py"), "--out", str(tmp_path),
         "--performance", str(perf)],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stderr
    for name in ("position_encodings.png", "attention_heads.png", "attention_it.png",
                 "performance/results.png", "performance/results.md"):
        assert (tmp_path / name).stat().st_size > 1000


def test_sentence_weights_are_what_the_caption_says():
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokens, w = module.sentence_attention()
    it = tokens.index("it")
    assert tokens[int(np.argmax(w[0, it]))] == "animal"
    assert tokens[int(np.argmax(w[2, it]))] == "tired"
    assert tokens[int(np.argmax(w[1, it]))] == tokens[it - 1]
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-12)
