"""BigBird and BigBird-Pegasus block-sparse attention: the five softmaxes of each layer call assembled
into one (batch, heads, query, key) map (capture/pieces.py, capture/block_sparse.py), checked against

- a hand computation from each layer's own weights: for each query, a softmax of q.k over the keys it
  attended, each counted as often as the layer attended it (its window, global and random blocks; a
  random block that is also a window or global block counts twice), padding masked;
- invariants: the model's outputs unchanged by the capture, and the map times value(x) equal to the
  layer's output before its output projection, row by row.

transformers' own ``attentions`` are not an oracle here: in eval every random block is key block 0
and transformers writes it over the global block instead of adding it (rows sum to less than 1; a
test below shows it). The random blocks the oracle uses are the ones the call gathered its keys with
(recorded from the module's ``torch_gather_b2`` by tests/block_sparse_oracle.py), in eval, in training
(dropout 0) and when the draw is replaced by another one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker, load  # noqa: E402
from attention_hooker.analysis.stats import HeadStatsAccumulator  # noqa: E402
from block_sparse_oracle import block_sparse_calls, block_sparse_layers, dense_by_hand  # noqa: E402

LENGTH = 17  # block_size 2: the model pads it to 18; the second row has 3 tokens of user padding


def _bigbird(block_size=2, random_blocks=1, heads=2):
    torch.manual_seed(0)
    config = transformers.BigBirdConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=32,
        attention_type="block_sparse", block_size=block_size, num_random_blocks=random_blocks,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BigBirdModel(config, add_pooling_layer=False).eval()


def _pegasus(block_size=2, random_blocks=1):
    torch.manual_seed(0)
    config = transformers.BigBirdPegasusConfig(
        vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_type="block_sparse",
        block_size=block_size, num_random_blocks=random_blocks, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0)
    return transformers.BigBirdPegasusModel(config).eval()


def _batch(pegasus=False, length=LENGTH):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -3:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if pegasus:
        inputs["decoder_input_ids"] = torch.randint(3, 100, (2, 4))
    return inputs


def _layers(model):
    return block_sparse_layers(model)


def _layer_calls(model, inputs):
    """Each block-sparse layer's call (tests/block_sparse_oracle.py): (hidden states, real queries, real keys,
    the random blocks its keys were gathered with, its output)."""
    def forward(model, inputs):
        with torch.no_grad():
            return model(**inputs)
    calls = block_sparse_calls(model, inputs, forward)
    calls.pop(None)
    return calls


def _hand(module, x, query_real, key_real, random):
    return dense_by_hand(module, x, query_real, key_real, random)


def _check_layers(model, inputs, hooker, tokens=LENGTH):
    calls = _layer_calls(model, inputs)
    assert len(calls) == 2
    for name, module in _layers(model):
        x, query_real, key_real, random, out = calls[name]
        hand, v = _hand(module, x, query_real, key_real, random)
        (got,) = hooker.values[name]
        assert got.shape == (2, module.num_attention_heads, tokens, tokens), "the model's padding is cropped"
        torch.testing.assert_close(got, hand[:, :, :tokens, :tokens], atol=1e-6, rtol=1e-5)
        real = query_real[:, :tokens]
        sums = got.sum(-1).transpose(1, 2)  # (B, T, H)
        torch.testing.assert_close(sums[real], torch.ones_like(sums[real]))
        assert (got.transpose(1, 2)[~real] == 0).all(), "padded query rows are exact zeros"
        assert (got[1, :, :, tokens - 3:] == 0).all(), "no query attends to the user's padding"
        length = x.shape[1]
        output = out.view(2, length, module.num_attention_heads, -1).transpose(1, 2)[:, :, :tokens]  # (B, H, T, d)
        torch.testing.assert_close(got @ v[:, :, :tokens], output, atol=1e-6, rtol=1e-5)
    return calls


def _captured(model, inputs, **options):
    with torch.no_grad():
        plain = model(**inputs)
    with torch.no_grad(), TransformerAttentionHooker(model, **options) as hooker:
        hooked = model(**inputs)
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state), "the capture changed the model's output"
    return hooker


@pytest.mark.parametrize("block_size, random_blocks", [(2, 1), (3, 2), (4, 1)])
def test_each_layer_is_the_hand_computation_from_its_weights_and_multiplies_the_values_into_its_output(
        block_size, random_blocks):
    model = _bigbird(block_size, random_blocks)
    inputs = _batch(length=40 if block_size == 4 else LENGTH * 2 if block_size == 3 else LENGTH)
    tokens = inputs["input_ids"].shape[1]
    hooker = _captured(model, inputs)
    assert hooker.report().missing == []
    calls = _check_layers(model, inputs, hooker, tokens)
    random = next(iter(calls.values()))[3]
    assert (random == 0).all(), "in eval transformers leaves every random block at key block 0"
    assert random.shape[-1] == random_blocks


def test_training_mode_draws_other_random_blocks_and_they_are_placed_where_the_call_took_them():
    model = _bigbird().train()  # dropout 0: the outputs are deterministic; the random blocks drawn by seed
    inputs = _batch()
    hooker = _captured(model, inputs)
    calls = _check_layers(model, inputs, hooker)
    random = next(iter(calls.values()))[3]
    assert (random != 0).any() and (random[:, 0] != random[:, 1]).any(), "training draws per head"


def test_a_random_draw_other_than_the_usual_one_is_read_from_the_call():
    """The random blocks are whatever the call gathered with, never guessed from the mode: the eval
    draw (all zeros) replaced by another pattern is placed where that pattern says."""
    model, inputs = _bigbird(), _batch()
    blocks = 18 // 2

    def draw(*args, num_heads, **kwargs):
        return [np.array([[(3 * row + head + 2) % blocks] for row in range(blocks - 2)], dtype=np.int32)
                for head in range(num_heads)]

    for _, module in _layers(model):
        module._bigbird_block_rand_mask_with_head = draw
    hooker = _captured(model, inputs)
    calls = _check_layers(model, inputs, hooker)
    random = next(iter(calls.values()))[3]
    assert random[0, 1, :, 0].tolist() == [(3 * row + 3) % blocks for row in range(blocks - 2)]


@pytest.mark.parametrize("train", [False, True])
def test_bigbird_pegasus_encoder_layers_are_assembled_and_its_decoder_is_unchanged(train):
    model, inputs = _pegasus().train(train), _batch(pegasus=True)
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True)
    hooker = _captured(model, inputs)
    assert hooker.report().missing == []
    _check_layers(model, inputs, hooker)
    decoder = [n for n in hooker.values if n.startswith("decoder.") and "encoder_attn" not in n]
    torch.testing.assert_close(hooker.values[decoder[0]][0], plain.decoder_attentions[0])


def test_transformers_attentions_overwrite_the_duplicated_blocks_that_the_capture_adds():
    """Why transformers' output is not the oracle in eval: its rows of query blocks 1 .. nb-2 lose the
    weight of the random block (key block 0) they attended a second time; the capture keeps it."""
    model, inputs = _bigbird(), _batch()
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True)
    hooker = _captured(model, inputs)
    name = _layers(model)[0][0]
    got, theirs = hooker.values[name][0][0], plain.attentions[0][0, :, :LENGTH, :LENGTH]  # batch row 0
    torch.testing.assert_close(got[:, :2], theirs[:, :2])  # the global query block: every key once
    assert theirs[:, 2:16].sum(-1).max() < 0.999 and torch.allclose(got[:, 2:16].sum(-1), torch.ones(2, 14))
    torch.testing.assert_close(got[:, 2:16, 2:], theirs[:, 2:16, 2:])  # the same away from key block 0


@pytest.mark.parametrize("selection", [dict(rows="last"), dict(heads=[1]), dict(keys=[0, 3, 5, 16]),
                                       dict(rows=[0, 3, 8, 14, 16], heads=[0], keys=[16, 0, 1])])
def test_selections_are_slices_of_the_whole_map(selection):
    model = _bigbird().train()  # random blocks that differ per head
    inputs = _batch()
    whole = _captured(model, inputs)
    hooker = _captured(model, inputs, **selection)
    rows = [LENGTH - 1] if selection.get("rows") == "last" else selection.get("rows")
    assert set(hooker.values) == set(whole.values) == {name for name, _ in _layers(model)}
    for name, (full,) in whole.values.items():
        want = full
        for dim, index in ((1, selection.get("heads")), (2, rows), (3, selection.get("keys"))):
            if index is not None:
                want = want.index_select(dim, torch.tensor(index))
        assert torch.equal(hooker.values[name][0], want), name


def test_a_row_is_placed_without_the_whole_map(monkeypatch):
    """rows="last" places one row: the library's placement is called with one row and makes a
    (batch, heads, 1, T) map."""
    from attention_hooker.capture import block_sparse

    made = []
    real = block_sparse.place_block_sparse_rows
    monkeypatch.setattr(block_sparse, "place_block_sparse_rows", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model, inputs = _bigbird(), _batch()
    _captured(model, inputs, rows="last")
    assert [tuple(m.shape) for m in made] == [(2, 2, 1, LENGTH)] * 2


def test_keep_values_keeps_the_values_the_map_multiplies():
    model, inputs = _bigbird(), _batch()
    hooker = _captured(model, inputs, keep_values=True)
    calls = _layer_calls(model, inputs)
    for name, module in _layers(model):
        x, query_real, key_real, random, out = calls[name]
        v = _hand(module, x, query_real, key_real, random)[1]
        torch.testing.assert_close(hooker.value_vectors[name][0], v[:, :, :LENGTH])


def test_streamed_and_reduced_captures_equal_the_capture_in_memory(tmp_path, monkeypatch):
    model, inputs = _bigbird(), _batch()
    memory = _captured(model, inputs)
    from attention_hooker.capture import session
    monkeypatch.setattr(session, "ROWS_PER_TILE", 5)  # several tiles per call, cutting through blocks
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with hooker.stream_to(tmp_path / "capture", shard_bytes=1):
            model(**inputs)
    loaded = load(tmp_path / "capture")
    for name, (want,) in memory.values.items():
        assert torch.equal(loaded.values[name][0], want)
    reduced = HeadStatsAccumulator()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(reduced, padding_mask=inputs["attention_mask"])
        model(**inputs)
    direct = HeadStatsAccumulator()
    direct.update(memory.values, padding_mask=inputs["attention_mask"])
    got, want = reduced.result(), direct.result()
    for key in want:
        if isinstance(want[key], torch.Tensor):
            torch.testing.assert_close(got[key], want[key])


def test_an_input_that_needs_no_padding_keeps_every_position():
    model, inputs = _bigbird(), _batch(length=18)
    hooker = _captured(model, inputs)
    _check_layers(model, inputs, hooker, tokens=18)


def test_an_attention_computation_that_is_none_of_the_pieces_refuses_the_call():
    model, inputs = _bigbird(), _batch()
    (name, module), _ = _layers(model)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        extra = module.register_forward_pre_hook(lambda m, args: [torch.softmax(torch.randn(4, 3, 5), -1)] and None)
        try:
            with pytest.warns(AttentionCaptureWarning, match="unknown piece"):
                model(**inputs)
        finally:
            extra.remove()
    assert hooker.report().missing == [name]
    assert "(4, 3, 5)" in hooker.report()[name].reason


def test_random_blocks_that_cannot_be_read_refuse_the_call_with_the_reason(monkeypatch):
    from attention_hooker.capture import block_sparse

    model, inputs = _bigbird(), _batch()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, \
            pytest.warns(AttentionCaptureWarning, match="every attention call was refused"):
        monkeypatch.setattr(block_sparse, "_METHOD", "a_method_the_layer_does_not_have")  # after hooking
        model(**inputs)
    report = hooker.report()
    assert sorted(report.missing) == sorted(name for name, _ in _layers(model))
    assert "rand_attn" in report[report.missing[0]].reason
    assert hooker.values == {}


def test_a_layer_called_outside_its_model_keeps_the_padding_it_was_given():
    """Called by itself, the layer's padding_len cannot be read: the 18 positions it was given are kept,
    the padded ones as zero rows and columns (the hand computation over all 18)."""
    model, inputs = _bigbird(), _batch()
    calls = _layer_calls(model, inputs)
    name, module = _layers(model)[0]
    x, query_real, key_real, random, out = calls[name]
    mask = (query_real & key_real).float()
    blocked, band, from_mask, to_mask = model.create_masks_for_block_sparse_attn(mask, module.block_size)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        again = module(x, band, from_mask, to_mask, blocked, blocked)[0]
    torch.testing.assert_close(again, out)
    (got,) = hooker.values[name]
    assert got.shape == (2, 2, 18, 18)
    torch.testing.assert_close(got, _hand(module, x, query_real, key_real, random)[0], atol=1e-6, rtol=1e-5)
    assert (got[:, :, 17] == 0).all() and (got[..., 17] == 0).all()


def test_a_short_input_that_makes_transformers_swap_the_layer_out_is_reported_not_silent():
    """At <= (5 + 2r) x block_size tokens transformers replaces every BigBirdAttention.self by a new full-attention
    module, for good: the hooked block-sparse modules never run again. Each layer says so (a warning naming the
    swap, the limit and what to do; its coverage refused with that reason), on that call and on a later long one,
    never "did not run" with report().missing empty; a new hooker then captures the full attention it runs."""
    model = _bigbird()  # block_size 2, 1 random block: the limit is 14 tokens
    names = [name for name, _ in _layers(model)]
    with pytest.warns(AttentionCaptureWarning, match=r"swapped out.*at most \(5 \+ 2 x 1\) x 2 = 14 tokens.*Hook the "
                                                     r"model again") as caught, \
            torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"attention\.self$") as hooker:
        model(**_batch(length=8))
        model(**_batch(length=LENGTH))
    assert sum("swapped out" in str(w.message) for w in caught) == len(names) == 2  # once per layer
    report = hooker.report()
    assert report.missing == names and dict(hooker.values) == {}
    for name in names:
        assert report[name].status == "refused" and report[name].runs == 2, report[name]
        assert "BigBirdSelfAttention" in report[name].reason
    inputs = _batch(length=8)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"attention\.self$") as again:
        want = model(**inputs, output_attentions=True).attentions
    for name, probs in zip(names, want):
        torch.testing.assert_close(again.values[name][0], probs)


def test_under_bfloat16_autocast_the_model_itself_raises_and_the_capture_stores_nothing():
    """transformers 5's block-sparse layer cannot run under torch.autocast("cpu", bfloat16) with float32 weights
    (its own attention_probs reassembly scatters softmaxes into a tensor of another dtype): with the capture it
    raises the same error and the model is captured as before afterwards. When transformers runs this, the
    stored map's dtype (the module docstring) needs a test against the layer's output under autocast instead."""
    model, inputs = _bigbird(), _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="dtype"):
        model(**inputs)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="dtype"):
            model(**inputs)
        hooker.clear()
        model(**inputs)
    assert [len(calls) for calls in hooker.values.values()] == [1, 1]
    assert all(calls[0].dtype == torch.float32 for calls in hooker.values.values())
