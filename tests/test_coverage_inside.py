"""A hooked wrapper is "captured inside" only for runs in which a hooked layer inside it captured.

Before, one capture by an inner hooked layer at any time excused every run of the wrapper: a
block that computed a hand-written attention (``exp / sum``, which no route sees) in a run where
its hooked ``self_attn`` did not run was reported "captured inside", not missing.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from attention_hooker import TransformerAttentionHooker


class _Block(nn.Module):
    """Runs its hooked ``self_attn`` when ``use_inner``; else its own hand-written attention over ``x``."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.q = nn.Linear(8, 8)

    def forward(self, x, use_inner: bool):
        if use_inner:
            return x + self.self_attn(x, x, x)[0]
        scores = self.q(x) @ x.transpose(-1, -2)
        weights = scores.exp()
        weights = weights / weights.sum(-1, keepdim=True)  # attention no route sees
        return x + weights @ x


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x, use_inner: bool):
        return self.block(x, use_inner)


def _report(*runs):
    torch.manual_seed(0)
    model = _Model().eval()
    with warnings.catch_warnings(), torch.no_grad(), \
            TransformerAttentionHooker(model, layer_regex=r"^block(\.self_attn)?$") as hooker:
        warnings.simplefilter("ignore")
        for use_inner in runs:
            model(torch.randn(1, 4, 8), use_inner)
    return hooker.report()


def test_a_wrapper_is_captured_inside_when_its_inner_layer_captured_in_every_run():
    report = _report(True, True)
    assert report["block"].status == "captured inside" and report["block"].inside == ("block.self_attn",)
    assert report["block"].runs == report["block"].runs_inside == 2
    assert report.missing == []


def test_a_run_of_the_wrapper_in_which_nothing_inside_captured_leaves_it_missing():
    report = _report(True, False)  # the second run's attention is the block's own exp / sum
    assert report["block"].status == "nothing captured"
    assert report.missing == ["block"]
    assert report["block"].runs == 2 and report["block"].runs_inside == 1
