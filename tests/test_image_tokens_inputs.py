"""Ordinary variants of the inputs the image-token readers take (lists for tensors, per-row lists of sizes,
grids of the wrong shape, a decoding step's inputs, a whole processor for its image processor): read as
their tensor forms, or refused with an AttentionHookerError that says what was expected."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError  # noqa: E402
from attention_hooker.media import image_token_map  # noqa: E402
from attention_hooker.media.image_tokens import image_sizes_of  # noqa: E402
from test_image_tokens import IMAGE_TOKEN, tiny_llava  # noqa: E402
from test_image_tokens_mllama import mllama_inputs, tiny_mllama  # noqa: E402

STEP_HINT = "decoding step's inputs.*build the table from the prompt's input_ids"


def same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("batch", "position", "image", "view", "row", "col",
                                                                     "source")) and a.views == b.views


def test_image_sizes_are_read_from_tensors_flat_lists_and_per_row_lists_or_refused():
    expected = [(64, 48), (20, 40), (16, 40)]
    assert image_sizes_of(torch.tensor(expected), "x") == expected
    assert image_sizes_of([[64, 48], (20, 40), [16, 40]], "x") == expected
    assert image_sizes_of([[(64, 48), (20, 40)], [(16, 40)]], "x") == expected
    assert image_sizes_of([(5, 6)], "x", count=1) == [(5, 6)]
    for bad in (torch.tensor([[64, 48, 20]]), [[64, 0]], "64x48", [[1.5, "a"]]):
        with pytest.raises(AttentionHookerError, match="must be \\(height, width\\) pairs"):
            image_sizes_of(bad, "x")
    with pytest.raises(AttentionHookerError, match="gives 3 image size\\(s\\), but the inputs hold 2"):
        image_sizes_of(expected, "x", count=2)


def qwen_config():
    return transformers.Qwen2VLConfig(vision_config=dict(spatial_merge_size=2), image_token_id=60)


def test_qwen_grids_of_the_wrong_shape_or_empty_sides_are_refused_and_lists_are_read():
    config, ids = qwen_config(), torch.tensor([[1, 5] + [60] * 6 + [7]])
    table = image_token_map(config, dict(input_ids=ids, image_grid_thw=torch.tensor([[1, 4, 6]])))
    assert same(image_token_map(config, dict(input_ids=ids, image_grid_thw=[[1, 4, 6]])), table)
    for bad in (torch.tensor([[1, 4, 6, 1]]), torch.tensor([[1, 0, 4], [1, 4, 4]]), [[1.0, 4.0, 6.0]], "1x4x6"):
        with pytest.raises(AttentionHookerError, match="image_grid_thw' must be \\(media, 3\\) whole numbers"):
            image_token_map(config, dict(input_ids=ids, image_grid_thw=bad))


def test_mllama_takes_lists_per_row_sizes_and_a_whole_processor():
    config = tiny_mllama().config
    inputs, processor = mllama_inputs()
    table = image_token_map(config, inputs)
    assert table.keys == 2 * 4 * (1 + 2 * 2)  # image slots x max tiles x (class token + patches)
    listed = dict(inputs, aspect_ratio_ids=inputs["aspect_ratio_ids"].tolist(),
                  aspect_ratio_mask=inputs["aspect_ratio_mask"].tolist())
    assert same(image_token_map(config, listed), table)
    with_sizes = image_token_map(config, dict(inputs, image_sizes=[[(64, 48), (20, 40)], [(16, 40)]]))
    assert same(image_token_map(config, dict(inputs, image_sizes=torch.tensor([[64, 48], [20, 40], [16, 40]]))),
                with_sizes)
    with pytest.raises(AttentionHookerError, match="must be \\(height, width\\) pairs"):
        image_token_map(config, dict(inputs, image_sizes=torch.tensor([[64, 48, 20], [40, 16, 40]])))
    with pytest.raises(AttentionHookerError, match="aspect_ratio_ids' must be whole numbers"):
        image_token_map(config, dict(inputs, aspect_ratio_ids=[["a"]]))
    wrong_tiles = SimpleNamespace(image_processor=SimpleNamespace(size={"height": 32, "width": 32}))
    with pytest.raises(AttentionHookerError, match="cuts 32-pixel tiles"):
        image_token_map(config, inputs, processor=wrong_tiles)  # a whole processor: its image processor is read
    assert same(image_token_map(config, inputs, processor=SimpleNamespace(image_processor=processor)), table)


def test_a_decoding_step_s_inputs_are_refused_with_what_to_do_instead():
    step = torch.tensor([[7], [9]])
    with pytest.raises(AttentionHookerError, match=STEP_HINT):
        image_token_map(tiny_llava().config, dict(input_ids=step))
    with pytest.raises(AttentionHookerError, match=STEP_HINT):
        image_token_map(qwen_config(), dict(input_ids=step, image_grid_thw=torch.tensor([[1, 4, 6]])))
    blip2 = transformers.Blip2Config(
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2),
        qformer_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=16),
        text_config=dict(model_type="opt", hidden_size=16, ffn_dim=16, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64), num_query_tokens=4, image_token_index=IMAGE_TOKEN)
    with pytest.raises(AttentionHookerError, match=STEP_HINT):
        image_token_map(blip2, dict(input_ids=step, pixel_values=torch.zeros(2, 3, 16, 16)))
