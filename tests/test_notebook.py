"""Issue 13: figures and the page show in a notebook as a user runs it: executed headless (nbclient)."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_a_notebook_shows_figures_and_the_page_without_extra_commands(minilm_path):
    cells = [
        "import os\nos.environ['HF_HUB_OFFLINE'] = '1'\nimport torch\nfrom transformers import AutoModel, "
        "AutoTokenizer\nfrom attention_hooker import TransformerAttentionHooker, plot_attention_grid, "
        "plot_attention_overview, render_html",
        f"path = {str(minilm_path)!r}\ntokenizer = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModel.from_pretrained(path).eval()\ninputs = tokenizer('The cat sat.', return_tensors='pt')\n"
        "tokens = tokenizer.convert_ids_to_tokens(inputs['input_ids'][0])\n"
        "with torch.no_grad(), TransformerAttentionHooker(model) as hooker:\n    model(**inputs)",
        "plot_attention_grid(hooker.values['encoder.layer.0.attention.self'][0], tokens)",
        "plot_attention_overview(hooker)",
        "render_html(hooker, tokens=tokens)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    outputs = [cell.outputs for cell in notebook.cells]
    for figure_cell in (2, 3):
        data = outputs[figure_cell][0]["data"]
        assert "image/png" in data, f"cell {figure_cell} shows {list(data)}: the figure as text"
    page = outputs[4][0]["data"]["text/html"]
    assert page.startswith("<iframe srcdoc=") and "onload=" in page and "760px" not in page
