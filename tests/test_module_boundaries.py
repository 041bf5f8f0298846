"""Modules use each other through public names only: no module imports another's private name (the
shared progress bar, the peak cell of a dataset example and the atlas's state are public), and the
progress bar shows by one rule everywhere."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clipscope
from clipscope.neurons import Atlas
from clipscope.progress import progress_bar

from .conftest import make_images

PACKAGE = Path(clipscope.__file__).parent


def _private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def private_imports(source: str) -> list[str]:
    """``line: name`` for every private module or name of the package that ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("clipscope")):
            names = [node.module or ""] + [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("clipscope")]
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if _private(name)]
    return found


def test_the_check_finds_private_names_and_modules_in_every_import_form():
    source = ("from .examples import peak_cell, _hidden\nfrom ..neurons._plot import bars\n"
              "import clipscope._secret\nfrom . import __version__\nfrom os import _exit\n"
              "from .atlas import (\n    Atlas,\n    _examples,\n)\n")
    assert private_imports(source) == ["1: _hidden", "2: neurons._plot", "3: clipscope._secret", "6: _examples"]


def test_no_module_of_the_package_imports_a_private_name():
    found = {str(path.relative_to(PACKAGE)): private_imports(path.read_text()) for path in PACKAGE.rglob("*.py")}
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_the_progress_bar_shows_when_asked_or_by_default():
    items = range(3)
    assert progress_bar(items, False, True, "x") is items           # never when refused
    assert progress_bar(items, None, False, "x") is items           # the caller's default: off
    for show, default in ((True, False), (None, True)):
        bar = progress_bar(items, show, default, "encode", total=3)
        assert bar is not items and list(bar) == [0, 1, 2]
        assert bar.desc == "encode" and bar.total == 3


@pytest.mark.usefixtures("one_thread")
def test_the_atlas_says_whether_a_sites_views_are_computed(tiny_rn):
    site = tiny_rn.layers().blocks().names()[-1]
    atlas = Atlas(tiny_rn, make_images(4), words=["cat", "dog"], k=2, progress=False)
    assert not atlas.has_views(site)
    atlas.view(site, 0)
    assert atlas.has_views(site)
