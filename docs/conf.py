"""Sphinx configuration for the celltyper documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` from the repository root.
"""

from __future__ import annotations

import os
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Documenting the source tree rather than an installed copy keeps the API pages in step
# with the code being edited, and lets the docs build without `pip install -e .`.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

project = "celltyper"
author = "celltyper developers"
copyright = f"{date.today().year}, {author}"
try:
    release = version("celltyper")
except PackageNotFoundError:
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Broken cross-references to third-party objects (numpy, anndata, ...) must not fail a
# `-W` build that has no intersphinx inventories to resolve them.
nitpicky = False

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
# Without this, numpy's ArrayLike is expanded into its full, unreadable Union.
autodoc_type_aliases = {"ArrayLike": "numpy.typing.ArrayLike"}
# API pages list their entries explicitly; no stub files are written into the source tree.
autosummary_generate = False

# Intersphinx needs network access to fetch inventories, which builds (and the test suite)
# must not depend on; opt in with CELLTYPER_DOCS_INTERSPHINX=1 for a published build.
if os.environ.get("CELLTYPER_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "pandas": ("https://pandas.pydata.org/docs", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable", None),
    }

html_theme = "alabaster"
html_title = f"celltyper {release}"
html_static_path: list[str] = []
