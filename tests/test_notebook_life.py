"""Issue 26, a hooker's life in a notebook: cells are run again, raise, are fixed and run again.

A hooker nobody can reach any more leaves the model; a second one capturing on the same
modules is warned about at its first forward; ``attention_hooker.remove_hooks(model)`` takes
every hooker off; reading ``values`` of a hooker never set up says so.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from attention_hooker import AttentionCaptureWarning, AttentionHookerError, TransformerAttentionHooker, remove_hooks

from tiny_models import Stack


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_a_setup_cell_run_again_leaves_one_hooker_on_the_model():
    model = Stack().eval()
    x = torch.randn(1, 4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionCaptureWarning)  # the re-run pattern is not warned about
        for _ in range(5):
            hooker = TransformerAttentionHooker(model).setup()  # the name now holds the new one only
            with torch.no_grad():
                model(x)
    first = _hooks(model)
    assert [len(calls) for calls in hooker.values.values()] == [1, 1], "each forward stored once"
    hooker.remove_hooks()
    assert _hooks(model) == 0
    assert first == _hooks_of_one(model)


def _hooks_of_one(model: nn.Module) -> int:
    with TransformerAttentionHooker(model):
        return _hooks(model)


def test_a_cell_that_raised_and_was_fixed_works_again():
    """heads=[20] raised at every forward, and kept raising after the cell was fixed to heads=[0]."""
    model = Stack().eval()
    x = torch.randn(1, 4, 16)
    hooker = TransformerAttentionHooker(model, heads=[20]).setup()
    with pytest.raises(AttentionHookerError, match=r"heads=\[20\]"):
        model(x)
    hooker = TransformerAttentionHooker(model, heads=[0]).setup()
    with torch.no_grad():
        model(x)
    assert hooker.values["blocks.0"][0].shape == (1, 1, 4, 4)


def test_remove_hooks_takes_every_hooker_off_a_model_and_their_values_stay():
    model = Stack().eval()
    kept = [TransformerAttentionHooker(model).setup(), TransformerAttentionHooker(model, layer_regex=r"blocks\.1$").setup()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionCaptureWarning)
        with torch.no_grad():
            model(torch.randn(1, 4, 16))
    assert remove_hooks(model) == 2 and _hooks(model) == 0
    assert not any(h.is_setup for h in kept) and len(kept[1].values["blocks.1"]) == 1
    assert remove_hooks(model) == 0
    with pytest.raises(AttentionHookerError):
        remove_hooks("model")


def test_a_second_hooker_capturing_on_the_same_modules_is_named_at_its_first_forward():
    model = Stack().eval()
    first = TransformerAttentionHooker(model).setup()
    second = TransformerAttentionHooker(model, layer_regex=r"blocks\.0$").setup()
    with pytest.warns(AttentionCaptureWarning, match=r"1 other hooker\(s\) on the same modules, capturing too: "
                                                     r"TransformerAttentionHooker\(Stack, [12] hooked layers.*"
                                                     r"attention_hooker.remove_hooks\(model\)"):
        with torch.no_grad():
            model(torch.randn(1, 4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionCaptureWarning)  # once
        with torch.no_grad():
            model(torch.randn(1, 4, 16))
    first.remove_hooks(), second.remove_hooks()


def test_a_hooker_of_one_layer_inside_a_hooker_of_the_model_is_not_warned_about():
    """Nesting on purpose (the whole model, and one layer of it) stays silent, as test_robustness asks."""
    model = Stack().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionCaptureWarning)
        with torch.no_grad(), TransformerAttentionHooker(model) as outer, TransformerAttentionHooker(model.blocks[0]) as inner:
            model(torch.randn(1, 4, 16))
    assert len(outer.values["blocks.0"]) == len(inner.values[""]) == 1


def test_reading_values_of_a_hooker_never_set_up_says_so():
    model = Stack().eval()
    hooker = TransformerAttentionHooker(model)
    model(torch.randn(1, 4, 16))
    with pytest.warns(AttentionCaptureWarning, match="never set up, so it captured nothing"):
        assert hooker.values == {}
    repr(hooker)  # no warning from the repr


def test_in_a_notebook_cells_run_again_and_fixed_leave_one_working_hooker():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = [
        "import torch, warnings\nfrom torch import nn\nfrom attention_hooker import TransformerAttentionHooker\n"
        "torch.manual_seed(0)\nmodel = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, batch_first=True), 2)"
        ".eval()\nx = torch.randn(1, 5, 16)\n"
        "hooks = lambda: sum(len(m._forward_pre_hooks) for m in model.modules())",
        "hooker = TransformerAttentionHooker(model, heads=[20]).setup()\nmodel(x)",  # raises
        "hooker = TransformerAttentionHooker(model, heads=[0]).setup()\nwith torch.no_grad():\n    model(x)",
        "n = hooks()\nshapes = [tuple(c[0].shape) for c in hooker.values.values()]\nhooker.remove_hooks()\n"
        "alone = TransformerAttentionHooker(model).setup()\nprint(n > 0, n == hooks(), shapes)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", allow_errors=True)
    with client.setup_kernel():
        client.execute_cell(notebook.cells[0], 0)
        client.execute_cell(notebook.cells[1], 1)  # the error, kept in the kernel's last traceback
        for _ in range(3):  # the fixed cell, run again and again
            client.execute_cell(notebook.cells[2], 2)
        client.execute_cell(notebook.cells[3], 3)
    assert notebook.cells[1].outputs[0]["ename"] == "AttentionHookerError"
    assert not [o for o in notebook.cells[2].outputs if o.get("name") == "stderr"], "no warning on a re-run"
    # the hooks on the model are one hooker's, and it captured what heads=[0] asks for
    assert notebook.cells[3].outputs[0]["text"].strip() == "True True [(1, 1, 5, 5), (1, 1, 5, 5)]"
