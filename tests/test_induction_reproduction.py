"""Issue 27, parts 3 and 4: Olsson et al.'s induction heads, found and tested with the library alone.

On the trained toy model (attention_hooker.examples.induction: 2 attention-only layers of 4 heads,
random tokens repeated twice), the library's scores name a previous-token head in layer 0 and
induction heads in layer 1; its knock-outs show the output needs exactly those; patching the
induction heads' patterns from a clean run into a corrupted one restores the copy; and the first-order
head importance ranks the heads as the measured knock-outs do. The figures are the README's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention_hooker import (HeadIntervention, TransformerAttentionHooker, duplicate_token_score, head_importance,
                              induction_score, knockout_effects, previous_token_score, record_heads)
from attention_hooker.examples.induction import load_induction_model, repeated_random_tokens


@pytest.fixture(scope="module")
def toy():
    model, config = load_induction_model()
    ids = repeated_random_tokens(64, config, generator=torch.Generator().manual_seed(2027))
    return model, config, ids


def _per_item_repeated_loss(half):
    """The next-token loss on the repeated half (tokens half+1 .. 2*half-1), per item: ``(batch,)``."""
    def metric(logits, ids):
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
        return per_token[:, half:].mean(1)
    return metric


def _losses(model, ids, half, intervention=None):
    """(first half, repeated half) mean losses, inside ``intervention`` when given."""
    with torch.no_grad():
        if intervention is None:
            logits = model(ids)
        else:
            with intervention:
                logits = model(ids)
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
    return per_token[:, : half - 1].mean().item(), per_token[:, half:].mean().item()


def test_the_scores_name_the_circuit(toy):
    model, config, ids = toy
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(ids)
    induction = {name: induction_score(calls[0], ids).mean(0) for name, calls in hooker.values.items()}
    previous = {name: previous_token_score(calls[0]).mean(0) for name, calls in hooker.values.items()}
    assert sorted(torch.nonzero(induction["layers.1"] > 0.5).flatten().tolist()) == [0, 2, 3]
    assert (induction["layers.0"] < 0.1).all()
    assert int(previous["layers.0"].argmax()) == 3 and previous["layers.0"][3] > 0.7


def test_knocking_out_the_induction_heads_removes_the_copy_and_other_heads_do_not(toy):
    model, config, ids = toy
    half = config.half
    first, repeated = _losses(model, ids, half)
    assert first > 4.0 and repeated < 0.3  # ln 64 = 4.16 on random tokens; the repeat is copied
    drop = first - repeated
    _, without_induction = _losses(model, ids, half, HeadIntervention(model).knock_out("layers.1", [0, 2, 3]))
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(ids)
    unnamed = {name: [h for h in range(4) if max(induction_score(calls[0], ids).mean(0)[h],
                                                 previous_token_score(calls[0]).mean(0)[h],
                                                 duplicate_token_score(calls[0], ids).mean(0)[h]) < 0.1]
               for name, calls in hooker.values.items()}
    assert unnamed == {"layers.0": [1], "layers.1": [1]}  # the heads no role score names
    _, without_unnamed = _losses(model, ids, half, HeadIntervention(model).knock_out("layers.0", unnamed["layers.0"])
                                 .knock_out("layers.1", unnamed["layers.1"]))
    assert (without_induction - repeated) / drop > 0.9, "the induction heads carry the copy"
    assert (without_unnamed - repeated) / drop < 0.05, "the heads no score names do not"
    effects = knockout_effects(model, ids, _per_item_repeated_loss(half))
    ranked = [(layer, head) for layer, head, _ in effects.ranked()]
    assert ranked[0] == ("layers.0", 3), "the previous-token head: every induction head reads it"
    # the duplicate-token head (layer 0 head 0), which the induction story does not name, matters too
    assert set(ranked[:4]) == {("layers.0", 3), ("layers.1", 0), ("layers.1", 3), ("layers.0", 0)}
    assert abs(effects["layers.1"][1].item()) < 0.05  # the layer-1 head that is no induction head


def test_patching_the_induction_patterns_from_a_clean_run_restores_the_copy(toy):
    """Corrupted: the previous-token head knocked out, so the induction heads lose their pattern (K-composition).
    Their patterns patched in from the clean run, with everything else corrupted, the copy comes back."""
    model, config, ids = toy
    half = config.half
    _, clean = _losses(model, ids, half)
    with torch.no_grad(), record_heads(model, ["layers.1"], weights=True) as recording:
        model(ids)
    _, corrupted = _losses(model, ids, half, HeadIntervention(model).knock_out("layers.0", 3))
    _, patched = _losses(model, ids, half, HeadIntervention(model).knock_out("layers.0", 3)
                         .patch("layers.1", recording, heads=[0, 2, 3], what="weights"))
    _, patched_other = _losses(model, ids, half, HeadIntervention(model).knock_out("layers.0", 3)
                               .patch("layers.1", recording, heads=[1], what="weights"))
    assert corrupted > clean + 2.0
    assert (corrupted - patched) / (corrupted - clean) > 0.9, "the induction patterns restore the copy"
    assert (corrupted - patched_other) / (corrupted - clean) < 0.1, "another head's pattern does not"


def test_head_importance_ranks_the_heads_as_the_measured_knock_outs_do(toy):
    """Michel et al.'s first-order estimate against the measured effect: Spearman's rank correlation."""
    stats = pytest.importorskip("scipy.stats")
    model, config, ids = toy
    metric = _per_item_repeated_loss(config.half)
    with TransformerAttentionHooker(model, keep_grad=True) as hooker:
        metric(model(ids), ids).mean().backward()
    model.zero_grad(set_to_none=True)
    estimated = torch.cat([head_importance(hooker.values[name][0], hooker.gradients[name][0]).mean(0)
                           for name in ("layers.0", "layers.1")])
    measured = torch.cat(list(knockout_effects(model, ids, metric).values()))
    rho = stats.spearmanr(estimated.numpy(), measured.numpy()).statistic
    assert rho > 0.8, rho
