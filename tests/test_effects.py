"""Issue 27, part 2: each head's measured knock-out effect on a metric, batched, next to its role scores.

The oracle of a batched measurement is the same knock-out run one head at a time
(``HeadIntervention.knock_out``, one forward each): batching may change nothing but the cost.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention_hooker import (HeadIntervention, InterventionError, knockout_effects, language_model_loss,
                              mean_pooled_output)
from attention_hooker.intervene.effects import knockout_plan

LAYERS = ["encoder.layer.0.attention.self", "encoder.layer.5.attention.self"]


def _tiny_gpt2(**config):
    """A GPT-2 language model of random weights (seed 0), in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()


def _one_at_a_time(model, inputs, metric, layers, heads):
    """Each head knocked out alone (one forward each), the metric's move: the oracle."""
    with torch.no_grad():
        base = metric(model(**inputs), inputs)
        effects = {}
        for layer in layers:
            moved = []
            for head in range(heads):
                with HeadIntervention(model).knock_out(layer, head):
                    knocked = metric(model(**inputs), inputs)
                moved.append((knocked.double() - base.double()).mean().item() if base.dim() == 1 else
                             (1 - torch.nn.functional.cosine_similarity(knocked.double(), base.double(), -1)).mean()
                             .item())
            effects[layer] = torch.tensor(moved, dtype=torch.float64)
    return effects


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_knock_outs_of_minilm_equal_one_at_a_time(minilm_path, minilm_tokenizer, attention):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path, attn_implementation=attention).eval()
    inputs = minilm_tokenizer(["The cat sat on the mat.", "A dog ran."], padding=True, return_tensors="pt")
    plans = []
    effects = knockout_effects(model, inputs, mean_pooled_output, layers=LAYERS, per_forward=7, on_plan=plans.append)
    assert str(plans[0]) == "24 knock-outs, 7 per forward: 5 forwards of up to 7 copies of the input (the plain " \
                            "run included)"
    assert effects.forwards == 5 and list(effects) == LAYERS and effects.base.shape == (2, 384)
    oracle = _one_at_a_time(model, inputs, mean_pooled_output, LAYERS, 12)
    for layer in LAYERS:
        torch.testing.assert_close(effects[layer], oracle[layer], atol=1e-5, rtol=1e-4)
        assert (effects[layer] > 0).all()  # every head moves the sentence embedding a little
    top = effects.ranked(3)
    assert top[0][2] >= top[1][2] >= top[2][2] and top[0][2] == max(v.max().item() for v in effects.values())


def test_language_model_loss_effects_of_a_decoder_equal_one_at_a_time():
    model = _tiny_gpt2(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=32)
    ids = torch.randint(0, 50, (1, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    effects = knockout_effects(model, inputs, language_model_loss, per_forward=3)
    oracle = _one_at_a_time(model, inputs, language_model_loss, ["transformer.h.0.attn", "transformer.h.1.attn"], 4)
    for layer, values in oracle.items():
        torch.testing.assert_close(effects[layer], values, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the metric is the loss the model computes itself
        torch.testing.assert_close(language_model_loss(model(**inputs), inputs)[0], model(**inputs, labels=ids).loss)


def test_per_item_gates_gate_each_item_its_own_way():
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    gates = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.5]])
    with torch.no_grad():
        with HeadIntervention(attention).scale("", gates):
            together, _ = attention(x, x, x)
        for item in range(3):
            with HeadIntervention(attention).scale("", gates[item]):
                alone, _ = attention(x[item:item + 1], x[item:item + 1], x[item:item + 1])
            torch.testing.assert_close(together[item:item + 1], alone, atol=1e-6, rtol=1e-5)
    with pytest.raises(InterventionError, match="gates for 2 batch items, but the call has 3"):
        with torch.no_grad(), HeadIntervention(attention).scale("", torch.ones(2, 2)):
            attention(x, x, x)


def test_mistakes_are_named():
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    run = dict(forward=lambda m, x: m(x, x, x))
    with pytest.raises(InterventionError, match=r"the metric gave \(\) on the plain run; expected one number per "
                                                r"item \(2,\) or one vector per item \(2, D\)"):
        knockout_effects(attention, x, lambda out, _: out[0].sum(), **run)
    with pytest.raises(InterventionError, match="per_forward must be a positive int"):
        knockout_effects(attention, x, lambda out, _: out[0].sum((1, 2)), per_forward=0, **run)
    with pytest.raises(InterventionError, match="inputs must be a tensor"):
        knockout_effects(attention, [x], lambda out, _: out[0].sum((1, 2)), **run)
    assert knockout_plan({"a": 2}, per_forward=16).forwards == 2


def test_the_language_model_loss_of_a_left_padded_text_is_the_texts_own():
    """Review: the first real token was scored as predicted from the pad before it."""
    model = _tiny_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=30, n_positions=16)
    ids = torch.randint(1, 30, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = language_model_loss(model(input_ids=ids), {"input_ids": ids})
        left = language_model_loss(model(input_ids=padded, attention_mask=mask, position_ids=position_ids),
                                   {"input_ids": padded, "attention_mask": mask})
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
