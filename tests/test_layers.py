"""Issue 21: the package's dependency rules, checked with import-linter (pyproject.toml,
[tool.importlinter]); a deliberate violation fails them; every module has its layer; and
no module imports another module's private names."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "attention_hooker"
tomllib = pytest.importorskip("tomllib")
pytest.importorskip("importlinter")


def _lint(pythonpath: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"  # the lint-imports script
    return subprocess.run([sys.executable, "-c", command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_are_kept():
    done = _lint(ROOT / "src")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_deliberate_violation_breaks_them(tmp_path):
    """capture importing the streamer (a keeper) is caught."""
    shutil.copytree(PACKAGE, tmp_path / "attention_hooker", ignore=shutil.ignore_patterns("__pycache__"))
    coverage = tmp_path / "attention_hooker" / "capture" / "coverage.py"
    coverage.write_text(coverage.read_text() + "\nfrom ..keep import stream  # a deliberate violation\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "Capture knows no particular keeper, only the keeper protocol BROKEN" in done.stdout
    assert "attention_hooker.capture.coverage -> attention_hooker.keep.stream" in done.stdout


def _modules():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def test_every_module_has_its_layer():
    """A new module must be placed: it belongs to a layer (or a package that has one)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    loose = [name for name, _ in _modules()
             if name.count(".") and not any(name == p or name.startswith(p + ".") for p in placed)
             and name not in ("attention_hooker.__main__",)]
    assert not loose, f"modules without a layer in pyproject.toml: {sorted(loose)}"


def test_no_module_imports_another_modules_private_names():
    found = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("attention_hooker")):
                found += [f"{name}:{node.lineno} imports {alias.name} from {'.' * node.level}{node.module or ''}"
                          for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, found


def test_the_old_module_paths_are_the_moved_modules_for_one_release():
    """The flat modules moved into capture/ keep/ analysis/ io/ views/ cli/; their old paths
    import the same module objects (what is set on one is seen through the other)."""
    import importlib

    from attention_hooker.moved_modules import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from attention_hooker import store, workflows
    from attention_hooker.html import render_html
    from attention_hooker.keep import memory
    from attention_hooker.views.page import render_html as moved_render_html

    assert store is memory and workflows.__name__ == "attention_hooker.cli.workflows"
    assert render_html is moved_render_html
    for new in MOVED.values():  # each keeps its own spec: its package's files stay readable
        assert importlib.import_module(new).__spec__.name == new, new
    from importlib import resources

    assert "function" in resources.files("attention_hooker.views.page").joinpath("view.js").read_text()
