"""The documentation: the API reference covers every public name, the guide's
Python examples run, the gallery can title every example, and (slow) the site
builds with warnings as errors."""

import importlib
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap
import types

import pytest

import gpgrad

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import gpgrad_docs  # noqa: E402


def _public_modules():
    # independent of the generator: every non-underscore module with __all__
    mods = {"gpgrad"}
    for info in pkgutil.walk_packages(gpgrad.__path__, "gpgrad."):
        if any(p.startswith("_") for p in info.name.split(".")):
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # an optional extra is missing here
            continue
        if hasattr(mod, "__all__"):
            mods.add(info.name)
    return mods


def test_api_reference_lists_every_public_name(tmp_path):
    mods = gpgrad_docs.write_api_pages(tmp_path)
    expected = _public_modules()
    assert expected <= set(mods)
    assert {"gpgrad", "gpgrad.kernels", "gpgrad.sklearn"} <= set(mods)
    index = (tmp_path / "index.rst").read_text()
    for modname in mods:
        assert f"   {modname}\n" in index + "\n"
        page = (tmp_path / f"{modname}.rst").read_text()
        assert f".. automodule:: {modname}" in page
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            entry = f"\n   {name}\n" in page  # an autosummary row (own page)
            link = re.search(rf"- ``{re.escape(name)}``: :obj:`gpgrad\.\w+`", page)
            sub = isinstance(obj, types.ModuleType) and f"<api-{obj.__name__}>" in page
            assert entry or link or sub, f"{modname}.{name} is not in the reference"
    # every top-level name has its own generated page
    top = (tmp_path / "gpgrad.rst").read_text()
    for name in gpgrad.__all__:
        obj = getattr(gpgrad, name)
        if not isinstance(obj, types.ModuleType):
            assert f"\n   {name}\n" in top


def test_api_pages_follow_all(tmp_path, monkeypatch):
    # a name added to __all__ appears without editing the docs
    monkeypatch.setattr(gpgrad.kernels, "__all__", [*gpgrad.kernels.__all__, "NewK"])
    monkeypatch.setattr(gpgrad.kernels, "NewK", type("NewK", (), {}), raising=False)
    gpgrad_docs.write_api_pages(tmp_path)
    assert "\n   NewK\n" in (tmp_path / "gpgrad.kernels.rst").read_text()


# pages whose examples take about a minute of CPU, or fit models (1-3 s
# each): they run in the slow pass
SLOW_PAGES = {"long-series.md", "accuracy.md", "fitting.md"}
SLOW_PAGES |= {"noisy-derivatives.md", "scikit-learn.md"}


def _md_pages():
    pages = sorted((DOCS / "guide").glob("*.md")) + sorted(DOCS.glob("*.md"))
    return [
        pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p
        for p in pages
        if re.search(r"```python\n", p.read_text("utf-8"))
    ]


@pytest.mark.parametrize("page", _md_pages(), ids=lambda p: p.name)
def test_docs_python_examples_run(page, tmp_path, monkeypatch):
    # ```python blocks run in order in one namespace per page (as a reader
    # would); ```py blocks are shown only (large, or need a GPU, several
    # processes or a file): a page's author chooses by the fence
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    text = page.read_text(encoding="utf-8")
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
        exec(
            compile(textwrap.dedent(code), f"{page.name} block {i}", "exec"), namespace
        )


def test_gallery_sources_have_titles(monkeypatch, tmp_path):
    monkeypatch.setattr(gpgrad_docs, "GALLERY_SRC", tmp_path)
    gpgrad_docs.write_gallery_sources()
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert examples
    for src in examples:
        text = (tmp_path / src.name).read_text(encoding="utf-8")
        m = re.search(r'"""([^\n]+)\n(=+)\n', text)
        assert m and len(m.group(2)) == len(m.group(1)), src.name
    assert (tmp_path / "GALLERY_HEADER.rst").exists()


@pytest.mark.slow
def test_sphinx_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx_gallery")
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html"]
    cmd += ["-D", "plot_gallery=0", "-d", str(tmp_path / "doctrees"), "docs", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for modname in _public_modules():
        mod = importlib.import_module(modname)
        assert (out / "api" / f"{modname}.html").exists()
        for name in mod.__all__:
            assert name in (out / "api" / f"{modname}.html").read_text("utf-8")
    assert (out / "guide" / "scikit-learn.html").exists()
