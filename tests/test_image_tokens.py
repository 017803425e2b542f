"""Image-token maps (issue 23, part 1): each family's table checked against the model's own code path
(tests/image_token_oracle.py: which pixel_values patches feed which image token, and where those patches
are in the image through the real image processor), not against itself."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)

IMAGE_TOKEN = 60


def tiny_llava(strategy="default"):
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        image_token_id=IMAGE_TOKEN, vision_feature_select_strategy=strategy, vision_feature_layer=-1)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def llava_inputs(per_image: int, sizes=(40, 64)):
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [coordinate_image(s, s) for s in sizes]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * per_image + [7, 8],
                        [1, IMAGE_TOKEN] + [IMAGE_TOKEN] * (per_image - 1) + [9, 3, 4]])
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)), processor


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_tokens_are_the_patches_that_feed_them(strategy):
    model = tiny_llava(strategy)
    inputs, processor = llava_inputs(16 + (strategy == "full"))
    tokens = image_token_map(model, inputs)
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    assert len(tokens) == 2 * (16 + (strategy == "full"))
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    boxes = tokens.boxes()
    has = ~centres[:, 0].isnan()
    assert has.sum() == 32
    y, x = centres[has].T
    top, left, bottom, right = boxes[has].T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    # each patch's centre is its box's centre (within the processor's resampling of a pixel)
    assert torch.allclose(y, (top + bottom) / 2, atol=0.02) and torch.allclose(x, (left + right) / 2, atol=0.02)


def test_unknown_families_and_missing_fields_are_refused_by_name():
    config = transformers.BertConfig()
    with pytest.raises(AttentionHookerError, match="no reader of image tokens for model type 'bert'.*llava"):
        image_token_map(config, dict(input_ids=torch.ones(1, 3, dtype=torch.long)))
    with pytest.raises(AttentionHookerError, match="'input_ids'"):
        image_token_map(tiny_llava().config, dict(pixel_values=torch.zeros(1, 3, 32, 32)))
    with pytest.raises(AttentionHookerError, match="not a multiple of the 16"):
        image_token_map(tiny_llava().config, dict(input_ids=torch.tensor([[IMAGE_TOKEN] * 15])))
    assert "llava" in image_token_families()


def test_text_to_image_attention_of_a_captured_llava_is_the_eager_weights_on_the_patch_grid():
    from attention_hooker import TransformerAttentionHooker
    from attention_hooker.analysis.image_attention import image_attention

    model = tiny_llava()
    inputs, _ = llava_inputs(16)
    eager = tiny_llava()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions[0]  # (B, H, Q, K), the LM's layer 0
    with TransformerAttentionHooker(model, layer_regex=r"language_model\.layers\.0\.self_attn$") as hooker:
        with torch.no_grad():
            model(**inputs)
    (layer, calls), = hooker.values.items()
    tokens = image_token_map(model, inputs)
    for b in range(2):
        got = image_attention(calls[0], tokens, batch=b, queries=[-1])
        positions = tokens.in_row(b).position
        expected = reference[b, :, -1:, positions].double()  # (H, 1, 16), raster order
        torch.testing.assert_close(got.weights, expected, atol=1e-6, rtol=0)
        (view, grid), = got.grids.items()  # keyed by the index of the view in tokens.views
        assert tokens.views[view].image == b
        torch.testing.assert_close(grid, expected.reshape(2, 1, 4, 4), atol=1e-6, rtol=0)
        torch.testing.assert_close(got.share, expected.sum(-1), atol=1e-6, rtol=0)
        assert bool((got.share < 1 - 1e-3).all())  # text keys took the rest: nothing renormalised
