"""The README's Python examples run as printed."""

import pathlib
import re
import textwrap

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text(encoding="utf-8")
    # ```python blocks run; ```py blocks (large or needing optional extras)
    # are shown only
    return [
        textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
    ]


def test_readme_has_examples():
    assert len(_blocks()) >= 1


@pytest.mark.slow  # runs every README example
def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    # the blocks run in order in one namespace, as a reader would run them
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, code in enumerate(_blocks()):
        exec(compile(code, f"README block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "[[" in out  # the ten-line example prints its arrays
