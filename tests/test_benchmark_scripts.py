"""Every script in benchmarks/ at least imports: a helper module renamed or
removed under it shows here, not when somebody next runs it."""

import importlib.util
import pathlib

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).parent.parent / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:  # a script that needs an optional package says so and exits
        pytest.skip(f"{path.name}: {exc}")
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
