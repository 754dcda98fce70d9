"""Helpers of the documentation build.

- :func:`write_api_pages` writes the API reference from ``gpgrad.__all__`` and
  every public submodule's ``__all__`` (a new name or module appears without
  editing the docs);
- :func:`write_gallery_sources` gives each example of ``examples/`` the title
  line sphinx-gallery needs; :func:`reset_argv` runs the examples in their
  quick modes and :class:`PNGScraper` puts the figures they save into the pages.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import types
from pathlib import Path

#: a star inside a shape tuple: ``(*b, n, d)``, ``(..., n, *)``
SHAPE_STAR = re.compile(r"(?<=\()\*(?=\w)|(?<=, )\*(?=[),])")
#: |u| written as a norm
BARS = re.compile(r"(?<![|\w\\])\|(\w+)\|(?![|\w])")
#: scikit-learn's generated metadata-routing setters
SKLEARN_REQUEST = re.compile(r"set_\w+_request")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


# --------------------------------------------------------------------------
# the API reference


def public_modules() -> list[str]:
    """``gpgrad`` and every importable submodule without a leading underscore
    that declares ``__all__``."""
    import gpgrad

    names = ["gpgrad"]
    for info in pkgutil.walk_packages(gpgrad.__path__, "gpgrad."):
        if any(p.startswith("_") for p in info.name.split(".")):
            continue
        mod = importlib.import_module(info.name)  # a missing extra fails loudly
        if hasattr(mod, "__all__"):
            names.append(info.name)
    return sorted(names, key=lambda n: (n != "gpgrad", n))


def _module(name):
    return importlib.import_module(name)


def _top_level_names():
    import gpgrad

    return {id(getattr(gpgrad, n)): n for n in gpgrad.__all__}


def _split_names(modname):
    """A module's ``__all__`` as (names documented on its page, (name,
    top-level name) pairs re-exported by ``gpgrad``, submodules)."""
    mod = _module(modname)
    top = _top_level_names() if modname != "gpgrad" else {}
    own, linked, modules = [], [], []
    for name in mod.__all__:
        obj = getattr(mod, name)
        if isinstance(obj, types.ModuleType):  # gpgrad.fit is a callable module
            modules.append(obj.__name__)
        elif id(obj) in top:
            linked.append((name, top[id(obj)]))
        else:
            own.append(name)
    return own, linked, modules


def _own_names(modname):
    return _split_names(modname)[0]


def _title(text):
    return f"{text}\n{'=' * len(text)}\n"


def api_page(modname: str) -> str:
    """The reST of one module's page: its docstring, an autosummary table
    (with a generated page each) of the names it defines, and links to the
    names that are the same object as one of ``gpgrad.__all__``."""
    mod = _module(modname)
    parent, _, last = modname.rpartition(".")
    # gpgrad.fit is also the name of a function: index only the function
    shadowed = parent and getattr(_module(parent), last, None) is not mod
    own, linked, modules = _split_names(modname)
    lines = [f".. _api-{modname}:", "", _title(f"``{modname}``")]
    lines += [f".. automodule:: {modname}", "   :no-members:"]
    if shadowed:
        lines.append("   :no-index:")
    lines += ["", f".. currentmodule:: {modname}", ""]
    if own:
        lines += [".. autosummary::", "   :toctree: generated", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in own] + [""]
    if linked:
        lines += ["Also exported at the top level:", ""]
        lines += [f"- ``{n}``: :obj:`gpgrad.{t}`" for n, t in linked] + [""]
    if modules:
        lines += ["Submodules:", ""]
        lines += [f"- :ref:`{m} <api-{m}>`" for m in modules] + [""]
    return "\n".join(lines)


def write_api_pages(outdir: Path | None = None) -> list[str]:
    """Write ``api/<module>.rst`` for every public module and ``api/index.rst``;
    files are rewritten only when their text changes. Returns the modules."""
    outdir = Path(outdir) if outdir is not None else DOCS / "api"
    outdir.mkdir(parents=True, exist_ok=True)
    mods = public_modules()
    pages = {f"{m}.rst": api_page(m) for m in mods}
    index = [
        _title("API reference"),
        "Every name in ``gpgrad.__all__`` and in the ``__all__`` of each public",
        "submodule, generated from the docstrings. scikit-learn users start at",
        ":ref:`api-gpgrad.sklearn`.",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
    ]
    index += [f"   {m}" for m in mods]
    pages["index.rst"] = "\n".join(index) + "\n"
    for fname, text in pages.items():
        path = outdir / fname
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    for old in outdir.glob("gpgrad*.rst"):
        if old.name not in pages:
            old.unlink()
    # autosummary never deletes the page of a name that left __all__
    stubs = {f"{m}.{n}.rst" for m in mods for n in _own_names(m)}
    for old in (outdir / "generated").glob("*.rst"):
        if old.name not in stubs:
            old.unlink()
    return mods


# --------------------------------------------------------------------------
# the gallery

GALLERY_SRC = DOCS / "_gallery_src"
GALLERY_OUT = DOCS / "_build" / "gallery_figures"

GALLERY_HEADER = """\
Gallery
=======

