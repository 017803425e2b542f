"""GOT-OCR 2 image tokens (issue 23, parts 1-4): 4 x 4-patch blocks of a SAM tower's convolutions on dynamic
tiles plus a thumbnail, each token computed from the overlapping patches its convolutions reach, checked against
the model's own code path (which pixel_values patches feed which position), the real GotOcr2ImageProcessor (each
token's patches' centre inside its box), and the capture of the language model against eager attentions with
the image tokens in, in one forward and under generate()."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)
from vlm_exactness import (assert_generate_exact, assert_image_attention_is_the_eager_slice,  # noqa: E402
                           assert_language_model_exact, capture)

IMAGE, START, END = 60, 58, 59
SIZES = [(40, 40), (24, 72)]  # 1 crop; 1 x 3 tiles + thumbnail
LM = r"language_model\.layers\.\d+\.self_attn$"


def tiny_got_ocr2(implementation="sdpa"):
    config = transformers.GotOcr2Config(
        vision_config=dict(image_size=32, patch_size=4, hidden_size=16, output_channels=8, num_hidden_layers=2,
                           num_attention_heads=2, mlp_dim=16, window_size=4, global_attn_indexes=[1]),
        text_config=dict(model_type="qwen2", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
        image_token_index=IMAGE)
    torch.manual_seed(0)
    model = transformers.GotOcr2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init leaves the convolutions' output ~1e-20: give them weights that show
        for module in list(model.model.vision_tower.neck.modules()) + list(model.model.multi_modal_projector.modules()):
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, 0.3)
    model.set_attn_implementation(implementation)
    return model


def got_inputs():
    processor = transformers.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                   min_patches=1, max_patches=4)
    out = processor(images=[coordinate_image(h, w) for h, w in SIZES], return_tensors="pt")
    crops = [int(n) for n in out["num_patches"]]
    assert crops == [1, 4]
    run = lambda n: [START] + [IMAGE] * 4 * n + [END]  # noqa: E731  (8 x 8 patches -> 2 x 2 tokens a crop)
    rows = [[1, 5] + run(crops[0]), [1] + run(crops[1]) + [6]]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([r + [7 + i % 40 for i in range(width - len(r))] for r in rows])
    inputs = dict(input_ids=ids, pixel_values=out["pixel_values"], attention_mask=torch.ones_like(ids))
    return inputs, dict(inputs, image_sizes=torch.tensor(SIZES)), processor


def test_got_ocr2_tokens_are_the_patches_their_convolutions_reach():
    assert "got_ocr2" in image_token_families()
    model = tiny_got_ocr2()
    inputs, with_sizes, processor = got_inputs()
    tokens = image_token_map(model, with_sizes, processor=processor)
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "image", 8, 8), (1, "tiles", 8, 24), (1, "thumbnail", 8, 8)]
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_tower,
                                    language_model=model.model.language_model, patch=4)
    assert claimed_sources(tokens) == found
    # sources overlap the neighbours' (a token reaches 4 patches past its block), yet their centre is in its box
    # (image 0's 2 x 2 tokens of 8 x 8 patches reach 5 x 5, 5 x 8, 8 x 5 and all 8 x 8 patches)
    assert [int((s >= 0).sum()) for s in tokens.source[:4]] == [25, 40, 40, 64]
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    # a token whose reach is clipped by the crop's far edge has its sources' centre on its box's near edge (here
    # every token: 2 tokens a side), so the check allows rounding at the edge
    eps = 1e-3
    assert bool(((top - eps <= y) & (y <= bottom + eps) & (left - eps <= x) & (x <= right + eps)).all())
    # and the sources' centres are not all in one place: they follow the tokens' blocks
    assert bool((x[1] > x[0] + 0.1) & (y[2] > y[0] + 0.1))


def test_got_ocr2_refuses_what_it_cannot_place():
    model = tiny_got_ocr2()
    inputs, with_sizes, processor = got_inputs()
    with pytest.raises(AttentionHookerError, match="has 4 crops .* pass 'image_sizes'"):
        image_token_map(model, inputs)
    with pytest.raises(AttentionHookerError, match="not a multiple of the 4"):
        image_token_map(model, dict(inputs, input_ids=torch.tensor([[START, IMAGE, IMAGE, IMAGE, END]])))


def test_got_ocr2_capture_is_exact_against_eager_for_the_language_model_and_generate():
    inputs, with_sizes, processor = got_inputs()
    reference = assert_language_model_exact(tiny_got_ocr2, inputs, regex=LM, layers=2)
    assert_generate_exact(tiny_got_ocr2, inputs, regex=LM, layers=2)
    model = tiny_got_ocr2()
    got = capture(model, LM, lambda: model(**inputs))
    tokens = image_token_map(model, with_sizes, processor=processor)
    for layer in range(2):
        assert_image_attention_is_the_eager_slice(got[layer][0], reference[layer], tokens, queries=(-1, -2))
