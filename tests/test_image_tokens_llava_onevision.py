"""Image-token maps of LLaVA-OneVision (issue 23): base view + unpadded any-resolution tiles (shrunk bilinearly
past anyres_max_N), row ends, untiled square images in multi-image rows, and videos (shrunk frames); checked
against the model's own code path (which pixel_values patches feed which image token; row ends are its
image_newline embedding), the real image processor, and the capture against eager attentions with the image
tokens in."""

from __future__ import annotations

import numpy as np
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
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
SIZES = [(40, 40), (30, 60), (20, 72), (50, 30)]  # rows: [tiled], [tiled], [two square images]
LM = r"language_model\.layers\.\d+\.self_attn$"
TOWER = r"vision_tower\.encoder\.layers\.\d+\.self_attn$"


def tiny_onevision(implementation="sdpa", aspect="anyres_max_1"):
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="qwen2", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
        image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def onevision_inputs(model):
    processor = transformers.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                                          image_grid_pinpoints=PINPOINTS)
    images = [[coordinate_image(*SIZES[0])], [coordinate_image(*SIZES[1])],
              [coordinate_image(*SIZES[2]), coordinate_image(*SIZES[3])]]
    out = processor(images=images, return_tensors="pt")
    assert out["batch_num_images"].tolist() == [1, 1, 2]
    with torch.no_grad():  # how many tokens each image takes, from the model's own packing
        lengths = [len(f) for f in model.model.get_image_features(
            out["pixel_values"], out["image_sizes"], batch_num_images=out["batch_num_images"],
            vision_feature_select_strategy="full", vision_aspect_ratio=model.config.vision_aspect_ratio).pooler_output]
    rows = [[1, 5] + [IMAGE] * lengths[0], [1] + [IMAGE] * lengths[1] + [6],
            [1] + [IMAGE] * lengths[2] + [6] + [IMAGE] * lengths[3]]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([r + [7 + i % 40 for i in range(width - len(r))] for r in rows])
    return dict(input_ids=ids, pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                batch_num_images=out["batch_num_images"], attention_mask=torch.ones_like(ids)), processor, lengths


@pytest.mark.parametrize("aspect", ["anyres_max_1", "anyres_max_9"], ids=["shrunk", "whole"])
def test_onevision_tokens_are_the_patches_that_feed_them_and_row_ends_are_the_newline_embedding(aspect):
    model = tiny_onevision(aspect=aspect)
    inputs, processor, lengths = onevision_inputs(model)
    tokens = image_token_map(model, inputs, processor=processor)
    assert len(tokens) == sum(lengths)
    tiles = [(4, 4), (2, 5)] if aspect == "anyres_max_1" else [(8, 8), (4, 8)]
    # view 0 is the image itself (its tiles put back), the coarser base look is view 1 (image_tokens' module doc)
    assert [(v.image, v.index, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, 0, "tiles", *tiles[0]), (0, 1, "base", 4, 4), (1, 0, "tiles", *tiles[1]), (1, 1, "base", 4, 4),
        (2, 0, "image", 4, 4), (3, 0, "image", 4, 4)]
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]  # a list of pairs reads as the tensor does
    listed = image_token_map(model, dict(inputs, image_sizes=sizes), processor=processor)
    assert listed.views == tokens.views and torch.equal(listed.source, tokens.source)
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    newline = (seen["embeds"] == model.model.image_newline).all(-1)
    ends = tokens.height == 0
    assert sorted(map(list, zip(tokens.batch[ends].tolist(), tokens.position[ends].tolist()))) == \
        newline.nonzero().tolist()
    kept = tokens.select(~ends)
    centres = centres_of_sources(kept, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = kept.boxes().T
    inside = (top >= 0) & (bottom <= 1) & (left >= 0) & (right <= 1)  # no padding in the token's patches
    assert int(inside.sum()) > 40
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right))[inside].all())
    if aspect == "anyres_max_9":  # one patch per token: its centre is its box's centre
        torch.testing.assert_close(y[inside], ((top + bottom) / 2)[inside], atol=0.03, rtol=0)
        torch.testing.assert_close(x[inside], ((left + right) / 2)[inside], atol=0.03, rtol=0)


