"""Cohere2-Vision image tokens (issue 23, parts 1-4): Aya Vision's pixel-shuffled blocks on tiles plus a global
thumbnail, placed with Cohere2-Vision's own canvas rule and markers, checked against the model's own code path
(which pixel_values patches feed which position), the real Cohere2VisionProcessor (its image processor's tiling
and its expansion of the image placeholder: each token's patches sit inside its box), and the capture of the
language model and the tower against eager attentions with the image tokens in."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)
from vlm_exactness import (assert_generate_exact, assert_image_attention_is_the_eager_slice,  # noqa: E402
                           assert_language_model_exact, assert_tower_exact, capture)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>",
           "<|IMG_LINE_BREAK|>"]
WORDS = ["look", "at", "a", "cat", "and", "<image>"]
PATCH = SPECIAL.index("<|IMG_PATCH|>")
SIZES = [(40, 40), (24, 72), (50, 30)]
LM = r"language_model\.layers\.\d+\.self_attn$"
TOWER = r"vision_tower\.encoder\.layers\.\d+\.self_attn$"


def tiny_cohere2_vision(implementation="sdpa"):
    config = transformers.Cohere2VisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="cohere2", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(SPECIAL) + len(WORDS),
                         sliding_window=4096, layer_types=["full_attention", "full_attention"]),
        image_token_id=PATCH, downsample_factor=2, alignment_intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.Cohere2VisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def cohere2_processor():
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>",
                              "image_token": "<|IMG_PATCH|>", "img_line_break_token": "<|IMG_LINE_BREAK|>"})
    # the image processor's patch_size is the tokens along a tile's side: 4 patches, 2 x 2 shuffled, 2
    images = transformers.Cohere2VisionImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                      min_patches=1, max_patches=4, patch_size=2)
    return transformers.Cohere2VisionProcessor(image_processor=images, tokenizer=tokenizer)


def cohere2_inputs():
    processor = cohere2_processor()
    texts = ["look <|IMG_PATCH|> cat", "a <|IMG_PATCH|> and <|IMG_PATCH|> cat"]
    out = dict(processor(text=texts, images=[coordinate_image(h, w) for h, w in SIZES], return_tensors="pt"))
    crops = out["pixel_values"].shape[0]
    assert int((out["input_ids"] == PATCH).sum()) == 4 * crops
    # pad row 0 with words to row 1's length (no padding: a fully padded query row is where Hugging Face's sdpa
    # and eager differ, and not what is tested here)
    short = int(out["attention_mask"][0].sum())
    long = int(out["attention_mask"][1].sum())
    texts[0] = "look <|IMG_PATCH|> " + "a " * (long - short) + "cat"
    out = dict(processor(text=texts, images=[coordinate_image(h, w) for h, w in SIZES], return_tensors="pt"))
    assert bool(out["attention_mask"].all())
    return out, dict(out, image_sizes=torch.tensor(SIZES)), processor


def test_cohere2_vision_tokens_are_pixel_shuffled_blocks_of_tiles_put_back():
    assert "cohere2_vision" in image_token_families()
    model = tiny_cohere2_vision()
    inputs, with_sizes, processor = cohere2_inputs()
    tokens = image_token_map(model, with_sizes, processor=processor)
    assert tokens.family == "cohere2_vision"
    # Cohere2-Vision's own canvas rule (least upscaling): even the 40 x 40 image is cut into 2 x 2 tiles, where
    # GotOcr2's rule (InternVL, Aya Vision) keeps it one crop
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "tiles", 8, 8), (0, "global", 4, 4), (1, "tiles", 4, 12), (1, "global", 4, 4), (2, "tiles", 8, 4),
        (2, "global", 4, 4)]
    assert len(tokens) == 4 * inputs["pixel_values"].shape[0]
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_processor.image_mean,
                                 processor.image_processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.03, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.03, rtol=0)


def test_cohere2_vision_refuses_what_it_cannot_place():
    model = tiny_cohere2_vision()
    inputs, with_sizes, processor = cohere2_inputs()
    with pytest.raises(AttentionHookerError, match="needs its processor"):
        image_token_map(model, with_sizes)
    with pytest.raises(AttentionHookerError, match="crops .* pass 'image_sizes'"):
        image_token_map(model, inputs, processor=processor)


def test_cohere2_vision_capture_is_exact_against_eager_for_the_language_model_the_tower_and_generate():
    inputs, with_sizes, processor = cohere2_inputs()
    reference = assert_language_model_exact(tiny_cohere2_vision, inputs, regex=LM, layers=2)
    assert_tower_exact(tiny_cohere2_vision, inputs, regex=TOWER, tower=lambda m: m.model.vision_tower,
                       tower_inputs=dict(pixel_values=inputs["pixel_values"]), layers=2)
    assert_generate_exact(tiny_cohere2_vision, inputs, regex=LM, layers=2)
    model = tiny_cohere2_vision()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, with_sizes, processor=processor)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, -2))