The scripts of ``examples/``, run while these pages were built (in their
``--quick`` modes, so the figures are smaller runs than the full ones
described in each script), with what they printed and the figure they saved.
Run one yourself with ``python examples/NAME.py`` (full) or ``--quick``.
"""


def write_gallery_sources() -> None:
    """Copy ``examples/*.py`` into ``docs/_gallery_src`` with the docstring's
    first line underlined as a title (sphinx-gallery needs a title; the
    scripts keep plain docstrings for their ``--help``)."""
    GALLERY_SRC.mkdir(parents=True, exist_ok=True)
    files = {"GALLERY_HEADER.rst": GALLERY_HEADER}
    for src in sorted((ROOT / "examples").glob("*.py")):
        text = src.read_text(encoding="utf-8")
        m = re.match(r'(\s*(?:#.*\n)*\s*[rRuU]?""")([^\n]+)\n', text)
        if m:
            title = m.group(2).strip().rstrip(".")
            text = (
                text[: m.start(2)]
                + title
                + "\n"
                + "=" * len(title)
                + "\n"
                + text[m.end() :]
            )
        files[src.name] = text
    for name, text in files.items():
        path = GALLERY_SRC / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    for old in GALLERY_SRC.iterdir():
        if old.name not in files:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()


def reset_argv(gallery_conf, script_vars):
    """Command-line arguments of an example: its quick mode, and its figure
    written where :class:`PNGScraper` collects it."""
    src = Path(script_vars["src_file"])
    text = src.read_text(encoding="utf-8")
    args = ["--quick"] if "--quick" in text else []
    if '"--out"' in text:
        GALLERY_OUT.mkdir(parents=True, exist_ok=True)
        # relative to the example's folder, where sphinx-gallery runs it
        out = os.path.relpath(GALLERY_OUT / f"{src.stem}.png", src.parent)
        args += ["--out", out]
    return args


class PNGScraper:
    """Put the PNG an example saved with ``--out`` into its gallery page."""

    def __repr__(self):  # stable across builds, so Sphinx does not rebuild
        return "PNGScraper"

    def __call__(self, block, block_vars, gallery_conf):
        from sphinx_gallery.scrapers import figure_rst

        fig = GALLERY_OUT / f"{Path(block_vars['src_file']).stem}.png"
        if not fig.exists():
            return ""
        target = Path(next(block_vars["image_path_iterator"]))
        shutil.move(str(fig), target)
        return figure_rst([str(target)], gallery_conf["src_dir"])


def _get_sg_image_scraper():
    """sphinx-gallery's hook for ``image_scrapers = ("gpgrad_docs",)``."""
    return PNGScraper()
