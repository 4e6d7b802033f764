"""Sphinx configuration for the fastattn documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` from the
repository root after building fastattn (``pip install -e '.[docs]'`` or
``python setup.py build_ext --inplace``). The figures are made by
``docs/make_figures.py`` and committed; the build does not run code.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import fastattn  # noqa: E402  (needs the compiled extension)

project = "fastattn"
author = "the fastattn developers"
copyright = "fastattn developers"
version = release = fastattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "performance/results.md"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "description": "Fast CPU Transformer attention with a NumPy API",
    "fixed_sidebar": True,
    "page_width": "1240px",
    "sidebar_width": "220px",
    "body_max_width": "none",
}
