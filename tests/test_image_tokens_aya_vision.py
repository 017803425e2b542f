"""Aya Vision image tokens (issue 23, parts 1-4): pixel-shuffled 2 x 2 blocks of SigLIP patches on tiles plus a
global thumbnail, each crop's tokens after its own tile marker, checked against the model's own code path (which
pixel_values patches feed which position), the real AyaVisionProcessor (GotOcr2ImageProcessor tiling and its own
expansion of the image placeholder: each token's patches sit inside its box), and the capture of the language
model and the tower against eager attentions with the image tokens in."""

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
           "<|IMG_LINE_BREAK|>", "TILE_GLOBAL", "TILE"]
WORDS = ["look", "at", "a", "cat", "and"]
PATCH = SPECIAL.index("<|IMG_PATCH|>")
SIZES = [(40, 40), (24, 72), (50, 30)]  # 1 crop; 1 x 3 tiles + global; 2 x 1 tiles + global (rows x cols)
LM = r"language_model\.layers\.\d+\.self_attn$"
TOWER = r"vision_tower\.encoder\.layers\.\d+\.self_attn$"


def tiny_aya(implementation="sdpa"):
    config = transformers.AyaVisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="cohere", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(SPECIAL) + len(WORDS)),
        image_token_index=PATCH, downsample_factor=2, vision_feature_select_strategy="full",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    model = transformers.AyaVisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def aya_processor():
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL[4:])
    images = transformers.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                min_patches=1, max_patches=4)
    # the processor's patch_size is the tower's patch times the pixel shuffle's factor: 2 x 2 tokens a crop
    return transformers.AyaVisionProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16, img_size=32)


def aya_inputs():
    processor = aya_processor()
    # row 0 filled with words to row 1's length: no padding (a fully padded query row is where Hugging Face's
    # sdpa and eager differ, and not what is tested here)
    out = dict(processor(text=["look <image> " + "a " * 38 + "cat", "a <image> and <image> cat"],
                         images=[coordinate_image(h, w) for h, w in SIZES], return_tensors="pt", padding=True))
    assert out["pixel_values"].shape[0] == 1 + 4 + 3
    assert bool(out["attention_mask"].all())
    assert int((out["input_ids"] == PATCH).sum()) == 4 * 8
    return out, dict(out, image_sizes=torch.tensor(SIZES)), processor


def test_aya_vision_tokens_are_pixel_shuffled_blocks_of_tiles_put_back():
    assert "aya_vision" in image_token_families()
    model = tiny_aya()
    inputs, with_sizes, processor = aya_inputs()
    tokens = image_token_map(model, with_sizes, processor=processor)
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "image", 4, 4), (1, "tiles", 4, 12), (1, "global", 4, 4), (2, "tiles", 8, 4), (2, "global", 4, 4)]
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


def test_aya_vision_refuses_what_it_cannot_place():
    model = tiny_aya()
    inputs, with_sizes, processor = aya_inputs()
    with pytest.raises(AttentionHookerError, match="needs its processor"):
        image_token_map(model, with_sizes)
    with pytest.raises(AttentionHookerError, match="image 1 has 4 crops .* pass 'image_sizes'"):
        image_token_map(model, inputs, processor=processor)
    with pytest.raises(AttentionHookerError, match=r"cut into 1 x 1 tiles \+ a thumbnail .* it has 4 crops"):
        image_token_map(model, dict(with_sizes, image_sizes=torch.tensor([(40, 40)] * 3)), processor=processor)
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(AttentionHookerError, match="'full' only"):
        image_token_map(model, with_sizes, processor=processor)


def test_aya_vision_capture_is_exact_against_eager_for_the_language_model_the_tower_and_generate():
    inputs, with_sizes, processor = aya_inputs()
    reference = assert_language_model_exact(tiny_aya, inputs, regex=LM, layers=2)
    assert_tower_exact(tiny_aya, inputs, regex=TOWER, tower=lambda m: m.model.vision_tower,
                       tower_inputs=dict(pixel_values=inputs["pixel_values"]), layers=2)
    assert_generate_exact(tiny_aya, inputs, regex=LM, layers=2)
    model = tiny_aya()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, with_sizes, processor=processor)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, -2))
