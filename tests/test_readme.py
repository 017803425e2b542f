"""Issue 13: every Python snippet of the README runs as pasted, in order, in one fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_python_snippet_of_the_readme_runs_as_pasted(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 8
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n\n".join(f"# --- README snippet {i + 1}\n{block}" for i, block in enumerate(blocks)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for written in ("plots/layers.0.self_attn.png", "overview.png", "vit.png", "attention.html", "capture.safetensors"):
        assert (tmp_path / written).exists(), written
