"""Issue 27: the toy induction model shipped in attention_hooker.examples.induction (trained by
scripts/train_induction.py; the weights are loaded, never trained here). The model copies a repeated
half, and the library alone finds how: a previous-token head in layer 0, induction heads in layer 1,
which are the heads the model uses (knocked out by hand, they take most of the loss drop with them).
The capture equals the attention computed by hand from the model's weights, and the script still trains."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, induction_score, previous_token_score
from attention_hooker.examples.induction import (WEIGHTS, AttentionOnlyTransformer, InductionConfig, half_losses,
                                                 load_induction_model, read_record, repeated_random_tokens,
                                                 training_tokens)

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def trained():
    """The shipped model, 256 fresh sequences ``x x`` (a seed training never used), and its capture."""
    model, config = load_induction_model()
    ids = repeated_random_tokens(256, config, generator=torch.Generator().manual_seed(2027))  # (B, 2L)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        logits = model(ids)
    return model, config, ids, logits, {name: calls[0] for name, calls in hooker.values.items()}


def _knocked_out(model, config, ids, heads):
    """The halves' losses with ``heads`` [(layer, head), ...] zeroed by hand: their columns of the
    layer's output projection get 0 (the model's own code, no library involved)."""
    handles = []
    for layer in {layer for layer, _ in heads}:
        attn = model.layers[layer]

        def zero(module, args, layer=layer, attn=attn):
            x = args[0].clone()  # (B, T, H * E)
            for h in [h for l, h in heads if l == layer]:
                x[..., h * attn.head_dim:(h + 1) * attn.head_dim] = 0
            return (x,)

        handles.append(attn.out_proj.register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            return half_losses(model(ids), ids, config.half)
    finally:
        for handle in handles:
            handle.remove()


def _ideal_copy_loss(ids: torch.Tensor, half: int) -> float:
    """The repeated half's loss of a pure one-token copy: each query spreads its prediction evenly
    over the tokens that followed its earlier copies (a token repeated inside the first half leaves
    it unsure). Computed here from the ids alone."""
    losses = []
    for row in ids.tolist():
        for i in range(half, 2 * half - 1):  # query i predicts token i + 1
            followers = [row[j + 1] for j in range(i) if row[j] == row[i]]
            losses.append(-math.log(followers.count(row[i + 1]) / len(followers)))
    return sum(losses) / len(losses)


def test_the_repeated_half_is_predicted_and_the_first_is_not(trained):
    """Measured on 256 fresh sequences: first half 4.19 nats (ln 64 = 4.16: random tokens cannot be
    predicted), repeated half 0.24 nats, below the 0.29 nats of an ideal one-token copy."""
    model, config, ids, logits, _ = trained
    losses = half_losses(logits, ids, config.half)
    assert abs(losses.first - math.log(config.vocab)) < 0.1, losses
    assert losses.repeated < 0.1 * losses.first, losses
    assert losses.repeated < _ideal_copy_loss(ids, config.half), losses


def test_the_record_beside_the_weights_is_theirs():
    """The config, the seed and the held-out losses recorded at training are what the shipped weights give."""
    record = read_record()
    model, config = load_induction_model()
    assert config == InductionConfig(**record["config"]) and isinstance(record["seed"], int)
    assert record["training"]["steps"] > 0 and record["training"]["history"]
    losses = record["losses"]
    ids = repeated_random_tokens(losses["eval_batch"], config, generator=torch.Generator().manual_seed(losses["eval_seed"]))
    with torch.no_grad():
        measured = half_losses(model(ids), ids, config.half)
    assert measured.first == pytest.approx(losses["first"], abs=1e-4)
    assert measured.repeated == pytest.approx(losses["repeated"], abs=1e-4)
    assert WEIGHTS.stat().st_size < 300_000  # a few hundred KB at most


def test_the_library_finds_the_previous_token_and_induction_heads(trained):
    """Measured (mean over 256 sequences x x): induction_score, layer 1: 0.94 0.09 0.81 0.94, layer 0:
    0.04 at most; previous_token_score, layer 0: 0.00 0.06 0.57 0.81, layer 1: 0.05 at most."""
    model, config, ids, _, captured = trained
    assert list(captured) == ["layers.0", "layers.1"]
    induction = {name: induction_score(a, ids).mean(0) for name, a in captured.items()}  # (heads,) each
    previous = {name: previous_token_score(a).mean(0) for name, a in captured.items()}
    # Layer 1 holds the induction heads, layer 0 the previous-token head; no head of layer 0 does induction.
    assert induction["layers.1"].max() > 0.8, induction
    assert induction["layers.0"].max() < 0.1, induction
    assert previous["layers.0"].max() > 0.4, previous
    assert previous["layers.1"].max() < 0.1, previous
    inducing = [h for h in range(config.heads) if induction["layers.1"][h] > 0.5]
    others = [h for h in range(config.heads) if h not in inducing]
    assert others, induction  # some layer-1 head is not an induction head: the score tells heads apart
    assert all(induction["layers.1"][h] < 0.5 for h in others)


def test_the_heads_the_library_names_are_the_ones_the_model_uses(trained):
    """Knocking out (by hand) the layer-1 heads whose induction_score is above 0.5 takes most of
    the repeated half's loss drop with it; knocking out the other layer-1 heads does not; so does
    knocking out the layer-0 head with the highest previous_token_score, more than any other layer-0 head.

    Measured (repeated half, nats): 0.22 with every head; layer 1 heads 0, 2, 3 out: 4.36 (the whole
    drop from 4.19 is gone); layer 1 head 1 out: 0.22 (it serves the first half: 4.19 -> 5.05);
    layer 0 heads out one at a time: 1.53 0.38 0.41 2.71 (head 3, the previous-token head, most)."""
    model, config, ids, logits, captured = trained
    base = half_losses(logits, ids, config.half)
    drop = base.first - base.repeated
    induction = induction_score(captured["layers.1"], ids).mean(0)
    inducing = [(1, h) for h in range(config.heads) if induction[h] > 0.5]
    others = [(1, h) for h in range(config.heads) if induction[h] <= 0.5]
    without_inducing = _knocked_out(model, config, ids, inducing)
    without_others = _knocked_out(model, config, ids, others)
    assert without_inducing.repeated - base.repeated > 0.5 * drop, (base, without_inducing)
    assert without_others.repeated - base.repeated < 0.1 * drop, (base, without_others)
    previous = previous_token_score(captured["layers.0"]).mean(0)
    hurt = [_knocked_out(model, config, ids, [(0, h)]).repeated for h in range(config.heads)]
    assert max(range(config.heads), key=hurt.__getitem__) == int(previous.argmax()), (previous, hurt)


def _hand_attention(model: AttentionOnlyTransformer, ids: torch.Tensor):
    """Each layer's weights from its own q/k projections, softmax(q k^T / sqrt(head_dim)) with keys
    after the query masked, and the logits the same hand computation gives."""
    x = model.embed.weight[ids] + model.pos_embed.weight[: ids.shape[1]]  # (B, T, D)
    maps = []
    for attn in model.layers:
        b, t, d = x.shape
        q, k, v = (torch.einsum("btd,ed->bte", x, p.weight).view(b, t, attn.num_heads, -1).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, H, T, E)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        weights = scores.softmax(-1)  # (B, H, Q, K)
        maps.append(weights)
        x = x + (weights @ v).transpose(1, 2).reshape(b, t, d) @ attn.out_proj.weight.T
    return maps, model.unembed(model.final_norm(x))


def test_the_capture_equals_the_attention_computed_by_hand(trained):
    model, config, ids, logits, captured = trained
    with torch.no_grad():
        maps, hand_logits = _hand_attention(model, ids)
    torch.testing.assert_close(hand_logits, logits, atol=1e-4, rtol=1e-4)  # the hand computation is the model
    for layer, expected in enumerate(maps):
        got = captured[f"layers.{layer}"]
        assert got.shape == (256, config.heads, config.tokens, config.tokens)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_training_tokens_repeat_a_segment_of_varying_length_at_varying_places():
    """Every row repeats a segment at once; its place and length vary (a copy by position alone
    cannot do the training task, unlike x x at fixed places)."""
    config = InductionConfig(vocab=8, half=6)
    ids = training_tokens(64, config, shortest=3, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (64, 12) and int(ids.min()) >= 0 and int(ids.max()) < 8
    repeats = [{(p, s) for s in range(3, 7) for p in range(0, 12 - 2 * s + 1) if row[p: p + s] == row[p + s: p + 2 * s]}
               for row in ids.tolist()]
    assert all(repeats), ids
    assert len({p for found in repeats for p, _ in found}) > 3 and len({s for found in repeats for _, s in found}) > 2
    with pytest.raises(AttentionHookerError, match=r"shortest=0 must be an int in 1..6"):
        training_tokens(2, config, shortest=0)


def test_bad_input_is_named():
    with pytest.raises(AttentionHookerError, match="d_model=30 must be a multiple of heads=4"):
        InductionConfig(d_model=30)
    with pytest.raises(AttentionHookerError, match="InductionConfig.vocab=0 must be a positive int"):
        InductionConfig(vocab=0)
    model = AttentionOnlyTransformer(InductionConfig(vocab=10, half=3))
    with pytest.raises(AttentionHookerError, match=r"input_ids hold ids 0..10; the vocabulary is 0..9"):
        model(torch.tensor([[0, 10]]))
    with pytest.raises(AttentionHookerError, match="input_ids has 7 tokens; the model has positions for 1 to 6"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(AttentionHookerError, match=r"must be \(batch, tokens\) integer ids"):
        model(torch.zeros(6, dtype=torch.long))


def test_no_record_beside_weights_is_named(tmp_path):
    lone = tmp_path / "m.safetensors"
    lone.write_bytes(b"")
    with pytest.raises(AttentionHookerError, match="no record m.json beside"):
        load_induction_model(lone)


def test_the_weights_ship_with_the_package():
    """pyproject's package-data patterns match the weights and their record (a wheel without them
    could not load the model)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["attention_hooker"]
    package = ROOT / "src" / "attention_hooker"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert {WEIGHTS, WEIGHTS.with_suffix(".json")} <= shipped


