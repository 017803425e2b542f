"""Mistral 3 image tokens (issue 23, parts 1-4): the shared Pixtral layout with a 2 x 2 merge, checked on
Mistral 3's own model with images of three sizes (two in one row) through the real PixtralImageProcessor:
sources by perturbation, boxes holding their patches' centre, the language model's capture (sdpa and eager)
against eager attentions in one forward and under generate(), and image_attention against the eager slice."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import centres_of_sources, claimed_sources, sources_by_perturbation  # noqa: E402
from test_image_tokens_llava_towers import IMG, pixtral_inputs  # noqa: E402
from vlm_exactness import (assert_generate_exact, assert_image_attention_is_the_eager_slice,  # noqa: E402
                           assert_language_model_exact, capture)

LM = r"language_model\.layers\.\d+\.self_attn$"


def tiny_mistral3(implementation="sdpa"):
    # tower patches of 4 px merged 2 x 2: one token per 8 px, as the processor's patch_size of 8 lays out
    config = transformers.Mistral3Config(
        vision_config=dict(model_type="pixtral", image_size=32, patch_size=4, hidden_size=16, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, head_dim=8),
        text_config=dict(model_type="mistral", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, vocab_size=64),
        image_token_index=IMG, spatial_merge_size=2, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def test_mistral3_tokens_are_merged_patch_blocks_at_each_images_own_size():
    assert "mistral3" in image_token_families()
    model = tiny_mistral3()
    inputs, processor, sizes = pixtral_inputs()
    tokens = image_token_map(model, inputs)
    assert [(v.image, v.rows, v.cols) for v in tokens.views] == [(k, h // 4, w // 4) for k, (h, w) in enumerate(sizes)]
    assert bool((tokens.height == 2).all())
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=4)
    assert claimed_sources(tokens) == found
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    assert torch.allclose(y, (top + bottom) / 2, atol=0.04) and torch.allclose(x, (left + right) / 2, atol=0.04)


def test_mistral3_capture_is_exact_against_eager_for_the_language_model_and_generate():
    inputs, _, _ = pixtral_inputs(fill=3)  # no padding: Hugging Face's sdpa and eager differ on padded rows
    reference = assert_language_model_exact(tiny_mistral3, inputs, regex=LM, layers=2)
    assert_generate_exact(tiny_mistral3, inputs, regex=LM, layers=2)
    model = tiny_mistral3()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, inputs)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, 3))
