"""clipscope installs as a wheel: every runtime import is a declared dependency, every non-Python
file the package reads ships as package data, the version has one source, and ``import clipscope``
reaches every subpackage lazily, without printing anything."""
from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import clipscope

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clipscope"
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503: lower case, runs of -_. as -)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_names() -> dict[str, str]:
    """``{top-level module: first file importing it}`` over every module of the package (absolute imports)."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _non_python_files() -> list[str]:
    """Paths (relative to the package folder) of the files under clipscope/ that are not Python source."""
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def test_every_third_party_import_is_a_declared_dependency():
    project = _pyproject()["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    providers = metadata.packages_distributions()
    undeclared = {}
    for module, where in _imported_top_level_names().items():
        if module in sys.stdlib_module_names or module in ("__future__", "clipscope"):
            continue
        dists = {_requirement_name(d) for d in providers.get(module, [])}
        if not dists & declared:
            undeclared[module] = (where, sorted(dists) or "not installed")
    assert undeclared == {}


def test_the_version_has_one_source():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "clipscope.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", clipscope.__version__)


def test_package_data_covers_every_non_python_file_of_the_package():
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["clipscope"]
    files = _non_python_files()
    assert {"organism/organism.safetensors", "model_configs/clipscope-tiny-rn.json",
            "audit/specs/organism_planted_bias.yaml"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []


@pytest.mark.parametrize("name", ["organism_planted_bias.yaml", "organism_vit_graded_bias.yaml"])
def test_the_packaged_demo_audit_specs_and_the_copies_in_audits_are_identical(name):
    # the package's copy is the source of truth (an installed wheel has only that one); audits/ keeps
    # a copy next to the other specs for users to read and adapt
    packaged = PACKAGE / "audit" / "specs" / name
    assert (ROOT / "audits" / name).read_bytes() == packaged.read_bytes()


def test_an_unknown_attribute_of_the_package_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'neuron'"):
        clipscope.neuron  # noqa: B018


@pytest.mark.slow
def test_import_clipscope_imports_no_subpackage_prints_nothing_and_reaches_each_on_access():
    script = (
        "import sys, clipscope\n"
        "capabilities = ('attribution', 'audit', 'neurons', 'optvis', 'organism', 'typographic', 'widgets')\n"
        "eager = [m for m in capabilities if f'clipscope.{m}' in sys.modules]\n"
        "assert eager == [], eager\n"
        "for name in clipscope.SUBMODULES:\n"
        "    assert getattr(clipscope, name).__name__ == f'clipscope.{name}'\n"
        "    assert name in dir(clipscope)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (run.stdout, run.stderr) == ("", "")
    assert {"attribution", "audit", "neurons", "optvis", "organism", "typographic", "widgets"} <= \
        set(clipscope.SUBMODULES)


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_its_data(tmp_path):
    """Build the sdist and from it the wheel (as ``make wheel-check`` does), then read the wheel's file list."""
    build = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = tmp_path.glob("clipscope_toolkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = archive.read(f"clipscope_toolkit-{clipscope.__version__}.dist-info/METADATA").decode()
        entry_points = archive.read(f"clipscope_toolkit-{clipscope.__version__}.dist-info/entry_points.txt").decode()
    shipped = {n[len("clipscope/"):] for n in names if n.startswith("clipscope/")}
    sources = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert shipped == sources | set(_non_python_files())
    assert re.search(rf"^Version: {re.escape(clipscope.__version__)}$", meta, re.M)
    assert re.search(r"^clipscope = clipscope\.cli:main$", entry_points, re.M)
