"""Idefics3 and SmolVLM image tokens (issue 23, parts 1-4): tiles plus a global image, pixel shuffle of
``scale_factor^2`` patches a token, row/column markers as text, padding crops. Checked against the model's
own code path (which pixel_values patches feed which language-model position, and where those patches are
in the image through the real image processor and processor), and the library's capture of the language
model against eager ``output_attentions``, in one forward and under ``generate()``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)

SPECIAL = (["<pad>", "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>", "<global-img>",
            "<end_of_utterance>"] + [f"<row_{i}_col_{j}>" for i in range(1, 4) for j in range(1, 4)])
WORDS = ["\n", "look", "at", "a", "cat"]
IMAGE_TOKEN = SPECIAL.index("<image>")
# Idefics3: tiles of 32 px, 8 px patches (4 x 4), 2 x 2 patches a token; SmolVLM: 48 px, 8 px (6 x 6), 3 x 3.
FAMILIES = {"idefics3": dict(tile=32, patch=8, scale=2), "smolvlm": dict(tile=48, patch=8, scale=3)}


def tokenizer(padding_side="left"):
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Split(pattern=r"\s+", behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>", padding_side=padding_side,
                                                additional_special_tokens=SPECIAL[4:])


def tiny(family, attn="sdpa"):
    f = FAMILIES[family]
    vision = dict(image_size=f["tile"], patch_size=f["patch"], hidden_size=16, intermediate_size=16,
                  num_hidden_layers=1, num_attention_heads=2)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, vocab_size=len(SPECIAL) + len(WORDS),
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "idefics3":
        config = transformers.Idefics3Config(vision_config=vision, text_config=text, scale_factor=f["scale"],
                                             image_token_id=IMAGE_TOKEN)
        cls = transformers.Idefics3ForConditionalGeneration
    else:
        config = transformers.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=f["scale"],
                                            image_token_id=IMAGE_TOKEN)
        cls = transformers.SmolVLMForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    model.set_attn_implementation(attn)
    return model


def processor(family, split=True, padding_side="left"):
    f = FAMILIES[family]
    sizes = dict(size={"longest_edge": 2 * f["tile"]}, max_image_size={"longest_edge": f["tile"]},
                 do_image_splitting=split)
    seq = (f["tile"] // f["patch"] // f["scale"]) ** 2
    if family == "idefics3":
        return transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessor(**sizes),
                                              tokenizer=tokenizer(padding_side), image_seq_len=seq)
    from transformers.models.smolvlm import processing_smolvlm

    with pytest.MonkeyPatch.context() as patch:  # num2words only spells video timestamps; not installed here
        if processing_smolvlm.num2words is None:
            patch.setattr(processing_smolvlm, "num2words", str)
        return transformers.SmolVLMProcessor(image_processor=transformers.SmolVLMImageProcessor(**sizes),
                                             tokenizer=tokenizer(padding_side), image_seq_len=seq,
                                             video_processor=transformers.SmolVLMVideoProcessor())


def inputs_of(family, split=True, padding_side="left"):
    """Row 0: image A (5:8, 2 x 2 tiles + global) and image B (2:5, 1 x 2 tiles + global); row 1: image C
    (5:2, 2 x 1 tiles + global) and two padding crops."""
    f = FAMILIES[family]
    proc = processor(family, split, padding_side)
    out = proc(text=["look <image> at <image>", "a <image> cat"], images=images_of(f["tile"]), return_tensors="pt",
               padding=True)
    return dict(out), proc


def images_of(tile):
    t = tile // 8
    return [[coordinate_image(10 * t, 16 * t), coordinate_image(4 * t, 10 * t)], [coordinate_image(10 * t, 4 * t)]]


def _real_units(inputs, side):
    crops = inputs["pixel_values"].flatten(0, 1).flatten(1).ne(0).any(-1)
    return [c * side * side + u for c in crops.nonzero().flatten().tolist() for u in range(side * side)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_are_the_patches_that_feed_them_and_tiles_are_put_back_where_they_came_from(family):
    f = FAMILIES[family]
    side, scale = f["tile"] // f["patch"], f["scale"]
    model = tiny(family)
    inputs, proc = inputs_of(family)
    assert inputs["pixel_values"].shape[:2] == (2, 8)
    tokens = image_token_map(model, inputs, processor=proc)
    per_crop = (side // scale) ** 2
    assert len(tokens) == (5 + 3 + 3) * per_crop
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_model,
                                    language_model=model.model.text_model, patch=f["patch"],
                                    units=_real_units(inputs, side))
    assert claimed_sources(tokens) == found
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "tiles", 2 * side, 2 * side), (0, "global", side, side), (1, "tiles", side, 2 * side),
        (1, "global", side, side), (2, "tiles", 2 * side, side), (2, "global", side, side)]
    assert bool((tokens.height == scale).all() and (tokens.width == scale).all())
    # the marker tokens are text: every image token is an <image> token
    assert bool((inputs["input_ids"][tokens.batch, tokens.position] == IMAGE_TOKEN).all())
    image_processor = proc.image_processor
    centres = centres_of_sources(tokens, inputs["pixel_values"], image_processor.image_mean,
                                 image_processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.03, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.03, rtol=0)
    # the same table from the image processor's rows / cols (return_row_col_info) instead of the markers
    counts = proc.image_processor(images=images_of(f["tile"]), return_row_col_info=True)
    assert (counts["rows"], counts["cols"]) == ([[2, 1], [2]], [[2, 2], [1]])
    by_counts = image_token_map(model, dict(inputs, rows=counts["rows"], cols=counts["cols"]))
    for name in ("batch", "position", "image", "view", "row", "col", "source"):
        assert torch.equal(getattr(by_counts, name), getattr(tokens, name)), name


def test_images_not_split_are_one_view_each():
    family = "idefics3"
    model = tiny(family)
    inputs, proc = inputs_of(family, split=False)
    assert inputs["pixel_values"].shape[:2] == (2, 2)
    tokens = image_token_map(model, inputs, processor=proc)
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [(i, "image", 4, 4) for i in range(3)]
    found = sources_by_perturbation(model, inputs, tower=model.model.vision_model,
                                    language_model=model.model.text_model, patch=8, units=_real_units(inputs, 4))
    assert claimed_sources(tokens) == found


def test_layouts_that_disagree_with_the_inputs_are_refused_by_name():
    assert set(("idefics3", "smolvlm")) <= set(image_token_families())
    model = tiny("idefics3")
    inputs, proc = inputs_of("idefics3")
    with pytest.raises(AttentionHookerError, match="needs its processor"):
        image_token_map(model, inputs)
    with pytest.raises(AttentionHookerError, match=r"batch row 0 has 8 crops .* 7 crops in its images' tile"):
        image_token_map(model, dict(inputs, rows=[[2, 1], [2]], cols=[[2, 1], [1]]))
    mask = inputs["pixel_attention_mask"].clone()
    mask[0, 1, -1] = 0
    with pytest.raises(AttentionHookerError, match="crop 1 of batch row 0 is partly padding"):
        image_token_map(model, dict(inputs, pixel_attention_mask=mask), processor=proc)
    with pytest.raises(AttentionHookerError, match="not a multiple of the 4"):
        image_token_map(model, dict(inputs, input_ids=inputs["input_ids"][:, :-2]), processor=proc)


LM_LAYERS = r"text_model\.layers\.\d+\.self_attn$"
TOWER_LAYERS = r"vision_model\.encoder\.layers\.\d+\.self_attn$"


def _layers(hooker, part):
    """The captured layers whose name holds ``part``, in layer order: [[call, ...], ...]."""
    names = sorted((n for n in hooker.values if part in n), key=lambda n: int(n.split(".")[-2]))
    return [hooker.values[n] for n in names]


def _assert_real_rows_close(got, want, mask):
    """Compares (B, H, Q, K) maps on the queries that are not padding (padded query rows mean nothing: eager
    spreads them, the sdpa kernel zeroes them)."""
    assert got.shape == want.shape, f"{tuple(got.shape)} != {tuple(want.shape)}"
    real = mask[:, -got.shape[2]:].bool()[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=1e-5)


def _eager_tower_weights(model, monkeypatch):
    """Records each (crops, H, S, S) map the vision tower's own eager attention function returns, per module."""
    import sys

    attention = model.model.vision_model.encoder.layers[0].self_attn
    modeling = sys.modules[type(attention).__module__]
    own = modeling.eager_attention_forward
    seen = {}

    def recording(module, *args, **kwargs):
        out, weights = own(module, *args, **kwargs)
        if type(module) is type(attention):
            seen.setdefault(module, []).append(weights.detach().clone())
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    return seen


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_language_model_capture_with_image_tokens_is_the_eager_attention(family, attn):
    model, eager = tiny(family, attn), tiny(family, "eager")
    inputs, proc = inputs_of(family)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        plain = model(**inputs).logits
        with TransformerAttentionHooker(model, layer_regex=LM_LAYERS) as hooker:
            hooked = model(**inputs).logits
    assert torch.equal(plain, hooked), "the capture changed the model's output"
    layers = _layers(hooker, "text_model")
    assert len(layers) == len(reference.attentions) == 2
    for (got,), expected in zip(layers, reference.attentions):
        _assert_real_rows_close(got, expected, mask)
    tokens = image_token_map(model, inputs, processor=proc)
    for b in range(2):
        row = tokens.in_row(b)
        got = image_attention(layers[1][0], tokens, batch=b, queries=[-1])
        expected = reference.attentions[1][b][:, -1:, row.position].double()  # (H, 1, n)
        torch.testing.assert_close(got.weights, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.share, expected.sum(-1), atol=1e-6, rtol=0)
        assert bool((got.share < 1 - 1e-3).all())  # nothing renormalised
        for view, grid in got.grids.items():  # each token's weight spread over its scale x scale cells
            v, scale = tokens.views[view], FAMILIES[family]["scale"]
            want = torch.zeros(2, 1, v.rows, v.cols, dtype=torch.float64)
            on = (row.view == view).nonzero().flatten().tolist()
            for i in on:
                r, c = int(row.row[i]), int(row.col[i])
                want[..., r:r + scale, c:c + scale] = expected[..., i, None, None] / scale ** 2
            torch.testing.assert_close(grid, want, atol=1e-6, rtol=0)
        assert sorted(got.grids) == sorted(set(row.view.tolist()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_on_sdpa_equals_the_eager_tower_and_steps(family, monkeypatch):
    sdpa, eager = tiny(family, "sdpa"), tiny(family, "eager")
    inputs, _ = inputs_of(family)
    kwargs = dict(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    tower = _eager_tower_weights(eager, monkeypatch)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(sdpa, layer_regex=f"{LM_LAYERS}|{TOWER_LAYERS}") as hooker:
            generated = sdpa.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    assert hooker.report().missing == []
    captured = _layers(hooker, "vision_model")
    assert len(captured) == len(tower) == 1
    for (got,), (expected,) in zip(captured, tower.values()):  # the tower runs once, on the 11 real crops
        assert got.shape == expected.shape == (11, 2) + (expected.shape[-1],) * 2
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    lm = _layers(hooker, "text_model")
    assert [len(calls) for calls in lm] == [3, 3]
    for step, expected_layers in enumerate(reference.attentions):
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1)
        for calls, expected in zip(lm, expected_layers):
            _assert_real_rows_close(calls[step], expected, mask)
