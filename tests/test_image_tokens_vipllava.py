"""VipLLaVA image tokens (issue 23, parts 1-4): LLaVA's layout read by the shared LLaVA helper, checked here on
VipLLaVA's own model (features of several tower layers concatenated, class token always dropped) against its own
code path: sources by perturbation with two images of different sizes through the real CLIP image processor,
boxes holding their patches' centres, the language model's capture (sdpa and eager) against eager
``output_attentions`` in one forward and under ``generate()``, and ``image_attention`` against the eager slice."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)

IMAGE_TOKEN = 60
LM_LAYERS = r"language_model\.layers\.\d+\.self_attn$"


def tiny_vipllava(attn="sdpa"):
    config = transformers.VipLlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=[0, -2, -1])
    torch.manual_seed(0)
    model = transformers.VipLlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def vipllava_inputs(sizes=(40, 64)):
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=[coordinate_image(s, s) for s in sizes], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * 16 + [7, 8],
                        [1, IMAGE_TOKEN] + [IMAGE_TOKEN] * 15 + [9, 3, 4]])
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)), processor


def test_vipllava_tokens_are_the_patches_that_feed_them_and_sit_where_their_pixels_are():
    assert "vipllava" in image_token_families()
    model = tiny_vipllava()
    inputs, processor = vipllava_inputs()
    tokens = image_token_map(model, inputs)
    assert tokens.family == "vipllava" and len(tokens) == 32
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.02, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.02, rtol=0)


def test_vipllava_token_counts_that_do_not_fit_are_refused_by_name():
    with pytest.raises(AttentionHookerError, match="15 image tokens, not a multiple of the 16"):
        image_token_map(tiny_vipllava().config, dict(input_ids=torch.tensor([[IMAGE_TOKEN] * 15])))


def _layers(hooker):
    names = sorted(hooker.values, key=lambda n: int(n.split(".")[-2]))
    return [hooker.values[n] for n in names]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vipllava_language_model_capture_with_image_tokens_is_the_eager_attention(attn):
    model, eager = tiny_vipllava(attn), tiny_vipllava("eager")
    inputs, _ = vipllava_inputs()
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        plain = model(**inputs).logits
        with TransformerAttentionHooker(model, layer_regex=LM_LAYERS) as hooker:
            hooked = model(**inputs).logits
    assert torch.equal(plain, hooked)
    layers = _layers(hooker)
    assert len(layers) == len(reference.attentions) == 2
    for (got,), expected in zip(layers, reference.attentions):
        assert got.shape == expected.shape == (2, 2, 20, 20)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    tokens = image_token_map(model, inputs)
    for b in range(2):
        got = image_attention(layers[1][0], tokens, batch=b, queries=[-1])
        expected = reference.attentions[1][b, :, -1:, tokens.in_row(b).position].double()  # (H, 1, 16)
        torch.testing.assert_close(got.weights, expected, atol=1e-6, rtol=0)
        (view, grid), = got.grids.items()
        assert tokens.views[view].image == b
        torch.testing.assert_close(grid, expected.reshape(2, 1, 4, 4), atol=1e-6, rtol=0)
        torch.testing.assert_close(got.share, expected.sum(-1), atol=1e-6, rtol=0)
        assert bool((got.share < 1 - 1e-3).all())


def test_vipllava_generate_on_sdpa_equals_the_eager_steps():
    sdpa, eager = tiny_vipllava("sdpa"), tiny_vipllava("eager")
    inputs, _ = vipllava_inputs()
    kwargs = dict(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(sdpa, layer_regex=LM_LAYERS) as hooker:
            generated = sdpa.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    lm = _layers(hooker)
    assert [len(calls) for calls in lm] == [3, 3]
    for step, expected_layers in enumerate(reference.attentions):
        for calls, expected in zip(lm, expected_layers):
            assert calls[step].shape == expected.shape
            torch.testing.assert_close(calls[step], expected, atol=1e-6, rtol=1e-5)
