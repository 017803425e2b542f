"""Image-token maps of InternVL (issue 23): pixel-shuffled 2 x 2 blocks of patches on dynamic tiles plus a
thumbnail, checked against the model's own code path (which pixel_values patches feed which image token), the
real image processor (GotOcr2ImageProcessor: each token's patches sit inside its box), and the capture against
eager attentions with the image tokens in."""

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

IMAGE, START, END = 60, 58, 59
SIZES = [(40, 40), (24, 72), (50, 30)]  # 1 crop; 3 x 1 tiles + thumbnail; 1 x 2 tiles + thumbnail
LM = r"language_model\.layers\.\d+\.self_attn$"


def tiny_internvl(implementation="sdpa"):
    config = transformers.InternVLConfig(
        vision_config=dict(image_size=[32, 32], patch_size=[8, 8], hidden_size=16, intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="qwen2", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
        image_token_id=IMAGE)
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def internvl_processor():
    return transformers.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                              max_patches=4)


def internvl_inputs():
    processor = internvl_processor()
    out = processor(images=[coordinate_image(h, w) for h, w in SIZES], return_tensors="pt")
    crops = [int(n) for n in out["num_patches"]]
    assert crops == [1, 4, 3]
    run = lambda n: [START] + [IMAGE] * 4 * n + [END]  # noqa: E731
    rows = [[1, 5] + run(crops[0]), [1] + run(crops[1]) + [6] + run(crops[2])]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([r + [7 + i % 40 for i in range(width - len(r))] for r in rows])
    inputs = dict(input_ids=ids, pixel_values=out["pixel_values"], attention_mask=torch.ones_like(ids))
    return inputs, dict(inputs, image_sizes=torch.tensor(SIZES)), processor


def test_internvl_tokens_are_pixel_shuffled_blocks_of_tiles_put_back():
    model = tiny_internvl()
    inputs, with_sizes, processor = internvl_inputs()
    tokens = image_token_map(model, with_sizes, processor=processor)
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "image", 4, 4), (1, "tiles", 4, 12), (1, "thumbnail", 4, 4), (2, "tiles", 8, 4), (2, "thumbnail", 4, 4)]
    assert len(tokens) == 4 * 8 and bool((tokens.height == 2).all())
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.02, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.02, rtol=0)


def test_internvl_refuses_tiles_it_cannot_place():
    config = tiny_internvl().config
    inputs, with_sizes, processor = internvl_inputs()
    with pytest.raises(AttentionHookerError, match="image 1 has 4 crops .*'image_sizes'"):
        image_token_map(config, inputs, processor=processor)
    with pytest.raises(AttentionHookerError,
                       match=r"image 2 of size \(30, 90\) is cut into 1 x 3 tiles .* holds 3 crops"):
        image_token_map(config, dict(with_sizes, image_sizes=torch.tensor([(40, 40), (24, 72), (30, 90)])),
                        processor=processor)
    with pytest.raises(AttentionHookerError, match="run of 6 image tokens, not a multiple of the 4"):
        image_token_map(config, dict(input_ids=torch.tensor([[START] + [IMAGE] * 6 + [END]])))
    config.downsample_ratio = 0.3
    with pytest.raises(AttentionHookerError, match="downsample_ratio=0.3 must be 1 / k"):
        image_token_map(config, inputs)


def internvl_video_inputs():
    """Row 0: the 24 x 72 image (3 x 1 tiles + thumbnail), then a 2-frame video; row 1: the 50 x 30 image. As
    InternVLProcessor lays them out: each frame its own one-crop run, the frames merged into pixel_values
    with the images' crops in text order, nothing kept that says which runs are frames."""
    images = internvl_processor()(images=[coordinate_image(*SIZES[1]), coordinate_image(*SIZES[2])],
                                  return_tensors="pt")
    frames = transformers.InternVLVideoProcessor(size={"height": 32, "width": 32}, do_sample_frames=False)(
        videos=[[coordinate_image(40, 56), coordinate_image(40, 56)]], return_tensors="pt")["pixel_values_videos"]
    assert [int(n) for n in images["num_patches"]] == [4, 3] and tuple(frames.shape[:2]) == (1, 2)
    pixels = torch.cat([images["pixel_values"][:4], frames[0], images["pixel_values"][4:]])
    run = lambda n: [START] + [IMAGE] * 4 * n + [END]  # noqa: E731
    rows = [[1] + run(4) + [5] + run(1) + [6] + run(1), [1, 5] + run(3)]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([r + [7 + i % 40 for i in range(width - len(r))] for r in rows])
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def test_internvl_reads_video_frames_as_untiled_images_with_image_sizes_for_the_tiled_images_only():
    # review finding 10: the processor's outputs do not say which runs are frames, so frames are read as
    # untiled images, exactly placed; image_sizes may count the tiled images only
    model = tiny_internvl()
    inputs = internvl_video_inputs()
    processor = internvl_processor()
    tokens = image_token_map(model, dict(inputs, image_sizes=[SIZES[1], SIZES[2]]), processor=processor)
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "tiles", 4, 12), (0, "thumbnail", 4, 4), (1, "image", 4, 4), (2, "image", 4, 4), (3, "tiles", 8, 4),
        (3, "thumbnail", 4, 4)]
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    # every token's patches, frames' included, sit at its box's centre (images and frames share mean and std)
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    top, left, bottom, right = tokens.boxes().T
    torch.testing.assert_close(centres, torch.stack([(top + bottom) / 2, (left + right) / 2], 1), atol=0.02, rtol=0)
    per_run = image_token_map(model, dict(inputs, image_sizes=[[SIZES[1], (40, 56), (40, 56)], [SIZES[2]]]),
                              processor=processor)  # one size per run, frames included, per-row lists
    assert per_run.views == tokens.views and torch.equal(per_run.source, tokens.source)
    with pytest.raises(AttentionHookerError, match="got 3 image_sizes for 4 runs .* 2 of them tiled.*video frame"):
        image_token_map(model, dict(inputs, image_sizes=[SIZES[1], (40, 56), SIZES[2]]), processor=processor)


def test_internvl_capture_is_exact_against_eager_for_the_language_model_the_tower_and_generate():
    inputs, with_sizes, processor = internvl_inputs()
    model = tiny_internvl()
    reference = assert_language_model_exact(tiny_internvl, inputs, regex=LM, layers=2)
    assert_tower_exact(tiny_internvl, inputs, regex=r"vision_tower\.encoder\.layer\.\d+\.attention$",
                       tower=lambda m: m.model.vision_tower, tower_inputs=dict(pixel_values=inputs["pixel_values"]),
                       layers=2)
    assert_generate_exact(tiny_internvl, inputs, regex=LM, layers=2)
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, with_sizes, processor=processor)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, 4))
