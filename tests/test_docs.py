"""Issue 26: the documentation site builds with ``--strict``, its gallery script draws every picture it
promises from the real MiniLM, and every Python snippet of the README and of the docs runs on its own.

Each snippet runs alone, in a fresh interpreter and an empty folder: a snippet that leans on names
defined by an earlier one (as the README's "Long contexts" and "Analyses" snippets did) fails here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import attention_hooker

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
GALLERY_SCRIPT = ROOT / "scripts" / "gallery.py"
_FENCE = re.compile(r"^```(?:python|py)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
# Files a snippet says it writes: save_path="...", .save("..."), stream_to("...").
_WRITES = re.compile(r"""(?:save_path=|\.save\(|stream_to\()["']([^"']+)["']""")


def _env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
                NO_MKDOCS_2_WARNING="1", **extra)


def python_snippets(page: Path):
    return _FENCE.findall(page.read_text(encoding="utf-8"))


SNIPPETS = [(f"{page.relative_to(ROOT)}:{i + 1}", code) for page in PAGES
            for i, code in enumerate(python_snippets(page))]


def test_every_python_block_is_found_and_each_page_of_the_guide_has_one():
    """The snippet test below runs what the fence pattern finds: a block it misses (indented, another
    spelling) would go untested, so every ```python opening must be one of them."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        openings = len(re.findall(r"^\s*```(?:python|py)\b", text, re.M))
        assert openings == len(python_snippets(page)), f"{page.relative_to(ROOT)}: a python block the test misses"
    with_code = {where.split(":")[0] for where, _ in SNIPPETS}
    for page in ("README.md", "docs/getting-started.md", "docs/capture.md", "docs/long-contexts.md",
                 "docs/many-processes.md", "docs/analyses.md", "docs/views.md", "docs/saving.md"):
        assert page in with_code, f"{page} has no Python snippet"


def test_the_readme_quick_start_is_three_commands_and_the_readme_offers_every_extra():
    """The quick start stays install, demo, the test command CI runs; and beside ``.[dev]`` (which pulls
    bertviz, playwright, timm, ...) the README offers each lighter extra of pyproject.toml."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = re.search(r"## Quick start\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.split("#")[0].strip()]
    assert commands == ['pip install -e ".[dev]"', "attention-hooker demo", "python -m pytest"]
    assert "\npython -m pytest\n" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([a-z]+) = \[", section, re.M)
    assert {"plot", "hf", "io", "analysis", "all", "docs", "dev"} <= set(extras)
    for extra in extras:
        assert f'pip install -e ".[{extra}]"' in readme, f"the README does not offer the {extra!r} extra"


def _run_snippet(code: str, folder: Path) -> subprocess.CompletedProcess:
    script = folder / "snippet.py"
    script.write_text(code, encoding="utf-8")
    # One torch thread each: the snippets run side by side, one per core.
    try:
        return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True,
                              env=_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), timeout=300)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([sys.executable, str(script)], -1, "", "it ran past 300 s: make it smaller")


@pytest.fixture(scope="module")
def snippet_runs(request, tmp_path_factory):
    """The selected snippets, each run alone in a fresh interpreter and an empty folder of its own,
    as many at a time as there are cores: ``{where: (folder, completed process)}``."""
    selected = [item.callspec.params["where"] for item in request.session.items
                if getattr(item, "callspec", None) is not None and "where" in item.callspec.params
                and item.originalname == "test_every_python_snippet_runs_on_its_own"]
    code = dict(SNIPPETS)
    folders = {where: tmp_path_factory.mktemp("snippet") for where in selected}
    with ThreadPoolExecutor(max_workers=max(1, min(len(selected), os.cpu_count() or 1))) as pool:
        runs = {where: pool.submit(_run_snippet, code[where], folders[where]) for where in selected}
        return {where: (folders[where], run.result()) for where, run in runs.items()}


@pytest.mark.parametrize("where, code", SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_every_python_snippet_runs_on_its_own(where, code, snippet_runs):
    folder, result = snippet_runs[where]
    assert result.returncode == 0, f"{where} fails when run on its own:\n{result.stderr[-4000:]}"
    for written in _WRITES.findall(code):
        assert (folder / written).exists(), f"{where} says it writes {written}, which is not there"


def _mkdocs_build(config: Path, site: Path, cwd: Path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.fail("building the docs needs mkdocs-material and mkdocstrings-python: pip install -e '.[docs]'")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=cwd, capture_output=True, text=True, env=_env(), timeout=300)


def test_the_site_builds_strict_with_an_api_entry_for_every_public_name(tmp_path):
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site", ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    api = "".join(page.read_text(encoding="utf-8") for page in (tmp_path / "site" / "api").rglob("*.html"))
    public = [name for name in attention_hooker.__all__ if name != "__version__"]
    for name in public:
        anchor = f'id="{getattr(attention_hooker, name).__module__}.{name}"'  # where the name is defined
        assert anchor in api, f"the API reference has no entry for attention_hooker.{name}"
    assert (tmp_path / "site" / "index.html").exists()
    for page in ("getting-started", "capture", "long-contexts", "many-processes", "analyses", "views", "saving",
                 "command-line", "gallery", "limits", "development", "architecture"):
        assert (tmp_path / "site" / page / "index.html").exists(), f"docs/{page}.md is not a page of the site"


def test_a_broken_reference_fails_the_strict_build(tmp_path):
    """The build is a check only if it fails: a link to a missing page, and a docstring reference to
    a missing object, each stop it."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "src").symlink_to(ROOT / "src")
    page = tmp_path / "docs" / "capture.md"
    original = page.read_text(encoding="utf-8")
    page.write_text(original + "\nSee [the missing page](no-such-page.md).\n", encoding="utf-8")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site", tmp_path)
    assert result.returncode != 0 and "no-such-page.md" in result.stderr, result.stderr[-2000:]
    page.write_text(original + "\n::: attention_hooker.hooker.NoSuchHooker\n", encoding="utf-8")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site", tmp_path)
    assert result.returncode != 0 and "NoSuchHooker" in result.stderr, result.stderr[-2000:]


def _gallery_module():
    spec = importlib.util.spec_from_file_location("docs_gallery", GALLERY_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _picture(path: Path) -> np.ndarray:
    from matplotlib import image

    return image.imread(path)[..., :3]  # (height, width, RGB) in 0..1


def test_the_gallery_script_draws_every_picture_it_promises_from_the_real_minilm(tmp_path):
    result = subprocess.run([sys.executable, str(GALLERY_SCRIPT), "--out", str(tmp_path)], capture_output=True,
                            text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    promised = _gallery_module().PICTURES
    assert result.stdout.split() == [str(tmp_path / name) for name in promised]
    committed = DOCS / "gallery"
    assert sorted(p.name for p in committed.glob("*.png")) == sorted(promised), "docs/gallery/ and PICTURES differ"
    page = (DOCS / "gallery.md").read_text(encoding="utf-8")
    for name, caption in promised.items():
        drawn = _picture(tmp_path / name)
        height, width = drawn.shape[:2]
        assert height >= 300 and width >= 500, f"{name} is {width}x{height}"
        colours = np.unique((drawn * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) >= 64, f"{name} has {len(colours)} colours: nothing was drawn"
        assert drawn.std() > 0.05, f"{name} is nearly one colour"
        assert _picture(committed / name).shape == drawn.shape, f"docs/gallery/{name} is stale: run scripts/gallery.py"
        assert f"![{caption}](gallery/{name})" in page, f"docs/gallery.md does not show {name} with its caption"
