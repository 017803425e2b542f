"""Mllama's image keys (issue 23, parts 1-4): the cross-attention layers' keys mapped to tiles and patches,
checked against the model's own code path (which pixel_values patches feed which key of
cross_attention_states) and against MllamaImageProcessor (where those patches are in the image); the
capture of the cross-attention, self-attention and vision layers checked against eager attentions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.media import image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                positions_fed_by_parameter, sources_by_perturbation)

IMAGE = 60
TILE, PATCH = 16, 8
TEXT_LAYERS = r"language_model\.layers\.\d+\.(self|cross)_attn$"
# (height, width): 64 x 48 -> 2 x 2 tiles, resized to 32 x 24 (one column of patches is padding);
# 20 x 40 -> 1 x 2 tiles, 16 x 32 (no padding); 16 x 40 -> 1 x 3 tiles, 16 x 40 (one column of padding)
SIZES = [[(64, 48), (20, 40)], [(16, 40)]]


def tiny_mllama(attn="sdpa"):
    config = transformers.MllamaConfig(
        vision_config=dict(image_size=TILE, patch_size=PATCH, hidden_size=16, intermediate_size=16,
                           num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                           intermediate_layers_indices=[0], vision_output_dim=32, max_num_tiles=4),
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, cross_attention_layers=[1], pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        image_token_index=IMAGE)
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def mllama_inputs(sizes=SIZES):
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    processor = transformers.MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=4)
    images = [[coordinate_image(h, w) for h, w in row] for row in sizes]
    out = processor(images=images, return_tensors="pt")
    ids = torch.tensor([[1, IMAGE, 5, IMAGE, 6, 7, 8], [1, 9, IMAGE, 5, 6, 7, 8]])
    spans = [get_cross_attention_token_mask(row.tolist(), IMAGE) for row in ids]
    cross = convert_sparse_cross_attention_mask_to_dense(spans, out["num_tiles"], 4, ids.shape[1])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=out["pixel_values"],
                  aspect_ratio_ids=out["aspect_ratio_ids"], aspect_ratio_mask=out["aspect_ratio_mask"],
                  cross_attention_mask=torch.as_tensor(cross))
    return inputs, processor


def padding_units(inputs):
    """pixel_values units of tile slots holding no tile (padding tiles, and every tile of a padding image)."""
    real = inputs["aspect_ratio_mask"].bool() & (inputs["aspect_ratio_ids"] != 0)[..., None]  # (B, M, T)
    per_crop = (TILE // PATCH) ** 2
    return {crop * per_crop + u for crop in (~real).flatten().nonzero().flatten().tolist() for u in range(per_crop)}


def test_mllama_keys_are_the_patches_that_feed_them():
    model = tiny_mllama()
    inputs, processor = mllama_inputs()
    tokens = image_token_map(model, dict(inputs, image_sizes=SIZES), processor=processor)
    assert tokens.axis == "cross"
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_model,
                                    language_model=model.model.language_model, patch=PATCH,
                                    embeds="cross_attention_states")
    pad = padding_units(inputs)
    # keys computed from padding tiles only are the processor's padding, left out of the table on purpose
    assert claimed_sources(tokens) == {k: v for k, v in found.items() if not v <= pad}
    assert any(v <= pad for v in found.values())
    # 4 + 2 + 3 real tiles, each 4 patches + 1 class token, on a key axis of 2 images x 4 tiles x 5 keys
    assert len(tokens) == 9 * 5 and int(tokens.position.max()) < 2 * 4 * 5
    # the class tokens are the keys the tower's class embedding feeds (besides those of padding slots)
    cls = tokens.source[:, 0] < 0
    fed = positions_fed_by_parameter(model, inputs, model.model.vision_model.class_embedding,
                                     tower=model.model.vision_model, language_model=model.model.language_model,
                                     embeds="cross_attention_states")
    claimed = set(zip(tokens.batch[cls].tolist(), tokens.position[cls].tolist()))
    real = inputs["aspect_ratio_mask"].bool() & (inputs["aspect_ratio_ids"] != 0)[..., None]  # (B, M, T)
    assert claimed <= fed and all(not real.flatten(1)[b, p // 5] for b, p in fed - claimed)
    assert int(cls.sum()) == 9 and len(fed) == 2 * 2 * 4
    assert [tokens.views[k].name for k in sorted(set(tokens.view[cls].tolist()))][:2] == [
        "class token of tile 0", "class token of tile 1"]


def test_mllama_boxes_hold_their_patches_through_the_image_processor():
    model = tiny_mllama()
    inputs, processor = mllama_inputs()
    tokens = image_token_map(model, dict(inputs, image_sizes=SIZES), processor=processor)
    grids = [v for v in tokens.views if v.index == 0]
    assert [(v.name, v.rows, v.cols) for v in grids] == [("tiles", 4, 4), ("tiles", 2, 4), ("tiles", 2, 6)]
    assert [v.box for v in grids] == [(0, 0, 1, 32 / 24), (0, 0, 1, 1), (0, 0, 1, 48 / 40)]
    patches = tokens.select(tokens.source[:, 0] >= 0)
    centres = centres_of_sources(patches, inputs["pixel_values"], processor.image_mean, processor.image_std)
    top, left, bottom, right = patches.boxes().T
    inside = right <= 1 + 1e-9
    y, x = centres[inside].T
    assert int(inside.sum()) == 36 - 4 - 2  # the last column of patches is padding on images 0 (4 rows) and 2 (2)
    assert bool(((top[inside] <= y) & (y <= bottom[inside]) & (left[inside] <= x) & (x <= right[inside])).all())
    torch.testing.assert_close(y, ((top + bottom) / 2)[inside], atol=0.03, rtol=0)
    torch.testing.assert_close(x, ((left + right) / 2)[inside], atol=0.03, rtol=0)
    # boxes past the image's right edge are the processor's zero padding: black after normalisation
    assert bool((centres[~inside] == 0).all())
    # a class token's view is its tile's box
    cls = tokens.select(tokens.source[:, 0] < 0)
    assert tokens.views[int(cls.view[1])].box == (0, 0.5 * 32 / 24, 0.5, 32 / 24)
    # without the original sizes the grid covers the padded canvas, and says so
    canvas = image_token_map(model, inputs)
    assert {v.name for v in canvas.views if v.index == 0} == {"tiles (padded canvas)"}
    assert {v.box for v in canvas.views if v.index == 0} == {(0, 0, 1, 1)}
    assert torch.equal(canvas.position, tokens.position) and torch.equal(canvas.source, tokens.source)


def test_mllama_inputs_that_disagree_are_refused_by_name():
    model = tiny_mllama()
    inputs, processor = mllama_inputs()
    with pytest.raises(AttentionHookerError, match="'aspect_ratio_ids'"):
        image_token_map(model, dict(input_ids=inputs["input_ids"]))
    bad = inputs["aspect_ratio_mask"].clone()
    bad[0, 1, 3] = 1
    with pytest.raises(AttentionHookerError, match=r"1 x 2 tiles .* marks \[1, 1, 0, 1\]"):
        image_token_map(model, dict(inputs, aspect_ratio_mask=bad))
    with pytest.raises(AttentionHookerError, match=r"gives 2 image size\(s\), but the inputs hold 3 image\(s\)"):
        image_token_map(model, dict(inputs, image_sizes=[(64, 48), (20, 40)]))
    with pytest.raises(AttentionHookerError, match="32-pixel tiles"):
        image_token_map(model, inputs, processor=transformers.MllamaImageProcessor(size={"height": 32, "width": 32}))


def _reference(inputs):
    eager = tiny_mllama("eager")
    with torch.no_grad():
        return eager(**inputs, output_attentions=True).attentions  # one per text layer: 0 self, 1 cross


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_captured_cross_and_self_attention_equal_eager_and_read_as_image_attention(attn):
    model = tiny_mllama(attn)
    inputs, _ = mllama_inputs()
    reference = _reference(inputs)
    assert reference[1].shape == (2, 2, 7, 40)  # cross: 2 image slots x 4 tiles x 5 keys
    with TransformerAttentionHooker(model, layer_regex=TEXT_LAYERS) as hooker:
        with torch.no_grad():
            model(**inputs)
    values = hooker.values
    torch.testing.assert_close(values["model.language_model.layers.0.self_attn"][0], reference[0], atol=1e-6, rtol=0)
    (cross,) = values["model.language_model.layers.1.cross_attn"]
    torch.testing.assert_close(cross, reference[1], atol=1e-6, rtol=0)

    tokens = image_token_map(model, dict(inputs, image_sizes=SIZES))
    for b, first_query in ((0, 1), (1, 2)):
        got = image_attention(cross, tokens, batch=b, queries=[-1])
        row = tokens.in_row(b)
        expected = reference[1][b, :, -1:, row.position].double()  # (H, 1, n)
        torch.testing.assert_close(got.weights, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.share, expected.sum(-1), atol=1e-6, rtol=0)
        # the weight left outside the table went to padding keys only, which the mask closes: all of a
        # query's attention that reached an image is in the table, class tokens included
        torch.testing.assert_close(got.share, torch.ones_like(got.share), atol=1e-6, rtol=0)
        assert bool((got.weights[..., row.source[:, 0] >= 0].sum(-1) < 1 - 1e-3).all())  # class tokens took some
        # the patch grid of each image: tile t of a th x tw arrangement at rows tr*2.., cols tc*2..
        for k, grid in got.grids.items():
            view = tokens.views[k]
            if view.index:
                continue
            wide = view.cols // 2
            slot = [m for m in range(2) if int(inputs["aspect_ratio_ids"][b, m])][
                view.image - (0 if b == 0 else 2)]
            want = torch.zeros_like(grid)
            for t in range(view.rows // 2 * wide):
                keys = reference[1][b, :, -1:, (slot * 4 + t) * 5 + 1:(slot * 4 + t) * 5 + 5].double()
                tr, tc = divmod(t, wide)
                want[..., tr * 2:tr * 2 + 2, tc * 2:tc * 2 + 2] = keys.reshape(2, 1, 2, 2)
            torch.testing.assert_close(grid, want, atol=1e-6, rtol=0)


def test_captured_vision_tower_equals_its_own_eager_attention_function(monkeypatch):
    from transformers.models.mllama import modeling_mllama

    model = tiny_mllama("sdpa")
    inputs, _ = mllama_inputs()
    seen = []
    original = modeling_mllama.eager_attention_forward

    def recording(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        if isinstance(module, modeling_mllama.MllamaVisionAttention):
            seen.append(out[1].detach().clone())
        return out

    monkeypatch.setattr(modeling_mllama, "eager_attention_forward", recording)
    eager = tiny_mllama("eager")
    with torch.no_grad():
        eager(**inputs)
    assert len(seen) == 2  # the local and the global encoder's one layer each
    with TransformerAttentionHooker(model, layer_regex=r"vision_model\..*self_attn$") as hooker:
        with torch.no_grad():
            model(**inputs)
    captured = [calls for calls in hooker.values.values()]
    assert [len(c) for c in captured] == [1, 1]
    for (got,), want in zip(captured, seen):
        assert got.shape == want.shape  # (B * images, heads, tiles * 8, tiles * 8): patches padded to 8 per tile
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_generate_step_calls_equal_eager_per_step_attentions():
    model = tiny_mllama("sdpa")
    eager = tiny_mllama("eager")
    inputs, _ = mllama_inputs()
    kwargs = dict(inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(model, layer_regex=TEXT_LAYERS) as hooker:
            generated = model.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    layers = list(hooker.values.values())
    assert [len(calls) for calls in layers] == [3, 3]
    tokens = image_token_map(model, inputs)
    for step, expected in enumerate(reference.attentions):
        for calls, want in zip(layers, expected):
            assert calls[step].shape == want.shape, (step, tuple(calls[step].shape), tuple(want.shape))
            torch.testing.assert_close(calls[step], want, atol=1e-6, rtol=0)
        # a generated token's attention over the image keys (the cross layer's keys come from its cache)
        got = image_attention(layers[1][step], tokens, batch=0, queries=[-1])
        torch.testing.assert_close(got.weights, expected[1][0, :, -1:, tokens.in_row(0).position].double(),
                                   atol=1e-6, rtol=0)
