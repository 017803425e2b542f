"""Qwen2-VL and Qwen2.5-VL image and video tokens (issue 23, parts 1-4), checked against the model's own code
path, not against the reader:

- which ``pixel_values`` / ``pixel_values_videos`` rows feed which language-model position
  (``sources_by_perturbation``), with two images of different sizes in one row, a third image and a video;
- where those rows are in the image, read from a coordinate image through the real ``Qwen2VLProcessor`` (its
  image and video processors, and its expansion of the vision tokens): each token's box holds its rows' centre;
- the library's capture of the language model (sdpa and eager) against eager ``output_attentions``, in one
  forward and under ``generate()``, and of the vision tower against its own eager attention pieces;
- ``image_attention`` on that capture against the eager weights sliced at the reader's positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.capture.segments import qwen25_vision_positions  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
WORDS = ["look", "at", "a", "cat", "and"]
IMG, VID, START, END = 4, 5, 6, 7
KINDS = ["qwen2_vl", "qwen2_5_vl"]


def tiny_qwen(kind, attn="sdpa"):
    text = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(SPECIAL) + len(WORDS), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, vision_end_token_id=END)
    if kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            text_config=text, **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    else:  # windows of 2 x 2 merged cells (window_size 16 px, patch 4, merge 2), block 1 full attention
        config = transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                               fullatt_block_indexes=[1], out_hidden_size=32, in_channels=3),
            text_config=text, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    model.set_attn_implementation(attn)
    return model


def processor():
    """The real Qwen2VLProcessor (its image and video processors at small sizes, a word-level tokenizer that
    knows the vision tokens): it expands each image's and video's token to t * h * w / 4 of them."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL[4:])
    sizes = dict(size={"shortest_edge": 8 * 8, "longest_edge": 24 * 24}, patch_size=4, merge_size=2,
                 temporal_patch_size=2)
    return transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(**sizes, do_sample_frames=False,
                                                           cap_pixels_per_frame=False))


def qwen_inputs(video=True):
    """Row 0: image A (16 x 24 px: 4 x 6 patches, 6 tokens), then a 4-frame 8 x 8 video (2 steps of 2 x 2
    patches, 2 tokens); row 1: image B (30 x 14 px, resized to 32 x 16: 8 x 4 patches, 8 tokens) and image
    C (8 x 8 px: one token). Both rows 16 tokens long."""
    proc = processor()
    image, clip = ("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")
    frames = np.stack([np.asarray(coordinate_image(8, 8))] * 4)
    out = dict(proc(text=[f"look at {image} and {clip if video else 'a cat a cat'} cat",
                          f"a {image} and {image} cat"],
                    images=[coordinate_image(16, 24), coordinate_image(30, 14), coordinate_image(8, 8)],
                    videos=[frames] if video else None, return_tensors="pt", padding=True))
    assert out["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4], [1, 2, 2]]
    assert out["input_ids"].shape == (2, 16) and bool(out["attention_mask"].all())
    if video:
        assert out["video_grid_thw"].tolist() == [[2, 2, 2]]
    return out, proc.image_processor


@pytest.mark.parametrize("kind", KINDS)
def test_qwen_tokens_are_the_rows_that_feed_them_and_sit_where_their_pixels_are(kind):
    model = tiny_qwen(kind)
    inputs, processor = qwen_inputs()
    tokens = image_token_map(model, inputs)
    assert len(tokens) == 6 + 2 + 8 + 1
    image_rows = inputs["pixel_values"].shape[0]
    assert image_rows == 24 + 32 + 4
    oracle = dict(tower=model.model.visual, language_model=model.model.language_model, patch=0)
    found = sources_by_perturbation(model, inputs, **oracle)
    for key, units in sources_by_perturbation(model, inputs, field="pixel_values_videos", **oracle).items():
        assert key not in found
        found[key] = {image_rows + u for u in units}  # video rows come after the image rows (module doc)
    assert claimed_sources(tokens) == found
    if kind == "qwen2_5_vl":  # the tower's window order differs from the rows' order here: the merger undoes it
        windows = qwen25_vision_positions(model.model.visual, inputs["image_grid_thw"])
        assert not torch.equal(windows, torch.arange(image_rows))
    # images numbered in token order: A, the video, B, C; the video has one view per temporal step
    assert tokens.image.tolist() == [0] * 6 + [1] * 2 + [2] * 8 + [3]
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "image", 4, 6), (1, "frame 0", 2, 2), (1, "frame 1", 2, 2), (2, "image", 8, 4), (3, "image", 2, 2)]
    assert tokens.view.tolist()[6:8] == [1, 2]
    # merge-block order, not raster: image A's 2 x 3 blocks of 2 x 2 patches
    assert tokens.row.tolist()[:6] == [0, 0, 0, 2, 2, 2] and tokens.col.tolist()[:6] == [0, 2, 4, 0, 2, 4]
    pixels = torch.cat([inputs["pixel_values"], inputs["pixel_values_videos"]])
    centres = centres_of_sources(tokens, pixels, processor.image_mean, processor.image_std)
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.02, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.02, rtol=0)


