"""Decisions made in one place (issue 21): the head count, the device check, the shape check.

Each test shows a case where the places that used to decide it disagreed.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from attention_hooker import TransformerAttentionHooker, find_attention_modules
from attention_hooker.analysis.core import layer_sequence
from attention_hooker.capture.heads import declared_heads, head_count
from attention_hooker.cli.capture_runs import _planned_bytes
from attention_hooker.cli.main import main
from attention_hooker.errors import AttentionHookerError


class NHeads(nn.Module):
    """Attention that names its head count ``n_heads`` (MPT, DBRX and OLMo configurations do)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.n_heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = NHeads()
        self.config = types.SimpleNamespace(n_heads=4)

    def forward(self, x):
        return self.mixer(x)


def test_the_head_count_is_read_by_one_rule_for_finding_checking_and_planning():
    """The command line's plan of a streamed capture read (num_attention_heads, n_head, num_heads)
    while finding modules read n_heads too: a model whose configuration says n_heads got no
    plan (the free-space check came only after the first call)."""
    model = Wrapped()
    assert [name for name, _ in find_attention_modules(model)] == ["mixer"]
    assert declared_heads(model.mixer) == 4 and head_count(model.config) == 4
    hooker = TransformerAttentionHooker(model)
    loaded = types.SimpleNamespace(model=model)
    assert _planned_bytes(loaded, hooker, rows=10, keys=10) == 1 * 4 * 10 * 10 * 4
    with hooker, torch.no_grad():
        model(torch.randn(1, 5, 16))
    assert hooker.values["mixer"][0].shape == (1, 4, 5, 5)


def test_the_command_line_checks_a_device_as_the_library_does(tmp_path, capsys):
    """--device meta passed the command line's own check (devices are checked before the model)."""
    status = main(["run", "--model", str(tmp_path / "model"), "--text", "x", "--device", "meta"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.splitlines()[0].endswith("--device 'meta' holds no data; expected a device such as 'cpu' or 'cuda:0'")


def test_one_shape_check_for_views_and_analyses():
    with pytest.raises(AttentionHookerError) as from_analysis:
        layer_sequence([torch.rand(2, 3)])
    from attention_hooker._tensor import as_batched

    with pytest.raises(AttentionHookerError) as from_views:
        as_batched(torch.rand(2, 3), "attentions[0]")
    assert str(from_analysis.value) == str(from_views.value)
