"""Qwen3-VL and Qwen3-VL-MoE image and video tokens (issue 23, parts 1-4), checked against the model's own code
path, not against the reader:

- which ``pixel_values`` / ``pixel_values_videos`` rows feed which language-model position
  (``sources_by_perturbation``), with two images of different sizes in one row, a third image and a video whose
  two temporal steps the real ``Qwen3VLProcessor`` writes apart, each after its own timestamp text;
- where those rows are in the image, read from a coordinate image through that processor: each token's box holds
  its rows' centre;
- the library's capture of the language model (sdpa and eager) against eager ``output_attentions`` in one forward
  (deepstack features added in its first layers) and under ``generate()``;
- ``image_attention`` on that capture against the eager weights sliced at the reader's positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from attention_hooker import TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.media import image_token_families, image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
WORDS = ["look", "at", "a", "cat", "and"]
IMG, VID, START, END = 4, 5, 6, 7
KINDS = ["qwen3_vl", "qwen3_vl_moe"]
LM_LAYERS = r"language_model\.layers\.\d+\.self_attn$"


def tiny_qwen3(kind, attn="sdpa"):
    text = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, vocab_size=len(SPECIAL) + len(WORDS), bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True,
                                     rope_theta=10000.0))
    # deepstack from tower block 0: its merged features are added to language layer 0's output at image positions
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=[0], in_channels=3)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, vision_end_token_id=END)
    if kind == "qwen3_vl":
        config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        text.update(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
        config = transformers.Qwen3VLMoeConfig(vision_config=vision, text_config=text, **ids)
        cls = transformers.Qwen3VLMoeForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    model.set_attn_implementation(attn)
    return model


def processor():
    """The real Qwen3VLProcessor at small sizes, with a word-level tokenizer that knows the vision tokens (the
    timestamps it writes become unknown words)."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL[4:])
    sizes = dict(size={"shortest_edge": 8 * 8, "longest_edge": 24 * 24}, patch_size=4, merge_size=2,
                 temporal_patch_size=2)
    return transformers.Qwen3VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
        video_processor=transformers.Qwen3VLVideoProcessor(**sizes, do_sample_frames=False,
                                                           cap_pixels_per_frame=False))


def qwen3_inputs(video=True):
    """Row 0: image A (16 x 24 px: 4 x 6 patches, 6 tokens), then a 4-frame 8 x 8 video (2 steps of 2 x 2
    patches, one token each, each step after its timestamp); row 1: image B (30 x 14 px, resized to 32 x 16:
    8 x 4 patches, 8 tokens) and image C (8 x 8 px: one token)."""
    proc = processor()
    image, clip = "<|vision_start|><|image_pad|><|vision_end|>", "<|video_pad|>"
    frames = np.stack([np.asarray(coordinate_image(8, 8))] * 4)
    out = dict(proc(text=[f"look at {image} and {clip if video else 'a cat a cat'} cat",
                          f"a {image} and {image} cat"],
                    images=[coordinate_image(16, 24), coordinate_image(30, 14), coordinate_image(8, 8)],
                    videos=[frames] if video else None, return_tensors="pt", padding=True))
    out.pop("video_metadata", None)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4], [1, 2, 2]]
    if video:
        assert out["video_grid_thw"].tolist() == [[2, 2, 2]]
    return out, proc


