"""The folder is the map, and it cannot rot: parts import one way (import-linter contracts in pyproject.toml),
the wheel carries every part, no product function or class grows past its size without saying why, and every
setting is documented."""
import ast
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest

from backend.config import Settings

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))
PARTS = ["annotate", "cli", "evaluate", "http", "jobs", "labelstudio", "sam3"]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)


def test_parts_import_one_way():
    run = lint(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


@pytest.mark.parametrize("module, wrong", [
    ("sam3/engine.py", "from ..annotate import ontology"),  # SAM 3 knowing the annotation policy
    ("annotate/project.py", "from ..jobs import poster"),  # the per-project logic knowing jobs
    ("labelstudio/client.py", "from ..http import requests"),  # the connection knowing the HTTP contract
    ("config.py", "from .labelstudio import outbound"),  # a base module knowing a part
])
def test_a_wrong_way_import_breaks_the_contracts(tmp_path, module, wrong):
    shutil.copytree(ROOT / "backend", tmp_path / "backend", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "backend" / module
    text = path.read_text()
    anchor = "from __future__ import annotations\n"
    path.write_text(text.replace(anchor, anchor + wrong + "  # noqa\n", 1))
    run = lint(tmp_path)
    assert run.returncode != 0 and "BROKEN" in run.stdout, run.stdout[-2000:]


def test_every_part_says_what_it_holds_and_may_import():
    for part in PARTS:
        doc = ast.get_docstring(ast.parse((ROOT / "backend" / part / "__init__.py").read_text()))
        assert doc and len(doc) > 100, part
        assert "import" in doc.lower(), part  # what it may (and may not) import


def test_the_wheel_carries_every_part(tmp_path):
    src = tmp_path / "src"  # built from a copy: the build leaves nothing in the tree
    shutil.copytree(ROOT / "backend", src / "backend", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    code = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path / 'dist')!r})"
    wheel = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    [built] = (tmp_path / "dist").glob("label_studio_sam3-*.whl")
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "backend").rglob("*.py")}
    assert files <= set(zipfile.ZipFile(built).namelist()), files - set(zipfile.ZipFile(built).namelist())
    # A pure-Python wheel imports straight from its zip file: each part from the wheel, none from the tree.
    packages = ["backend"] + [f"backend.{part}" for part in PARTS]
    code = ("import importlib\n"
            f"for m in {packages!r}:\n"
            f"    assert importlib.import_module(m).__file__.startswith({str(built)!r}), m\n"
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(built)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]


def _sizes():
    for path in sorted((ROOT / "backend").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield path.relative_to(ROOT), node, node.end_lineno - node.lineno + 1


def test_functions_and_classes_stay_small_or_say_why():
    """No product function over ~50 lines, no class over ~200, unless its docstring says why it must be."""
    too_long = []
    for path, node, lines in _sizes():
        limit = 200 if isinstance(node, ast.ClassDef) else 55
        doc = ast.get_docstring(node) or ""
        if lines > limit and "because it must be" not in doc:
            too_long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, too_long


def test_every_setting_is_documented_and_every_documented_setting_exists():
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", (ROOT / "docs/configuration.md").read_text(), re.M))
    read = {f.metadata["env"] for f in fields(Settings)}
    assert read - documented == set(), "settings config.py reads that docs/configuration.md does not describe"
    cli = set(re.findall(r'os\.environ\.get\("([A-Z0-9_]+)"', (ROOT / "backend/cli/__init__.py").read_text()))
    assert cli and documented - read - cli == set(), "documented settings that nothing reads"


def test_the_readme_stays_a_first_page_and_its_links_resolve():
    readme = ROOT / "README.md"
    assert len(readme.read_bytes()) <= 12 * 1024  # the reference lives in docs/
    for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"
