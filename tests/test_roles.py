"""Issue 14: head-role scores, each against a hand-computed case, and on the real MiniLM."""

from __future__ import annotations

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker
from attention_hooker.roles import duplicate_token_score, head_confidence, induction_score, previous_token_score


def _causal(rows):
    return torch.tensor(rows, dtype=torch.float64)[None, None]  # (1, 1, T, T)


IDS = torch.tensor([[5, 7, 5, 7]])
ATTN = _causal([[1.0, 0, 0, 0],
                [0.5, 0.5, 0, 0],
                [0.6, 0.3, 0.1, 0],
                [0.1, 0.3, 0.4, 0.2]])


def test_previous_token_score_by_hand():
    # queries 1..3 on keys 0..2: 0.5, 0.3, 0.4
    assert previous_token_score(ATTN).item() == pytest.approx((0.5 + 0.3 + 0.4) / 3)
    assert previous_token_score(ATTN, padding_mask=torch.tensor([[1, 1, 1, 0]])).item() == pytest.approx(0.4)


def test_duplicate_token_score_by_hand():
    # query 2 (token 5) on its earlier copy key 0: 0.6; query 3 (token 7) on key 1: 0.3
    assert duplicate_token_score(ATTN, IDS).item() == pytest.approx((0.6 + 0.3) / 2)


def test_induction_score_by_hand():
    # query 2 (token 5): the token after the earlier 5 is key 1 -> 0.3; query 3 (token 7): key 2 -> 0.4
    assert induction_score(ATTN, IDS).item() == pytest.approx((0.3 + 0.4) / 2)
    no_repeat = torch.tensor([[1, 2, 3, 4]])
    assert induction_score(ATTN, no_repeat).item() == 0.0 and duplicate_token_score(ATTN, no_repeat).item() == 0.0


def test_head_confidence_by_hand():
    assert head_confidence(ATTN).item() == pytest.approx((1.0 + 0.5 + 0.6 + 0.4) / 4)
    assert head_confidence(torch.full((1, 1, 3, 8), 1 / 8)).item() == pytest.approx(1 / 8)


def test_role_scores_refuse_what_they_cannot_read():
    with pytest.raises(AttentionHookerError, match="needs self-attention"):
        previous_token_score(torch.full((1, 1, 2, 3), 1 / 3))
    with pytest.raises(AttentionHookerError, match=r"input_ids is \(1, 3\), expected \(batch, tokens\) = \(1, 4\)"):
        induction_score(ATTN, torch.tensor([[1, 2, 3]]))


def test_the_real_minilm_has_a_previous_token_head(minilm_sdpa, minilm_tokenizer):
    inputs = minilm_tokenizer("The cat sat on the mat because it was tired.", return_tensors="pt")
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        minilm_sdpa(**inputs)
    scores = torch.stack([previous_token_score(calls[0])[0] for calls in hooker.values.values()])  # (layers, heads)
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    assert scores.max() > 0.9 and (layer, head) == (0, 2), scores
    by_hand = hooker.values["encoder.layer.0.attention.self"][0][0, 2].diagonal(-1).double().mean()
    assert scores[0, 2].item() == pytest.approx(by_hand.item())