def test_qwen_grids_that_disagree_with_the_tokens_are_refused_by_name():
    assert set(("qwen2_vl", "qwen2_5_vl")) <= set(image_token_families())
    config = tiny_qwen("qwen2_vl").config
    ids = torch.tensor([[1] + [IMG] * 5])
    with pytest.raises(AttentionHookerError, match=r"5 image tokens .* makes 6 \(6, t \* h \* w / 2\^2"):
        image_token_map(config, dict(input_ids=ids, image_grid_thw=torch.tensor([[1, 4, 6]])))
    with pytest.raises(AttentionHookerError, match="not a multiple of spatial_merge_size 2"):
        image_token_map(config, dict(input_ids=ids, image_grid_thw=torch.tensor([[1, 5, 4]])))
    with pytest.raises(AttentionHookerError, match="span two batch rows"):
        image_token_map(config, dict(input_ids=torch.tensor([[1, IMG, IMG], [IMG, IMG, 1]]),
                                     image_grid_thw=torch.tensor([[1, 4, 4]])))
    with pytest.raises(AttentionHookerError, match="makes 0"):
        image_token_map(config, dict(input_ids=ids))
    with pytest.raises(AttentionHookerError, match=r"must be \(media, 3\) whole numbers \(t, h, w\) > 0"):
        image_token_map(config, dict(input_ids=ids, image_grid_thw=torch.tensor([[1, 0, 4]])))


LM_LAYERS = r"language_model\.layers\.\d+\.self_attn$"
TOWER_LAYERS = r"visual\.blocks\.\d+\.attn$"


def _layers(hooker, part):
    """The captured layers whose name holds ``part``, in layer order: [[call, ...], ...]."""
    names = sorted((n for n in hooker.values if part in n), key=lambda n: int(n.split(".")[-2]))
    return [hooker.values[n] for n in names]


def _on_grid(weights, tokens, view):
    """(H, q, rows, cols): the weights (H, q, n) of a row's tokens spread evenly over the cells each covers,
    built here cell by cell."""
    v = tokens.views[view]
    grid = weights.new_zeros(*weights.shape[:2], v.rows, v.cols)
    for i in range(len(tokens)):
        if int(tokens.view[i]) == view:
            r, c, h, w = (int(t[i]) for t in (tokens.row, tokens.col, tokens.height, tokens.width))
            grid[..., r:r + h, c:c + w] += weights[..., i, None, None] / (h * w)
    return grid


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen_language_model_capture_with_image_tokens_is_the_eager_attention(kind, attn):
    model, eager = tiny_qwen(kind, attn), tiny_qwen(kind, "eager")
    inputs, _ = qwen_inputs()
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        plain = model(**inputs).logits
        with TransformerAttentionHooker(model, layer_regex=LM_LAYERS) as hooker:
            hooked = model(**inputs).logits
    assert torch.equal(plain, hooked), "the capture changed the model's output"
    layers = _layers(hooker, "language_model")
    assert len(layers) == len(reference.attentions) == 2
    for calls, expected in zip(layers, reference.attentions):
        (got,) = calls
        assert got.shape == expected.shape == (2, 2, 16, 16)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # text-to-image attention read on the capture = the eager weights at the reader's positions, on the grid
    tokens = image_token_map(model, inputs)
    for b in range(2):
        row = tokens.in_row(b)
        got = image_attention(layers[1][0], tokens, batch=b, queries=[-1, -2])
        expected = reference.attentions[1][b][:, [15, 14]][..., row.position].double()  # (H, 2, n)
        torch.testing.assert_close(got.weights, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.share, expected.sum(-1), atol=1e-6, rtol=0)
        assert bool((got.share < 1 - 1e-3).all())  # nothing renormalised
        assert sorted(got.grids) == sorted(set(row.view.tolist()))
        for view, grid in got.grids.items():
            torch.testing.assert_close(grid, _on_grid(expected, row, view), atol=1e-6, rtol=0)


