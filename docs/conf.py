"""Sphinx configuration of gpgrad's documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` from the
repository root (``pip install -e ".[docs]"`` first).
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this checkout's gpgrad, not an installed one
sys.path.insert(0, str(DOCS / "_ext"))

import gpgrad_docs  # noqa: E402

import gpgrad  # noqa: E402

os.environ.setdefault("MPLBACKEND", "Agg")
API_MODULES = gpgrad_docs.write_api_pages()
gpgrad_docs.write_gallery_sources()

project = "gpgrad"
author = "the gpgrad developers"
copyright = "the gpgrad developers"
release = version = gpgrad.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_gallery_src", "**/GALLERY_HEADER.rst"]
root_doc = "index"
templates_path = ["_templates"]

# Markdown: GitHub-style tables come built in; $...$ math, ::: fences, anchors
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# the API pages by name: with True, autosummary scans only the pages the
# previous build knew, and a new module's page would miss its stubs
autosummary_generate = [f"api/{m}.rst" for m in API_MODULES]
autosummary_imported_members = True
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

intersphinx_mapping = {}  # the build needs no network

sphinx_gallery_conf = {
    "examples_dirs": str(gpgrad_docs.GALLERY_SRC.relative_to(DOCS)),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # run every example
    "reset_argv": "gpgrad_docs.reset_argv",
    "image_scrapers": ("gpgrad_docs",),
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "show_memory": False,
    "min_reported_time": 1,
    "within_subsection_order": "FileNameSortKey",
}

html_theme = "pydata_sphinx_theme"
html_title = f"gpgrad {version}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path = []
html_show_sourcelink = False


# --------------------------------------------------------------------------
# docstrings: the package writes array shapes such as ``(*b, n, d)`` and
# ``(..., n, *)`` and norms such as |u| in plain text; outside inline literals
# reST would read the star as emphasis and |u| as a substitution


def _escape_shapes(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        parts = line.split("``")
        for k in range(0, len(parts), 2):  # even parts lie outside ``...``
            p = gpgrad_docs.SHAPE_STAR.sub(r"\\*", parts[k])
            parts[k] = gpgrad_docs.BARS.sub(r"\\|\1|", p)
        lines[i] = "``".join(parts)


def _skip_member(app, what, name, obj, skip, options):
    # scikit-learn's metadata-routing setters (set_fit_request, ...) are
    # generated per estimator; their docstrings point into scikit-learn's docs
    if gpgrad_docs.SKLEARN_REQUEST.fullmatch(name):
        return True
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shapes)
    app.connect("autodoc-skip-member", _skip_member)
