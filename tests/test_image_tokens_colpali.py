"""ColPali image tokens (issue 23, parts 1-4): PaliGemma's reader on ColPali's own retrieval model, checked
against its code path (which pixel_values patches feed which position, two images of different sizes through
the real SigLIP image processor, three images over two rows), the capture of the language model (sdpa and
eager) against the eager model's returned attentions, and ``image_attention`` against the eager slice. ColPali
does not generate (it returns embeddings), so there is no generate check."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)
from vlm_exactness import assert_image_attention_is_the_eager_slice, capture  # noqa: E402

IMAGE = 60
LM = r"language_model\.layers\.\d+\.self_attn$"


def tiny_colpali(implementation="sdpa"):
    vlm = dict(model_type="paligemma", image_token_index=IMAGE, projection_dim=16,
               vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                                  intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
               text_config=dict(model_type="gemma", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=64))
    config = transformers.ColPaliConfig(vlm_config=vlm, embedding_dim=8)
    torch.manual_seed(0)
    model = transformers.ColPaliForRetrieval(config).eval()
    model.set_attn_implementation(implementation)
    return model


def colpali_inputs():
    processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    images = [coordinate_image(40, 40), coordinate_image(64, 48), coordinate_image(30, 56)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    rows = [[2] + [IMAGE] * 16 + [5], [2] + [IMAGE] * 16 + [5] + [IMAGE] * 16 + [5]]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([r + [7 + i % 40 for i in range(width - len(r))] for r in rows])
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, -2:] = 1
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                token_type_ids=token_type_ids), processor


def test_colpali_tokens_are_the_patches_that_feed_them_and_sit_where_they_came_from():
    assert "colpali" in image_token_families()
    model = tiny_colpali()
    inputs, processor = colpali_inputs()
    tokens = image_token_map(model, inputs)
    assert tokens.family == "colpali" and len(tokens) == 48
    assert tokens.image.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    found = sources_by_perturbation(model, inputs, tower=model.vlm.vision_tower,
                                    language_model=model.vlm.language_model, patch=8)
    assert claimed_sources(tokens) == found
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.02, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.02, rtol=0)


def test_colpali_refuses_counts_that_are_not_whole_images():
    with pytest.raises(AttentionHookerError, match="not a multiple of the 16"):
        image_token_map(tiny_colpali().config, dict(input_ids=torch.tensor([[IMAGE] * 20 + [3]])))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_colpali_language_model_capture_is_the_eager_attention(implementation):
    inputs, _ = colpali_inputs()
    eager = tiny_colpali("eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        model = tiny_colpali(implementation)
        plain = model(**inputs).embeddings
    torch.testing.assert_close(plain, reference.embeddings, atol=1e-5, rtol=0)  # sdpa and eager: one model
    got = capture(model, LM, lambda: model(**inputs))
    assert sorted(got) == [0, 1] and len(reference.attentions) == 2
    tokens = image_token_map(model, inputs)
    for layer in range(2):
        (calls,) = got[layer]
        torch.testing.assert_close(calls, reference.attentions[layer], atol=1e-6, rtol=1e-5)
        assert_image_attention_is_the_eager_slice(calls, reference.attentions[layer], tokens, queries=(-1, -3))
