"""Sphinx configuration: MyST Markdown pages, the public API from its docstrings."""

project = "nbcnn"
author = "the nbcnn authors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
# Docstrings say what a function computes in prose and formulas; their parameter lists are not
# in a fixed field format, so napoleon only picks up what looks like one.
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
html_theme = "alabaster"
nitpicky = False
