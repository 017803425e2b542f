"""Image-token maps of PaliGemma and Gemma 3 (issue 23), checked against the model's own code path (which
pixel_values patches feed which image token; where they sit in the image through the real image
processor), and the capture of both models against their eager attentions, with the image tokens in."""

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

IMAGE, BOI, EOI = 60, 58, 59
VISION = dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=16, intermediate_size=16,
              num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, vocab_size=64)
LM = r"language_model\.layers\.\d+\.self_attn$"
TOWER = r"vision_tower\.encoder\.layers\.\d+\.self_attn$"


def tiny_paligemma(implementation="sdpa"):
    config = transformers.PaliGemmaConfig(vision_config=dict(VISION), text_config=dict(TEXT, model_type="gemma"),
                                          image_token_index=IMAGE, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def tiny_gemma3(implementation="sdpa", tokens=4):
    config = transformers.Gemma3Config(
        vision_config=dict(VISION), text_config=dict(TEXT, model_type="gemma3_text", sliding_window=8),
        mm_tokens_per_image=tokens, image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Hugging Face initialises the projector to zeros: every image token would be equal
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
    model.set_attn_implementation(implementation)
    return model


def siglip_processor():
    return transformers.SiglipImageProcessor(size={"height": 32, "width": 32})


def two_rows(runs_per_row, per_run, marks=False):
    """input_ids of two rows: row b holds runs_per_row[b] runs of per_run image tokens (BOI/EOI around each
    run when ``marks``), then text; both rows the same length."""
    rows = []
    for runs in runs_per_row:
        ids = [2]
        for _ in range(runs):
            ids += ([BOI] if marks else []) + [IMAGE] * per_run + ([EOI] if marks else []) + [5]
        rows.append(ids)
    width = max(len(r) for r in rows) + 2
    rows = [r + [7 + i % 40 for i in range(width - len(r))] for r in rows]
    return torch.tensor(rows)


def assert_boxes_hold_sources(tokens, pixel_values, processor, atol):
    centres = centres_of_sources(tokens, pixel_values, processor.image_mean, processor.image_std)
    boxes = tokens.boxes()
    has = ~centres[:, 0].isnan()
    assert bool(has.all())
    y, x = centres.T
    top, left, bottom, right = boxes.T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=atol, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=atol, rtol=0)


# ---------------------------------------------------------------- PaliGemma

def paligemma_inputs():
    processor = siglip_processor()
    images = [coordinate_image(40, 40), coordinate_image(64, 48), coordinate_image(30, 56)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = two_rows([1, 2], 16)  # one image in row 0, two in row 1
    # as PaliGemmaProcessor marks them: image and prompt 0 (attended both ways), the last two tokens 1 (suffix);
    # without them Hugging Face's sdpa path runs the whole sequence both ways and its eager path causally
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, -2:] = 1
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                token_type_ids=token_type_ids), processor


def test_paligemma_tokens_are_the_patches_that_feed_them_and_sit_where_they_came_from():
    model = tiny_paligemma()
    inputs, processor = paligemma_inputs()
    tokens = image_token_map(model, inputs)
    assert len(tokens) == 48 and len(tokens.views) == 3
    assert tokens.image.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    assert_boxes_hold_sources(tokens, inputs["pixel_values"], processor, atol=0.02)


def test_paligemma_refuses_a_count_of_image_tokens_that_is_not_whole_images():
    with pytest.raises(AttentionHookerError, match="not a multiple of the 16 .*4 x 4 SigLIP patches"):
        image_token_map(tiny_paligemma().config, dict(input_ids=torch.tensor([[IMAGE] * 20 + [3]])))


def test_paligemma_capture_is_exact_against_eager_for_the_language_model_the_tower_and_generate():
    inputs, _ = paligemma_inputs()
    reference = assert_language_model_exact(tiny_paligemma, inputs, regex=LM, layers=2)
    assert_tower_exact(tiny_paligemma, inputs, regex=TOWER, tower=lambda m: m.model.vision_tower,
                       tower_inputs=dict(pixel_values=inputs["pixel_values"]), layers=2)
    assert_generate_exact(tiny_paligemma, inputs, regex=LM, layers=2)
    model = tiny_paligemma()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, inputs)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, -3))