def test_onevision_refuses_what_it_cannot_read():
    model = tiny_onevision()
    inputs, processor, _ = onevision_inputs(model)
    with pytest.raises(AttentionHookerError, match="batch_num_images=\\[1, 1, 1\\] counts 3 images, image_sizes 4"):
        image_token_map(model, dict(inputs, batch_num_images=torch.tensor([1, 1, 1])))
    with pytest.raises(AttentionHookerError, match="needs 'image_sizes'"):
        image_token_map(model, {k: v for k, v in inputs.items() if k != "image_sizes"})
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(AttentionHookerError, match="siglip_vision_model tower .*'full' only"):
        image_token_map(model, inputs)
    model.config.vision_feature_select_strategy = "full"
    model.config.vision_aspect_ratio = "anyres"
    with pytest.raises(AttentionHookerError, match="'anyres_max_N' only"):
        image_token_map(model, inputs)


def test_onevision_capture_is_exact_against_eager_for_the_language_model_the_tower_and_generate():
    inputs, _, _ = onevision_inputs(tiny_onevision())
    reference = assert_language_model_exact(tiny_onevision, inputs, regex=LM, layers=2)
    crops = [5, 3, 1, 1]  # the crops each image really has (pixel_values are zero-padded to 5)
    real = torch.cat([inputs["pixel_values"][i, :n] for i, n in enumerate(crops)])
    assert_tower_exact(tiny_onevision, inputs, regex=TOWER, tower=lambda m: m.model.vision_tower,
                       tower_inputs=dict(pixel_values=real), layers=2)
    assert_generate_exact(tiny_onevision, inputs, regex=LM, layers=2)
    model = tiny_onevision()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, inputs)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, 3))


VIDEO = 61


def onevision_video_inputs():
    processor = transformers.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    videos = [np.stack([np.asarray(coordinate_image(h, w))] * 2) for h, w in [(40, 40), (24, 56)]]
    out = processor(videos=videos, return_tensors="pt")
    per_video = 2 * 4 + 1  # two frames of 2 x 2 shrunk patches, and a row end
    ids = torch.tensor([[1, 5] + [VIDEO] * per_video + [7, 8], [1] + [VIDEO] * per_video + [9, 3, 4]])
    return dict(input_ids=ids, pixel_values_videos=out["pixel_values_videos"],
                attention_mask=torch.ones_like(ids)), processor


def tiny_onevision_video(implementation="sdpa"):
    model = tiny_onevision(implementation)
    model.config.video_token_id = VIDEO
    return model


def test_onevision_video_tokens_are_shrunk_frame_patches_and_a_row_end():
    model = tiny_onevision_video()
    inputs, processor = onevision_video_inputs()
    tokens = image_token_map(model, inputs)
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "frame 0", 2, 2), (0, "frame 1", 2, 2), (1, "frame 0", 2, 2), (1, "frame 1", 2, 2)]
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8, field="pixel_values_videos")
    assert claimed_sources(tokens) == found
    ends = tokens.height == 0
    assert tokens.position[ends].tolist() == [10, 9]
    kept = tokens.select(~ends)
    centres = centres_of_sources(kept, inputs["pixel_values_videos"], processor.image_mean, processor.image_std)
    top, left, bottom, right = kept.boxes().T
    torch.testing.assert_close(centres[:, 0], (top + bottom) / 2, atol=0.03, rtol=0)
    torch.testing.assert_close(centres[:, 1], (left + right) / 2, atol=0.03, rtol=0)
    with pytest.raises(AttentionHookerError, match="images or videos in one call, not both"):
        image_token_map(model, dict(inputs, pixel_values=torch.zeros(1, 1, 3, 32, 32)))


def test_onevision_video_capture_is_exact_against_eager_with_generate():
    inputs, _ = onevision_video_inputs()
    reference = assert_language_model_exact(tiny_onevision_video, inputs, regex=LM, layers=2)
    assert_generate_exact(tiny_onevision_video, inputs, regex=LM, layers=2)
    model = tiny_onevision_video()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, inputs)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1,))
