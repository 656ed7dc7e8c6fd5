"""Sphinx configuration: the pnjax documentation site.

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html   # warnings are errors

Every ``docs/*.md`` page is a page of the site (``index.md`` holds a glob toctree); the API page
is written by autodoc from the docstrings (Google style, through napoleon).
"""

from __future__ import annotations

import pnjax

project = "pnjax"
author = "pnjax developers"
copyright = "pnjax developers"  # noqa: A001 - the name Sphinx reads
release = pnjax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"pnjax {release}"