def test_the_training_script_trains(tmp_path):
    """scripts/train_induction.py runs (a tiny budget: 60 steps of a smaller model), its loss goes
    down, and what it writes loads with the losses it recorded."""
    out = tmp_path / "toy.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_induction.py"), "--out", str(out),
                           "--steps", "60", "--log-every", "20", "--batch", "16", "--eval-batch", "32",
                           "--half", "8", "--shortest", "4", "--d-model", "32", "--threads", "1", "--seed", "3"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = read_record(out)
    history = [entry["loss"] for entry in record["training"]["history"]]
    assert [e["step"] for e in record["training"]["history"]] == [1, 20, 40, 60]
    assert history[-1] < history[0] - 0.05, history
    assert record["seed"] == 3 and record["config"]["half"] == 8 and record["config"]["d_model"] == 32
    model, config = load_induction_model(out)
    ids = repeated_random_tokens(32, config, generator=torch.Generator().manual_seed(record["losses"]["eval_seed"]))
    with torch.no_grad():
        assert half_losses(model(ids), ids, 8).first == pytest.approx(record["losses"]["first"], abs=1e-4)
    assert "held-out loss" in done.stdout


def test_the_training_script_names_a_bad_option(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_induction.py"), "--out", str(tmp_path / "m.safetensors"),
                           "--steps", "1", "--half", "8"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "train_induction.py: error: shortest=12 must be an int in 1..8 (the half's length)"
    assert not (tmp_path / "m.safetensors").exists()
