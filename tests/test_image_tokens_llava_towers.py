"""LLaVA with other vision towers than CLIP (SigLIP: no class token; Pixtral: images at their own sizes, lines
of tokens separated by [IMG_BREAK]), and LLaVA boxes as fractions of the original, non-square image. Checked
against the model's own code path (tests/image_token_oracle.py) and the real image processors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.media import image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)

IMG, BREAK, END = 60, 61, 62


def tiny_llava(vision: dict, strategy: str):
    config = transformers.LlavaConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, **vision),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        image_token_id=IMG, vision_feature_select_strategy=strategy, vision_feature_layer=-1)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def oracle(model, inputs):
    return sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                   language_model=model.model.language_model, patch=8)


@pytest.mark.parametrize("strategy,per_image", [("full", 16), ("default", 15)])
def test_siglip_llava_tokens_are_the_patches_that_feed_them(strategy, per_image):
    model = tiny_llava(dict(model_type="siglip_vision_model"), strategy)
    ids = torch.tensor([[1] + [IMG] * per_image + [7, 8], [IMG] * per_image + [9, 3, 4]])
    inputs = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32))
    tokens = image_token_map(model, inputs)
    assert claimed_sources(tokens) == oracle(model, inputs)
    assert [v.name for v in tokens.views] == ["image", "image"]  # no class token view
    first = tokens.in_row(0)
    # 'default' drops the tower's first position, which on SigLIP is patch 0: the row starts at cell (0, 1)
    assert (int(first.row[0]), int(first.col[0])) == ((0, 1) if strategy == "default" else (0, 0))
    why = "4 x 4 patches\\)" if strategy == "full" else "4 x 4 patches, less the first patch \\('default' strategy\\)"
    with pytest.raises(AttentionHookerError, match=f"siglip_vision_model tower.*multiple of the {per_image} .*{why}"):
        image_token_map(model, dict(input_ids=torch.tensor([[IMG] * (per_image + 1)])))


def pixtral_inputs(fill: int = 0):
    """Row 0: two images; row 1: one, left-filled with ``fill`` (0: padding, masked; else a text token)."""
    processor = transformers.PixtralImageProcessor(size={"longest_edge": 32}, patch_size={"height": 8, "width": 8})
    images = [coordinate_image(40, 40), coordinate_image(16, 24), coordinate_image(30, 60)]
    out = processor(images=images, return_tensors="pt")
    sizes = out["image_sizes"].tolist()

    def run(size):
        rows, cols = size[0] // 8, size[1] // 8
        line = []
        for _ in range(rows):
            line += [IMG] * cols + [BREAK]
        return line[:-1] + [END]

    row0 = [1] + run(sizes[0]) + [5] + run(sizes[1]) + [7]
    row1 = [1, 4] + run(sizes[2]) + [9]
    width = max(len(row0), len(row1))
    ids = torch.tensor([row0 + [fill] * (width - len(row0)), [fill] * (width - len(row1)) + row1])
    mask = (ids != 0).long()
    return dict(input_ids=ids, attention_mask=mask, pixel_values=out["pixel_values"], image_sizes=out["image_sizes"]), \
        processor, sizes


def test_pixtral_llava_maps_each_image_at_its_own_size_and_skips_break_tokens():
    model = tiny_llava(dict(model_type="pixtral", head_dim=8), "full")
    inputs, processor, sizes = pixtral_inputs()
    assert len({tuple(s) for s in sizes}) == 3  # three different sizes, two images in row 0
    tokens = image_token_map(model, inputs)
    assert claimed_sources(tokens) == oracle(model, inputs)
    assert [(v.image, v.rows, v.cols) for v in tokens.views] == [(k, h // 8, w // 8) for k, (h, w) in enumerate(sizes)]
    assert not bool((inputs["input_ids"][tokens.batch, tokens.position] != IMG).any())
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    assert torch.allclose(y, (top + bottom) / 2, atol=0.04) and torch.allclose(x, (left + right) / 2, atol=0.04)


def test_pixtral_llava_refuses_a_text_that_does_not_lay_out_the_sizes():
    model = tiny_llava(dict(model_type="pixtral", head_dim=8), "full")
    inputs, _, sizes = pixtral_inputs()
    ids = inputs["input_ids"].clone()
    ids[ids == BREAK] = IMG  # the right count is lost
    with pytest.raises(AttentionHookerError, match="image tokens, but image_sizes"):
        image_token_map(model, dict(inputs, input_ids=ids))
    # the same count of image tokens, but no break between lines
    flat = [1] + [IMG] * sum(h // 8 * w // 8 for h, w in sizes) + [5]
    with pytest.raises(AttentionHookerError, match="not separated by exactly one"):
        image_token_map(model, dict(inputs, input_ids=torch.tensor([flat])))
    with pytest.raises(AttentionHookerError, match="Pixtral tower and vision_feature_select_strategy='default'"):
        image_token_map(tiny_llava(dict(model_type="pixtral", head_dim=8), "default"), inputs)


def test_llava_with_an_unknown_tower_is_refused_by_name():
    config = SimpleNamespace(model_type="llava", vision_config=SimpleNamespace(model_type="dinov2", image_size=32,
                                                                               patch_size=8),
                             vision_feature_select_strategy="default", image_token_id=IMG)
    with pytest.raises(AttentionHookerError, match="'dinov2' vision tower.*known towers: clip_vision_model"):
        image_token_map(config, dict(input_ids=torch.tensor([[IMG] * 16])))


@pytest.mark.parametrize("pad", [False, True])
def test_llava_boxes_are_fractions_of_the_original_non_square_image(pad):
    model = tiny_llava(dict(model_type="clip_vision_model"), "default")
    if pad:
        processor = transformers.LlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                     do_pad=True)
    else:
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    sizes = [(40, 80), (96, 48)]
    pixels = processor(images=[coordinate_image(h, w) for h, w in sizes], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[1] + [IMG] * 16 + [7], [IMG] * 16 + [9, 3]])
    inputs = dict(input_ids=ids, pixel_values=pixels)
    tokens = image_token_map(model, dict(inputs, image_sizes=torch.tensor(sizes)), processor=processor)
    boxes = tokens.boxes()
    if pad:  # the padded square shows all of each image, and the padding outside it
        assert [v.box for v in tokens.views] == [(-0.5, 0.0, 1.5, 1.0), (0.0, -0.5, 1.0, 1.5)]
    else:  # the centre crop of each image
        assert [v.box for v in tokens.views] == [(0.0, 0.25, 1.0, 0.75), (0.25, 0.0, 0.75, 1.0)]
    inside = ((boxes[:, :2] >= 0) & (boxes[:, 2:] <= 1)).all(-1)  # patches of the image, not of the padding
    assert int(inside.sum()) == (16 if pad else 32)
    centres = centres_of_sources(tokens, pixels, processor.image_mean, processor.image_std)[inside]
    y, x = centres.T
    top, left, bottom, right = boxes[inside].T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    assert torch.allclose(y, (top + bottom) / 2, atol=0.02) and torch.allclose(x, (left + right) / 2, atol=0.02)
    # without the original sizes the box is the square the processor handed over; sizes need the processor
    assert {v.box for v in image_token_map(model, inputs).views} == {(0.0, 0.0, 1.0, 1.0)}
    with pytest.raises(AttentionHookerError, match="no processor"):
        image_token_map(model, dict(inputs, image_sizes=sizes))


def test_pixtral_llava_captures_equal_eager_and_read_as_image_attention():
    from vlm_exactness import (assert_generate_exact, assert_image_attention_is_the_eager_slice,
                               assert_language_model_exact, assert_tower_exact)

    def make(attn):
        model = tiny_llava(dict(model_type="pixtral", head_dim=8), "full")
        model.set_attn_implementation(attn)
        return model

    inputs, _, _ = pixtral_inputs(fill=3)  # no padding: Hugging Face's sdpa and eager differ on padded rows
    tokens = image_token_map(make("eager"), inputs)
    reference = assert_language_model_exact(make, inputs, regex=r"language_model\.layers\.\d+\.self_attn$", layers=1)
    model = make("sdpa")
    with TransformerAttentionHooker(model, layer_regex=r"language_model\.layers\.0\.self_attn$") as hooker:
        with torch.no_grad():
            model(**inputs)
    (calls,) = hooker.values.values()
    assert_image_attention_is_the_eager_slice(calls[0], reference[0], tokens, queries=(-1, 3))
    assert_tower_exact(make, inputs, regex=r"vision_tower\.transformer\.layers\.\d+\.attention$",
                       tower=lambda m: m.model.vision_tower,
                       tower_inputs=dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]),
                       layers=1)
    assert_generate_exact(make, inputs, regex=r"language_model\.layers\.\d+\.self_attn$", layers=1)
