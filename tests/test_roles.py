"""Issue 14: head-role scores, each against a hand-computed case, and on the real MiniLM."""

from __future__ import annotations

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker
from attention_hooker.analysis.roles import duplicate_token_score, head_confidence, induction_score, previous_token_score


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


# ------------------------------------------------------------------ sink heads (Gu et al. 2024)
def test_sink_heads_are_those_whose_mean_attention_on_the_first_token_passes_the_threshold():
    from attention_hooker.analysis.roles import sink_heads

    a = torch.zeros(1, 3, 4, 4)
    a[0, 0, :, 0] = 1.0  # all on the first token: a sink head
    a[0, 1] = torch.eye(4)  # on itself: first-token share 1/4
    a[0, 2, :, 0], a[0, 2, :, 1] = 0.25, 0.75
    assert sink_heads(a).tolist() == [[True, False, False]]
    assert sink_heads(a, threshold=0.25).tolist() == [[True, False, False]], "exactly the threshold is not above it"
    assert sink_heads(a, threshold=0.2).tolist() == [[True, True, True]]
    assert sink_heads(a, position=1, threshold=0.5).tolist() == [[False, False, True]]
    with pytest.raises(AttentionHookerError, match=r"threshold=1.5 must be a number in \[0, 1\)"):
        sink_heads(a, threshold=1.5)


# ------------------------------------------------------------------ retrieval heads (Wu et al. 2024)
def _retrieval_by_loops(attn, ids, needle, generated_from):
    """Wu et al.'s definition written out: for each generated token, each head's top key; the set
    of needle positions whose token was the one generated; its size over the needle's length."""
    batch, heads, tokens, _ = attn.shape
    out = torch.zeros(batch, heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            copied = set()
            for t in range(generated_from, tokens):
                j = int(attn[b, h, t - 1].argmax())
                if needle[0] <= j < needle[1] and int(ids[b, j]) == int(ids[b, t]):
                    copied.add(j)
            out[b, h] = len(copied) / (needle[1] - needle[0])
    return out


def test_retrieval_score_by_hand():
    from attention_hooker.analysis.roles import retrieval_score

    ids = torch.tensor([[5, 6, 7, 8, 1, 2, 6, 7, 8, 6]])  # needle 5 6 7 8 at 0..3; generated from 6: 6 7 8 6
    a = torch.zeros(1, 3, 10, 10)
    a[0, :, :, 0] = 1.0
    for t, j in zip(range(6, 10), (1, 2, 3, 1)):  # head 0 looks at the copy of each generated token
        a[0, 0, t - 1] = 0
        a[0, 0, t - 1, j] = 1.0
    for t in range(6, 10):  # head 1 looks at the needle, at the wrong token (5)
        a[0, 1, t - 1] = 0
        a[0, 1, t - 1, 0] = 1.0
    a[0, 2, 5] = 0  # head 2's first step looks mostly outside the needle (position 4); then at its start
    a[0, 2, 5, 1] = 0.4
    a[0, 2, 5, 4] = 0.6
    got = retrieval_score(a, ids, needle=(0, 4), generated_from=6)
    assert got.tolist() == [[0.75, 0.0, 0.0]], "head 0 copied positions 1, 2, 3 (1 twice): 3 of 4"
    torch.testing.assert_close(got, _retrieval_by_loops(a, ids, (0, 4), 6))
    with pytest.raises(AttentionHookerError, match=r"needle=\(3, 2\) must be \(start, stop\)"):
        retrieval_score(a, ids, needle=(3, 2), generated_from=6)
    with pytest.raises(AttentionHookerError, match="generated_from=0 must be a position in 1..10"):
        retrieval_score(a, ids, needle=(0, 4), generated_from=0)


def test_retrieval_score_of_greedy_generation_steps_equals_the_definition_written_out():
    from attention_hooker import stitch_steps
    from attention_hooker.analysis.roles import retrieval_score

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    half = torch.randint(3, 60, (2, 12))
    prompt = torch.cat([half, half[:, :4]], dim=1)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        ids = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for name, calls in hooker.values.items():
        attn = stitch_steps(calls)  # the last generated token's query never ran: one row fewer than ids
        assert attn.shape[-1] == ids.shape[1] - 1
        got = retrieval_score(attn, ids, needle=(0, 12), generated_from=16)
        assert got.shape == (2, 4)
        square = torch.zeros(2, 4, ids.shape[1], ids.shape[1])
        square[:, :, :-1, :-1] = attn
        torch.testing.assert_close(got, _retrieval_by_loops(square, ids, (0, 12), 16))
        assert torch.equal(retrieval_score(attn, ids[:, :-1], needle=(0, 12), generated_from=16),
                           _retrieval_by_loops(attn, ids[:, :-1], (0, 12), 16)), "without the last token: one step less"