# ---------------------------------------------------------------- Gemma 3

def gemma3_processor(pan_and_scan=False):
    return transformers.Gemma3ImageProcessor(
        size={"height": 32, "width": 32}, do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=8,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)


def gemma3_inputs(pan_and_scan=False):
    processor = gemma3_processor(pan_and_scan)
    sizes = [(40, 40), (24, 72), (40, 40)] if pan_and_scan else [(40, 40), (64, 48), (30, 56)]
    images = [coordinate_image(h, w) for h, w in sizes]
    out = processor(images=images, return_tensors="pt")
    runs = [1 + int(n) for n in out["num_crops"]]
    ids = two_rows([runs[0], sum(runs[1:])], 4, marks=True)
    inputs = dict(input_ids=ids, pixel_values=out["pixel_values"], attention_mask=torch.ones_like(ids),
                  token_type_ids=(ids == IMAGE).long())
    if pan_and_scan:
        inputs.update(num_crops=out["num_crops"], image_sizes=torch.tensor(sizes))
    return inputs, processor


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["whole", "pan_and_scan"])
def test_gemma3_tokens_are_pooled_patch_blocks_placed_where_they_came_from(pan_and_scan):
    model = tiny_gemma3()
    inputs, processor = gemma3_inputs(pan_and_scan)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("num_crops", "image_sizes")}
    tokens = image_token_map(model, inputs, processor=processor)
    crops = [0, 3, 0] if pan_and_scan else [0, 0, 0]  # the 24 x 72 image is cut into 3 crops
    assert len(tokens.views) == 3 + sum(crops) and len(tokens) == 4 * len(tokens.views)
    assert bool((tokens.height == 2).all() and (tokens.width == 2).all())
    found = sources_by_perturbation(model, model_inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    if pan_and_scan:
        assert [v.name for v in tokens.views] == ["image", "image", "crop 0", "crop 1", "crop 2", "image"]
        assert [v.image for v in tokens.views] == [0, 1, 1, 1, 1, 2]
        assert tokens.views[3].box == (0.0, 1 / 3, 1.0, 2 / 3)
    # crops are resized from a few pixels, so a block's mean coordinate is off its box's centre by a little
    assert_boxes_hold_sources(tokens, inputs["pixel_values"], processor, atol=0.02)


def test_gemma3_refuses_crops_it_cannot_place():
    config = tiny_gemma3().config
    ids = torch.tensor([[IMAGE] * 12])
    with pytest.raises(AttentionHookerError, match="do_pan_and_scan on.*'num_crops'"):
        image_token_map(config, dict(input_ids=ids), processor=gemma3_processor(True))
    with pytest.raises(AttentionHookerError, match="needs 'image_sizes'"):
        image_token_map(config, dict(input_ids=ids, num_crops=torch.tensor([2])))
    with pytest.raises(AttentionHookerError, match=r"num_crops=\[1\] gives 2 runs .* hold 3"):
        image_token_map(config, dict(input_ids=ids, num_crops=[1], image_sizes=[[10, 30]]))
    with pytest.raises(AttentionHookerError, match="not a multiple of the mm_tokens_per_image=4"):
        image_token_map(config, dict(input_ids=torch.tensor([[IMAGE] * 6])))
    with pytest.raises(AttentionHookerError, match="expected a square number"):
        image_token_map(tiny_gemma3(tokens=9).config, dict(input_ids=ids))
    # without pan and scan each run is a whole image of its own
    assert [v.name for v in image_token_map(config, dict(input_ids=ids), processor=gemma3_processor()).views] == \
        ["image"] * 3


def test_gemma3_refuses_several_runs_it_cannot_tell_crops_from_images_in():
    # review finding 6: one image + 2 pan-and-scan crops (3 runs) used to be read as 3 whole images
    config = tiny_gemma3().config
    ids = two_rows([3, 0], 4, marks=True)
    with pytest.raises(AttentionHookerError, match="hold 3 runs of image tokens.*cannot be told from separate"):
        image_token_map(config, dict(input_ids=ids))
    # what settles it: the processor (pan and scan off), or num_crops
    assert [v.name for v in image_token_map(config, dict(input_ids=ids), processor=gemma3_processor()).views] == \
        ["image"] * 3
    read = image_token_map(config, dict(input_ids=ids, num_crops=[2], image_sizes=[(24, 72)]))
    assert [(v.image, v.name) for v in read.views] == [(0, "image"), (0, "crop 0"), (0, "crop 1")]
    # one run is one whole image, even with pan and scan on: a crop always follows its image
    for processor in (None, gemma3_processor(True)):
        assert [v.name for v in image_token_map(config, dict(input_ids=two_rows([1, 0], 4)),
                                                processor=processor).views] == ["image"]


def test_gemma3_checks_num_crops_against_the_processors_pan_and_scan():
    config = tiny_gemma3().config
    ids = torch.tensor([[IMAGE] * 12])
    # review finding 6 (p5): 2 crops of a 10 x 11 image, which the processor never crops
    with pytest.raises(AttentionHookerError, match=r"num_crops=\[2\] do not match .* into \[0\] crops"):
        image_token_map(config, dict(input_ids=ids, num_crops=[2], image_sizes=[(10, 11)]),
                        processor=gemma3_processor(True))
    with pytest.raises(AttentionHookerError, match="has do_pan_and_scan off, so it makes none"):
        image_token_map(config, dict(input_ids=ids, num_crops=[2], image_sizes=[(24, 48)]),
                        processor=gemma3_processor(False))
    read = image_token_map(config, dict(input_ids=ids, num_crops=[2], image_sizes=[(24, 48)]),
                           processor=gemma3_processor(True))
    assert [v.name for v in read.views] == ["image", "crop 0", "crop 1"]


def test_gemma3_pan_and_scan_count_is_the_image_processors():
    from attention_hooker.media.image_families.gemma3 import pan_and_scan_count
    processor = gemma3_processor(True)
    sizes = [(h, w) for h in (8, 9, 15, 16, 24, 33) for w in (8, 10, 17, 20, 30, 40, 41, 50, 64, 90)]
    sizes += [(w, h) for h, w in sizes]
    out = processor(images=[torch.zeros(3, h, w) for h, w in sizes], return_tensors="pt")
    want = [int(n) for n in out["num_crops"]]
    assert [pan_and_scan_count(h, w, 8, 4, 1.2) for h, w in sizes] == want
    assert len(set(want)) >= 3  # none, and several counts, are covered


def test_gemma3_reads_image_sizes_and_num_crops_as_per_row_lists():
    # review finding 7 (p6): ragged per-row image_sizes raised ValueError
    config = tiny_gemma3().config
    ids = two_rows([2, 2], 4)  # row 0: an image and its one crop; row 1: two whole images
    flat = image_token_map(config, dict(input_ids=ids, num_crops=[1, 0, 0],
                                        image_sizes=torch.tensor([(24, 72), (40, 40), (30, 30)])))
    ragged = image_token_map(config, dict(input_ids=ids, num_crops=[[1], [0, 0]],
                                          image_sizes=[[(24, 72)], [(40, 40), (30, 30)]]))
    assert ragged.views == flat.views and torch.equal(ragged.source, flat.source)
    assert [(v.image, v.name) for v in ragged.views] == [(0, "image"), (0, "crop 0"), (1, "image"), (2, "image")]
    with pytest.raises(AttentionHookerError, match="gives 2 image size.*hold 3 image"):
        image_token_map(config, dict(input_ids=ids, num_crops=[1, 0, 0], image_sizes=[[(24, 72)], [(40, 40)]]))


def test_gemma3_capture_is_exact_against_eager_for_the_language_model_the_tower_and_generate():
    inputs, _ = gemma3_inputs(pan_and_scan=True)
    tokens = image_token_map(tiny_gemma3().config, inputs)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("num_crops", "image_sizes")}
    reference = assert_language_model_exact(tiny_gemma3, model_inputs, regex=LM, layers=2)
    assert_tower_exact(tiny_gemma3, model_inputs, regex=TOWER, tower=lambda m: m.model.vision_tower,
                       tower_inputs=dict(pixel_values=inputs["pixel_values"]), layers=2)
    assert_generate_exact(tiny_gemma3, model_inputs, regex=LM, layers=2)
    model = tiny_gemma3()
    got = capture(model, LM, lambda: model(**model_inputs))
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, 3))
