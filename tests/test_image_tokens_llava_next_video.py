"""LLaVA-NeXT-Video image and video tokens (issue 23, parts 1-4): images through LLaVA-NeXT's reader, videos as
pooled frames, checked on LLaVA-NeXT-Video's own model: which ``pixel_values`` / ``pixel_values_videos`` patches
feed which position (two images of different sizes and two videos, one row image-first and one video-first),
where those patches are through the real image and video processors, the language model's capture (sdpa and
eager) against eager ``output_attentions`` in one forward and under ``generate()``, and ``image_attention``
against the eager slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)
from vlm_exactness import (assert_generate_exact, assert_image_attention_is_the_eager_slice,  # noqa: E402
                           assert_language_model_exact, capture)

IMAGE, VIDEO = 60, 61
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
SIZES = [(40, 40), (20, 72)]  # 2 x 2 tiles; 1 x 2 tiles, unpadded
LM = r"language_model\.layers\.\d+\.self_attn$"


def tiny_llava_next_video(implementation="sdpa"):
    config = transformers.LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
        spatial_pool_stride=2, spatial_pool_mode="average")
    torch.manual_seed(0)
    model = transformers.LlavaNextVideoForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def inputs_and_processors(model):
    """Row 0: image A (2 x 2 tiles), then video 0; row 1: video 1, then image B (1 x 2 tiles). Videos: 2 frames
    of 4 x 4 patches pooled to 2 x 2 each: 8 tokens."""
    images = transformers.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                  image_grid_pinpoints=PINPOINTS)
    videos = transformers.LlavaNextVideoVideoProcessor(size={"shortest_edge": 32},
                                                       crop_size={"height": 32, "width": 32})
    out = images(images=[coordinate_image(h, w) for h, w in SIZES], return_tensors="pt")
    clips = [np.stack([np.asarray(coordinate_image(s, s))] * 2) for s in (40, 48)]
    pixel_values_videos = videos(videos=clips, return_tensors="pt")["pixel_values_videos"]
    assert pixel_values_videos.shape == (2, 2, 3, 32, 32)
    with torch.no_grad():
        features = model.model.get_image_features(out["pixel_values"], out["image_sizes"],
                                                  vision_feature_select_strategy="default")
        lengths = [len(f) for f in features.pooler_output]
    rows = [[1, 5] + [IMAGE] * lengths[0] + [6] + [VIDEO] * 8, [1] + [VIDEO] * 8 + [6] + [IMAGE] * lengths[1]]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([r + [7 + i % 40 for i in range(width - len(r))] for r in rows])
    inputs = dict(input_ids=ids, pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                  pixel_values_videos=pixel_values_videos, attention_mask=torch.ones_like(ids))
    return inputs, images, videos, lengths


def test_llava_next_video_tokens_are_the_patches_that_feed_them_and_sit_where_their_pixels_are():
    assert "llava_next_video" in image_token_families()
    model = tiny_llava_next_video()
    inputs, images, videos, lengths = inputs_and_processors(model)
    tokens = image_token_map(model, inputs, processor=images)
    assert len(tokens) == sum(lengths) + 16
    # numbered in token order: A, video 0 (row 0), video 1, B (row 1)
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "tiles", 8, 8), (0, "base", 4, 4), (1, "frame 0", 4, 4), (1, "frame 1", 4, 4),
        (2, "frame 0", 4, 4), (2, "frame 1", 4, 4), (3, "tiles", 2, 8), (3, "base", 4, 4)]
    oracle = dict(tower=model.model.vision_tower, language_model=model.model.language_model, patch=8)
    found = sources_by_perturbation(model, inputs, **oracle)
    image_units = inputs["pixel_values"].reshape(-1, 3, 32, 32).shape[0] * 16
    for key, units in sources_by_perturbation(model, inputs, field="pixel_values_videos", **oracle).items():
        assert key not in found
        found[key] = {image_units + u for u in units}
    assert claimed_sources(tokens) == found
    # boxes: the video frames' pooled blocks hold their patches' centres (video processor's own mean and std)
    pixels = torch.cat([inputs[name].reshape(-1, 3, 32, 32) for name in ("pixel_values", "pixel_values_videos")])
    in_video = torch.tensor([tokens.views[int(v)].name.startswith("frame") for v in tokens.view])
    kept = tokens.select(in_video)
    centres = centres_of_sources(kept, pixels, videos.image_mean, videos.image_std)
    y, x = centres.T
    top, left, bottom, right = kept.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.02, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.02, rtol=0)
    # the images' patches, through LLaVA-NeXT's reader, inside their boxes too
    images_only = tokens.select(~in_video & (tokens.height > 0))
    centres = centres_of_sources(images_only, pixels, images.image_mean, images.image_std)
    y, x = centres.T
    top, left, bottom, right = images_only.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())


def test_llava_next_video_refuses_what_it_cannot_place():
    model = tiny_llava_next_video()
    inputs, images, _, _ = inputs_and_processors(model)
    with pytest.raises(AttentionHookerError, match="16 video tokens in input_ids, but pixel_values_videos holds 1"):
        image_token_map(model, dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:1]))
    with pytest.raises(AttentionHookerError, match="needs 'pixel_values_videos'"):
        image_token_map(model, {k: v for k, v in inputs.items() if k != "pixel_values_videos"})
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(AttentionHookerError, match="'default' only"):
        image_token_map(model, inputs)


def test_llava_next_video_capture_is_exact_against_eager_for_the_language_model_and_generate():
    inputs, images, _, _ = inputs_and_processors(tiny_llava_next_video())
    reference = assert_language_model_exact(tiny_llava_next_video, inputs, regex=LM, layers=2)
    assert_generate_exact(tiny_llava_next_video, inputs, regex=LM, layers=2)
    model = tiny_llava_next_video()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, inputs, processor=images)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, -2))