def _eager_vision_pieces(model, monkeypatch):
    """Records every (1, H, n, n) weight map the vision tower's own eager attention function returns, per
    attention module, in call order: {module: [piece, ...]}."""
    import sys

    attention = model.model.visual.blocks[0].attn
    modeling = sys.modules[type(attention).__module__]
    own = modeling.eager_attention_forward
    pieces = {}

    def recording(module, *args, **kwargs):
        out, weights = own(module, *args, **kwargs)
        if type(module) is type(attention):
            pieces.setdefault(module, []).append(weights.detach().clone())
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    return pieces


@pytest.mark.parametrize("kind", KINDS)
def test_qwen_generate_on_sdpa_with_two_images_equals_the_eager_tower_pieces_and_steps(kind, monkeypatch):
    """A whole model, two images of different sizes in one batch row (and a third in the other): the tower's
    layers captured on sdpa are the block-diagonal assembly of the eager tower's per-image (per-window)
    maps, and each generated step's language-model capture is eager's step attention."""
    sdpa, eager = tiny_qwen(kind, "sdpa"), tiny_qwen(kind, "eager")
    inputs, _ = qwen_inputs(video=False)
    kwargs = dict(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    pieces = _eager_vision_pieces(eager, monkeypatch)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(sdpa, layer_regex=f"{LM_LAYERS}|{TOWER_LAYERS}") as hooker:
            generated = sdpa.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    assert hooker.report().missing == []
    tower = _layers(hooker, "visual")
    assert len(tower) == len(eager.model.visual.blocks)
    for calls, block in zip(tower, eager.model.visual.blocks):
        (got,) = calls  # the tower runs once, on the prompt
        own = pieces[block.attn]
        assert len(own) >= 3  # one piece per image at least (windows on Qwen2.5-VL's windowed block)
        expected = torch.stack([torch.block_diag(*(p[0, h] for p in own)) for h in range(2)])[None]
        assert got.shape == expected.shape == (1, 2, 60, 60)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(got == 0, expected == 0)
    # the last block attends over whole images (Qwen2.5-VL: its full-attention block): read in the rows'
    # order, its nonzero blocks are the images the reader gives those rows to
    rows = qwen25_vision_positions(sdpa.model.visual, inputs["image_grid_thw"]) if kind == "qwen2_5_vl" \
        else torch.arange(60)
    in_order = torch.zeros_like(tower[-1][0])
    in_order[:, :, rows[:, None], rows[None, :]] = tower[-1][0]
    tokens = image_token_map(sdpa, inputs)
    owner = torch.full((60,), -1)
    for i in range(len(tokens)):
        owner[tokens.source[i]] = tokens.image[i]
    assert bool((owner >= 0).all())
    assert torch.equal(in_order[0, 0] != 0, owner[:, None] == owner[None, :])
    lm = _layers(hooker, "language_model")
    assert [len(calls) for calls in lm] == [3, 3]
    for step, expected_layers in enumerate(reference.attentions):
        for calls, expected in zip(lm, expected_layers):
            assert calls[step].shape == expected.shape
            torch.testing.assert_close(calls[step], expected, atol=1e-6, rtol=1e-5)
