"""Image-token maps of LLaVA-NeXT (issue 23): base view + any-resolution tiles put back and unpadded, with a
row-end token after each tile row, checked against the model's own code path (which pixel_values patches feed
which image token; the row ends are the model's image_newline embedding), the real image processor (each
token's patches sit inside its box), and the capture against eager attentions with the image tokens in."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media import image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)
from vlm_exactness import (assert_generate_exact, assert_image_attention_is_the_eager_slice,  # noqa: E402
                           assert_language_model_exact, assert_tower_exact, capture)

IMAGE = 60
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
SIZES = [(40, 40), (20, 72), (50, 30)]  # 2 x 2 tiles; 1 x 2 tiles and 2 x 1 tiles, both unpadded
LM = r"language_model\.layers\.\d+\.self_attn$"
TOWER = r"vision_tower\.encoder\.layers\.\d+\.self_attn$"


def tiny_llava_next(implementation="sdpa"):
    config = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def llava_next_inputs(model):
    processor = transformers.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                     image_grid_pinpoints=PINPOINTS)
    out = processor(images=[coordinate_image(h, w) for h, w in SIZES], return_tensors="pt")
    with torch.no_grad():  # how many tokens each image takes, from the model's own packing
        lengths = [len(f) for f in model.model.get_image_features(
            out["pixel_values"], out["image_sizes"], vision_feature_select_strategy="default").pooler_output]
    rows = [[1, 5] + [IMAGE] * lengths[0], [1] + [IMAGE] * lengths[1] + [6] + [IMAGE] * lengths[2]]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([r + [7 + i % 40 for i in range(width - len(r))] for r in rows])
    return dict(input_ids=ids, pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                attention_mask=torch.ones_like(ids)), processor, lengths


def test_llava_next_tokens_are_the_patches_that_feed_them_and_row_ends_are_the_newline_embedding():
    model = tiny_llava_next()
    inputs, processor, lengths = llava_next_inputs(model)
    tokens = image_token_map(model, inputs, processor=processor)
    assert len(tokens) == sum(lengths)
    # view 0 is the image itself (its tiles put back), the coarser base look is view 1 (image_tokens' module doc),
    # though the base's tokens come first in the sequence
    assert [(v.image, v.index, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, 0, "tiles", 8, 8), (0, 1, "base", 4, 4), (1, 0, "tiles", 2, 8), (1, 1, "base", 4, 4),
        (2, 0, "tiles", 6, 4), (2, 1, "base", 4, 4)]
    first = [int(tokens.view[tokens.image == i][0]) for i in range(3)]
    assert [tokens.views[v].name for v in first] == ["base"] * 3
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    # the row ends (no source, no cell) are exactly where the model wrote its image_newline
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    newline = (seen["embeds"] == model.model.image_newline).all(-1)  # (batch, sequence)
    ends = tokens.height == 0
    assert sorted(map(list, zip(tokens.batch[ends].tolist(), tokens.position[ends].tolist()))) == \
        newline.nonzero().tolist()
    assert int(ends.sum()) == 8 + 2 + 6 and bool((tokens.source[ends] == -1).all())
    # each patch lies inside its box, tiles put back where they came from (unpadded boxes reach a patch's
    # few padding pixels past the image's edge)
    kept = tokens.select(~ends)
    centres = centres_of_sources(kept, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = kept.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    inside = (top >= 0) & (bottom <= 1) & (left >= 0) & (right <= 1)  # patches with no padding in them
    assert int(inside.sum()) > 100
    torch.testing.assert_close(y[inside], ((top + bottom) / 2)[inside], atol=0.03, rtol=0)
    torch.testing.assert_close(x[inside], ((left + right) / 2)[inside], atol=0.03, rtol=0)


def test_llava_next_reads_image_sizes_as_a_tensor_a_list_of_pairs_or_per_row_lists():
    model = tiny_llava_next()
    inputs, _, _ = llava_next_inputs(model)
    want = image_token_map(model, inputs)
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    for given in (sizes, [sizes[:1], sizes[1:]]):
        got = image_token_map(model, dict(inputs, image_sizes=given))
        assert got.views == want.views and torch.equal(got.source, want.source)
        assert torch.equal(got.position, want.position) and torch.equal(got.view, want.view)
    with pytest.raises(AttentionHookerError, match="'image_sizes' must be .height, width. pairs"):
        image_token_map(model, dict(inputs, image_sizes=[[40, 40, 3]]))


def test_llava_next_says_how_to_read_a_decoding_steps_inputs():
    model = tiny_llava_next()
    inputs, _, _ = llava_next_inputs(model)
    step = dict(inputs, input_ids=torch.tensor([[7], [8]]))  # one new token a row, image fields still there
    with pytest.raises(AttentionHookerError, match="no image token of llava_next.*build the table from the prompt"):
        image_token_map(model, step)
    with pytest.raises(AttentionHookerError, match="no image token of llava_next.*decode-step maps"):
        image_token_map(model, {"input_ids": step["input_ids"]})


def test_llava_next_refuses_what_it_cannot_place():
    model = tiny_llava_next()
    inputs, processor, lengths = llava_next_inputs(model)
    with pytest.raises(AttentionHookerError, match="needs 'image_sizes'"):
        image_token_map(model, {k: v for k, v in inputs.items() if k != "image_sizes"})
    short = dict(inputs, input_ids=inputs["input_ids"][:, :-40])
    with pytest.raises(AttentionHookerError, match="needs .* image tokens, but input_ids hold only"):
        image_token_map(model, short)
    with pytest.raises(AttentionHookerError, match="take 122 image tokens, but input_ids hold"):
        image_token_map(model, dict(inputs, image_sizes=inputs["image_sizes"][:2]))
    with pytest.raises(AttentionHookerError, match="crops to .*only a processor whose size and crop are both 32"):
        image_token_map(model, inputs, processor=transformers.LlavaNextImageProcessor(
            size={"shortest_edge": 48}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS))
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(AttentionHookerError, match="'default' only"):
        image_token_map(model, inputs)


def test_llava_next_capture_is_exact_against_eager_for_the_language_model_the_tower_and_generate():
    inputs, _, _ = llava_next_inputs(tiny_llava_next())
    reference = assert_language_model_exact(tiny_llava_next, inputs, regex=LM, layers=2)
    crops = [1 + 4, 1 + 2, 1 + 2]  # the crops each image really has (pixel_values are zero-padded to 5)
    real = torch.cat([inputs["pixel_values"][i, :n] for i, n in enumerate(crops)])
    assert_tower_exact(tiny_llava_next, inputs, regex=TOWER, tower=lambda m: m.model.vision_tower,
                       tower_inputs=dict(pixel_values=real), layers=2)
    assert_generate_exact(tiny_llava_next, inputs, regex=LM, layers=2)
    model = tiny_llava_next()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, inputs)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, -2))