@pytest.mark.parametrize("kind", KINDS)
def test_qwen3_tokens_are_the_rows_that_feed_them_and_sit_where_their_pixels_are(kind):
    assert kind in image_token_families()
    model = tiny_qwen3(kind)
    inputs, processor = qwen3_inputs()
    ids = inputs["input_ids"]
    video_positions = (ids[0] == VID).nonzero().flatten().tolist()
    assert len(video_positions) == 2 and video_positions[1] - video_positions[0] > 2  # timestamp text between
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
    assert tokens.image.tolist() == [0] * 6 + [1] * 2 + [2] * 8 + [3]
    assert tokens.position.tolist()[6:8] == video_positions
    assert [(v.image, v.name, v.rows, v.cols) for v in tokens.views] == [
        (0, "image", 4, 6), (1, "frame 0", 2, 2), (1, "frame 1", 2, 2), (2, "image", 8, 4), (3, "image", 2, 2)]
    assert tokens.view.tolist()[6:8] == [1, 2]
    # the video processor normalises with its own mean and std: each token read with its own processor's
    pixels = torch.cat([inputs["pixel_values"], inputs["pixel_values_videos"]])
    centres = centres_of_sources(tokens, pixels, processor.image_processor.image_mean,
                                 processor.image_processor.image_std)
    in_video = tokens.image == 1
    centres[in_video] = centres_of_sources(tokens, pixels, processor.video_processor.image_mean,
                                           processor.video_processor.image_std)[in_video]
    y, x = centres.T
    top, left, bottom, right = tokens.boxes().T
    assert bool(((top <= y) & (y <= bottom) & (left <= x) & (x <= right)).all())
    torch.testing.assert_close(y, (top + bottom) / 2, atol=0.02, rtol=0)
    torch.testing.assert_close(x, (left + right) / 2, atol=0.02, rtol=0)


def _layers(hooker):
    names = sorted((n for n in hooker.values if "language_model" in n), key=lambda n: int(n.split(".")[-2]))
    return [hooker.values[n] for n in names]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen3_language_model_capture_with_image_tokens_is_the_eager_attention(kind, attn):
    model, eager = tiny_qwen3(kind, attn), tiny_qwen3(kind, "eager")
    inputs, _ = qwen3_inputs()
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        plain = model(**inputs).logits
        with TransformerAttentionHooker(model, layer_regex=LM_LAYERS) as hooker:
            hooked = model(**inputs).logits
    assert torch.equal(plain, hooked), "the capture changed the model's output"
    layers = _layers(hooker)
    assert len(layers) == len(reference.attentions) == 2
    for calls, expected in zip(layers, reference.attentions):
        (got,) = calls
        assert got.shape == expected.shape == (2, 2, n, n)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    tokens = image_token_map(model, inputs)
    mask = inputs["attention_mask"]
    for b in range(2):
        row = tokens.in_row(b)
        last = int(mask[b].nonzero().max())  # right padding: the row's last real token
        got = image_attention(layers[1][0], tokens, batch=b, queries=[last])
        expected = reference.attentions[1][b][:, [last]][..., row.position].double()  # (H, 1, n)
        torch.testing.assert_close(got.weights, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.share, expected.sum(-1), atol=1e-6, rtol=0)
        assert bool((got.share < 1 - 1e-3).all())  # nothing renormalised
        for view, grid in got.grids.items():
            v = tokens.views[view]
            built = expected.new_zeros(2, 1, v.rows, v.cols)
            for i in range(len(row)):
                if int(row.view[i]) == view:
                    r, c = int(row.row[i]), int(row.col[i])
                    built[..., r:r + 2, c:c + 2] += expected[..., i, None, None] / 4
            torch.testing.assert_close(grid, built, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_qwen3_generate_on_sdpa_with_images_equals_the_eager_steps(kind):
    sdpa, eager = tiny_qwen3(kind, "sdpa"), tiny_qwen3(kind, "eager")
    inputs, _ = qwen3_inputs(video=False)
    kwargs = dict(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(sdpa, layer_regex=LM_LAYERS) as hooker:
            generated = sdpa.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    assert hooker.report().missing == []
    lm = _layers(hooker)
    assert [len(calls) for calls in lm] == [3, 3]
    for step, expected_layers in enumerate(reference.attentions):
        for calls, expected in zip(lm, expected_layers):
            assert calls[step].shape == expected.shape
            torch.testing.assert_close(calls[step], expected, atol=1e-6, rtol=1e-5)
