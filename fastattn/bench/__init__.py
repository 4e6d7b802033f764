"""The benchmark suite: ``python -m fastattn.bench`` (or ``fastattn-bench``).

It runs fastattn against the NumPy oracle and every installed peer (torch,
onnxruntime) on an embedded suite, checks every output against the oracle
before timing it, and reports times, speed-ups and the share of the
machine's measured roofline. ``python -m fastattn.bench --help`` lists the
options.

Modules: :mod:`~fastattn.bench.cases` (what runs), :mod:`~fastattn.bench.peers`
(what it is compared with), :mod:`~fastattn.bench.timing`,
:mod:`~fastattn.bench.roofline`, :mod:`~fastattn.bench.runner` (check, then
time), :mod:`~fastattn.bench.report` (table, results.json/.md/.png) and
:mod:`~fastattn.bench.cli` (the options).
"""

from fastattn.bench.cli import main
from fastattn.bench.runner import Config, run_suite

__all__ = ["Config", "main", "run_suite"]
