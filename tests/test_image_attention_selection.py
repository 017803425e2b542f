"""image_attention on maps that are not the whole call of the table's axis: captures taken with the hooker's
heads= / rows= / keys= selections (read through the selection, checked against the whole capture), maps of
the wrong axis or too few keys (refused), decoding-step maps (query positions), and per-row results."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.media import image_token_map  # noqa: E402
from attention_hooker.media.image_tokens import ImageView, table  # noqa: E402
from test_image_tokens import llava_inputs, tiny_llava  # noqa: E402

LAYER = r"language_model\.layers\.0\.self_attn$"


def capture(model, inputs, **options):
    with TransformerAttentionHooker(model, layer_regex=LAYER, **options) as hooker:
        with torch.no_grad():
            model(**inputs)
    (calls,) = hooker.values.values()
    return calls[0], hooker


@pytest.fixture(scope="module")
def llava():
    model = tiny_llava()
    inputs, _ = llava_inputs(16)
    whole, _ = capture(model, inputs)  # (2, 2, 20, 20)
    return model, inputs, whole, image_token_map(model, inputs)


def test_the_table_knows_the_key_count_it_was_read_for(llava):
    _, inputs, whole, tokens = llava
    assert tokens.keys == inputs["input_ids"].shape[1] == whole.shape[-1] == 20


@pytest.mark.parametrize("options,call_keys,call_queries,positions", [
    ({"keys": list(range(1, 20))}, 20, None, list(range(20))),
    ({"keys": slice(1, None)}, 20, None, list(range(20))),
    ({"rows": "last"}, None, None, [19]),
    ({"rows": [0, 5, -1]}, None, 20, [0, 5, 19]),
    ({"heads": [1]}, None, None, list(range(20))),
    ({"heads": [1], "rows": [-2, -1], "keys": list(range(1, 20))}, 20, None, [18, 19]),
])
def test_a_selected_capture_read_through_its_selection_is_the_whole_capture_at_the_same_places(
        llava, options, call_keys, call_queries, positions):
    model, inputs, whole, tokens = llava
    part, hooker = capture(model, inputs, **options)
    heads = options.get("heads", [0, 1])
    for b in range(2):
        got = image_attention(part, tokens, batch=b, selection=hooker, call_keys=call_keys, call_queries=call_queries)
        expected = image_attention(whole, tokens, batch=b, queries=positions, heads=heads)
        assert got.queries.tolist() == positions == expected.queries.tolist()
        assert got.heads.tolist() == heads
        torch.testing.assert_close(got.weights, expected.weights, atol=1e-6, rtol=0)
        for k in expected.grids:
            torch.testing.assert_close(got.grids[k], expected.grids[k], atol=1e-6, rtol=0)


def test_selected_captures_that_cannot_be_placed_are_refused(llava):
    model, inputs, _, tokens = llava
    part, hooker = capture(model, inputs, keys=list(range(2, 20)))
    with pytest.raises(AttentionHookerError, match="fewer than the 20 positions of the prompt"):
        image_attention(part, tokens)  # read as a whole map: its keys would be shifted by 2
    with pytest.raises(AttentionHookerError, match="pass call_keys="):
        image_attention(part, tokens, selection=hooker)
    part, hooker = capture(model, inputs, keys=list(range(0, 20, 2)))
    with pytest.raises(AttentionHookerError, match=r"were not kept by the capture's key selection"):
        image_attention(part, tokens, selection=hooker, call_keys=20)
    part, hooker = capture(model, inputs, rows=[0, 3])
    with pytest.raises(AttentionHookerError, match="pass call_queries="):
        image_attention(part, tokens, selection=hooker)
    with pytest.raises(AttentionHookerError, match="call_keys=21, but the map, captured with every key, has 20"):
        image_attention(part, tokens, call_keys=21)
    with pytest.raises(AttentionHookerError, match=r"kept heads \[1\], but the map has 2 heads"):
        image_attention(part, tokens, selection={"selection": {"heads": [1], "rows": None, "keys": None}})
    with pytest.raises(AttentionHookerError, match="keeps 2 of 20 keys, but the map has 20"):
        image_attention(part, tokens, selection={"selection": {"heads": None, "rows": None, "keys": [0, 1]}},
                        call_keys=20)


def demo_tokens(axis, keys):
    return table("demo", axis, [(0, 1 + 2 * r + c, 0, 0, r, c, 1, 1) for r in range(2) for c in range(2)],
                 [[2 * r + c] for r in range(2) for c in range(2)], 8, [ImageView(0, 0, "image", 2, 2)], keys=keys)


def test_a_map_of_the_other_axis_is_refused():
    cross = demo_tokens("cross", 6)
    self_attention = torch.full((1, 2, 7, 7), 1 / 7)  # text positions as keys, more of them than cross keys
    with pytest.raises(AttentionHookerError, match="'cross' axis of 6 cross-attention keys"):
        image_attention(self_attention, cross)
    image_attention(torch.full((1, 2, 7, 6), 1 / 6), cross)  # a cross-attention map: 7 text queries, 6 keys
    with pytest.raises(AttentionHookerError, match="fewer than the 6 positions"):
        image_attention(torch.full((1, 2, 5, 5), 1 / 5), demo_tokens("sequence", 6))


def test_a_decoding_step_map_reports_the_new_token_s_position_and_negative_indices_count_from_the_end():
    tokens = demo_tokens("sequence", 6)
    step = torch.softmax(torch.randn(1, 3, 1, 8), -1)  # the second generated token's row: 8 keys
    got = image_attention(step, tokens, heads=[-1], batch=-1)
    assert got.queries.tolist() == [7] and got.heads.tolist() == [2]
    torch.testing.assert_close(got.weights, step[0, 2:, :, 1:5].double())


def test_a_row_s_table_and_result_name_only_the_row_s_images():
    tokens = table("demo", "sequence", [(0, 1, 0, 0, 0, 0, 1, 1), (0, 2, 1, 1, 0, 0, 1, 1), (1, 1, 2, 2, 0, 0, 1, 1)],
                   [[0], [1], [2]], 8, [ImageView(k, 0, "image", 1, 1) for k in range(3)], keys=4)
    assert repr(tokens.in_row(1)) == "ImageTokens(demo: 1 image tokens of 1 image(s), 1 view(s), axis='sequence')"
    attention = torch.softmax(torch.randn(2, 1, 4, 4), -1)
    row1 = image_attention(attention, tokens, batch=1)
    assert row1.images == [2] and row1.share_by_image().shape == (1, 4, 1)
    torch.testing.assert_close(row1.share_by_image()[..., 0], attention[1, :, :, 1].double())
    row0 = image_attention(attention, tokens, batch=0)
    assert row0.images == [0, 1] and row0.share_by_image().shape == (1, 4, 2)
