"""Qwen2-VL and Qwen2.5-VL vision towers: the per-image, per-frame or per-window attention calls of each
layer call assembled block-diagonally into one (1, heads, S, S) map (capture/pieces.py, capture/segments.py),
checked against

- a hand computation from each layer's own weights: q and k from its ``qkv``, the vision rotary embedding
  applied by this file's own formula, one softmax per segment, segments read from ``grid_thw`` by this
  file (Qwen2-VL: one per frame) or from the ``cu_seqlens`` the block hands the layer (Qwen2.5-VL windows);
- invariants: the model's outputs unchanged by the capture, exact zeros between segments, rows summing to 1,
  and the map times ``v`` equal to the input of the layer's ``proj``;
- for Qwen2.5-VL, the map read in input order (``qwen25_vision_positions``) attends only within the same
  image and the same window of the merged grid, built here from ``grid_thw`` alone.

transformers' ``output_attentions`` is no oracle here: it records the vision attention module's output
``(S, C)``, not attention.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionCaptureWarning, TransformerAttentionHooker  # noqa: E402
from attention_hooker.capture.segments import qwen25_vision_positions  # noqa: E402

from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel  # noqa: E402
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel  # noqa: E402

# Qwen2-VL: two images of different sizes (16 and 8 patches) and a 2-frame video (8 patches a frame).
GRID_2 = torch.tensor([[1, 4, 4], [1, 2, 4], [2, 2, 4]])
# Qwen2.5-VL: two images; windows of 2 x 2 merged cells (window_size 8, patch 2, merge 2), edge windows smaller.
GRID_25 = torch.tensor([[1, 8, 12], [1, 4, 6]])
PATCH_FEATURES = 3 * 2 * 2 * 2  # in_channels x temporal_patch_size x patch_size x patch_size


def _qwen2(attn):
    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                                 spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config._attn_implementation = attn
    return Qwen2VisionTransformerPretrainedModel(config).eval()


def _qwen25(attn):
    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                                    spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                                    fullatt_block_indexes=[1], out_hidden_size=32, in_channels=3)
    config._attn_implementation = attn
    return Qwen2_5_VisionTransformerPretrainedModel(config).eval()


def _patches(grid):
    torch.manual_seed(1)
    return torch.randn(int(grid.prod(-1).sum()), PATCH_FEATURES)


def _attention_layers(model):
    return [(f"blocks.{i}.attn", block.attn) for i, block in enumerate(model.blocks)]


def _calls(model, x, grid):
    """Each attention layer's call, run without the library: (hidden (S, C), cu_seqlens, (cos, sin),
    input of its proj (S, C)), and the tower's output."""
    seen, handles = {}, []
    for name, attn in _attention_layers(model):
        def pre(m, args, kwargs, name=name):
            seen[name] = [args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"]]
        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.proj.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0])))
    try:
        with torch.no_grad():
            out = model(x, grid_thw=grid)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _frames(grid):
    """Segment lengths of a Qwen2-VL tower from grid_thw alone: one per frame, h * w patches."""
    return [int(h * w) for t, h, w in grid.tolist() for _ in range(int(t))]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hand(attn, hidden, cos, sin, lengths):
    """The layer's map from its own weights: (1, H, S, S), a softmax per segment, zeros elsewhere; v (1, H, S, d)."""
    s, h = hidden.shape[0], attn.num_heads
    with torch.no_grad():
        q, k, v = attn.qkv(hidden).reshape(s, 3, h, -1).unbind(1)  # (S, H, d) each
        cos, sin = cos[:, None, :].float(), sin[:, None, :].float()
        q = q.float() * cos + _rotate_half(q.float()) * sin
        k = k.float() * cos + _rotate_half(k.float()) * sin
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (H, S, d)
        dense = torch.zeros(1, h, s, s)
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            scores = q[:, part] @ k[:, part].transpose(-1, -2) * attn.head_dim ** -0.5
            dense[0, :, part, part] = scores.softmax(-1)
            start += n
        assert start == s
    return dense, v[None]


def _capture(model, x, grid, **options):
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"^blocks\.\d+\.attn$", **options) as hooker:
        out = model(x, grid_thw=grid)
    return hooker, out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_vl_images_and_video_frames_are_placed_block_diagonally(attn):
    model, x = _qwen2(attn), _patches(GRID_2)
    calls, plain = _calls(model, x, GRID_2)
    hooker, hooked = _capture(model, x, GRID_2)
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state), "the capture changed the model's output"
    assert torch.equal(plain.pooler_output, hooked.pooler_output)
    assert hooker.report().missing == []
    lengths = _frames(GRID_2)
    assert lengths == [16, 8, 8, 8]
    for name, attn_module in _attention_layers(model):
        hidden, cu_seqlens, (cos, sin), proj_in = calls[name]
        assert cu_seqlens.tolist() == [0, 16, 24, 32, 40]  # the model's segments are this file's frames
        (got,) = hooker.values[name]
        hand, v = _hand(attn_module, hidden, cos, sin, lengths)
        assert got.shape == (1, 2, 40, 40) and got.dtype == torch.float32
        torch.testing.assert_close(got, hand, atol=1e-6, rtol=1e-5)
        assert torch.equal(got == 0, hand == 0), "exact zeros between segments, nowhere else"
        torch.testing.assert_close(got.sum(-1), torch.ones(1, 2, 40))
        context = (got[0] @ v[0]).transpose(0, 1).reshape(40, -1)  # (S, H * d): what proj multiplies
        torch.testing.assert_close(context, proj_in, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen25_vl_windowed_and_full_blocks_equal_the_hand_computation_in_window_order(attn):
    model, x = _qwen25(attn), _patches(GRID_25)
    calls, plain = _calls(model, x, GRID_25)
    hooker, hooked = _capture(model, x, GRID_25)
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state)
    assert hooker.report().missing == []
    s = x.shape[0]
    windowed, full = calls["blocks.0.attn"][1], calls["blocks.1.attn"][1]
    assert len(windowed) - 1 == 8 and full.tolist() == [0, 96, 120]  # 6 + 2 windows; 2 images
    for name, attn_module in _attention_layers(model):
        hidden, cu_seqlens, (cos, sin), proj_in = calls[name]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        (got,) = hooker.values[name]
        hand, v = _hand(attn_module, hidden, cos, sin, lengths)
        torch.testing.assert_close(got, hand, atol=1e-6, rtol=1e-5)
        assert torch.equal(got == 0, hand == 0)
        context = (got[0] @ v[0]).transpose(0, 1).reshape(s, -1)
        torch.testing.assert_close(context, proj_in, atol=1e-6, rtol=1e-5)


def _same_image_and_window(grid, merge=2, window_cells=2):
    """(S, S) bool in input (processor) order: same image and same window of the merged grid. The
    processor's patches come merge cell by merge cell (row-major cells, merge x merge patches each)."""
    owner = []
    for image, (t, h, w) in enumerate(grid.tolist()):
        for frame in range(t):
            for row in range(h // merge):
                for col in range(w // merge):
                    owner += [(image, frame, row // window_cells, col // window_cells)] * (merge * merge)
    return torch.tensor([[a == b for b in owner] for a in owner])


def test_qwen25_vl_positions_read_the_windowed_map_in_input_order():
    model, x = _qwen25("eager"), _patches(GRID_25)
    hooker, _ = _capture(model, x, GRID_25)
    positions = qwen25_vision_positions(model, GRID_25)
    assert sorted(positions.tolist()) == list(range(x.shape[0]))
    (got,) = hooker.values["blocks.0.attn"]
    in_order = torch.zeros_like(got)
    in_order[:, :, positions[:, None], positions[None, :]] = got
    assert torch.equal(in_order[0, 0] != 0, _same_image_and_window(GRID_25))
    # and the full-attention block: same image only
    (full,) = hooker.values["blocks.1.attn"]
    in_order[:, :, positions[:, None], positions[None, :]] = full
    same_image = torch.block_diag(torch.ones(96, 96), torch.ones(24, 24)).bool()
    assert torch.equal(in_order[0, 0] != 0, same_image)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("selection", [dict(rows="last"), dict(heads=[1]), dict(rows=[0, 17, 39], keys=[3, 20, 16]),
                                       dict(rows=[20, 5], heads=[1, 0])])
def test_selections_are_slices_of_the_whole_map(attn, selection):
    model, x = _qwen2(attn), _patches(GRID_2)
    whole, _ = _capture(model, x, GRID_2)
    picked, _ = _capture(model, x, GRID_2, **selection)
    rows = [39] if selection.get("rows") == "last" else selection.get("rows")
    for name, (full,) in whole.values.items():
        want = full
        for dim, index in ((1, selection.get("heads")), (2, rows), (3, selection.get("keys"))):
            if index is not None:
                want = want.index_select(dim, torch.tensor(index))
        got = picked.values[name][0]
        # eager: the very numbers; sdpa: the selected rows' scores are made by a smaller product (last-bit rounding)
        if attn == "eager":
            assert torch.equal(got, want), name
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
        assert torch.equal(got == 0, want == 0), name


def test_a_row_costs_its_segment_only(monkeypatch):
    """rows="last" with sdpa: the weights computed are the last row of the last segment's call only."""
    from attention_hooker.capture import segments

    asked = []
    real = segments.sdpa_attention_weights
    monkeypatch.setattr(segments, "sdpa_attention_weights",
                        lambda *a, **k: asked.append(real(*a, **k).shape) or real(*a, **k))
    model, x = _qwen2("sdpa"), _patches(GRID_2)
    hooker, _ = _capture(model, x, GRID_2, rows="last")
    assert asked == [(1, 2, 1, 8)] * 2
    assert all(v[0].shape == (1, 2, 1, 40) for v in hooker.values.values())


def test_keep_values_keeps_v_of_the_layer():
    model, x = _qwen2("eager"), _patches(GRID_2)
    calls, _ = _calls(model, x, GRID_2)
    hooker, _ = _capture(model, x, GRID_2, keep_values=True)
    for name, attn_module in _attention_layers(model):
        hidden, _, (cos, sin), proj_in = calls[name]
        _, v = _hand(attn_module, hidden, cos, sin, _frames(GRID_2))
        torch.testing.assert_close(hooker.value_vectors[name][0], v)


def test_a_call_that_is_not_one_of_the_segments_refuses_the_layer():
    """An extra softmax inside the layer call (not one of its cu_seqlens segments): the whole call is
    refused with the reason, never stored with pieces missing or misplaced."""
    model, x = _qwen2("eager"), _patches(GRID_2)
    attn = model.blocks[0].attn
    real = attn.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        torch.softmax(torch.randn(1, 2, 5, 5), -1)
        return out

    attn.forward = forward
    try:
        with pytest.warns(AttentionCaptureWarning, match="cu_seqlens"):
            hooker, _ = _capture(model, x, GRID_2)
    finally:
        del attn.forward
    assert hooker.report().missing == ["blocks.0.attn"]
    assert "(1, 2, 5, 5)" in hooker.report()["blocks.0.attn"].reason
    assert set(hooker.values) == {"blocks.1.attn"}


def test_segments_that_do_not_add_up_to_the_sequence_are_refused():
    """The rule reads cu_seqlens at the call: a call whose segments do not cover its tokens is refused."""
    from attention_hooker.capture.segments import segmented_vision_layer

    attn = _qwen2("eager").blocks[0].attn
    rule = segmented_vision_layer(attn)
    hidden = torch.randn(40, 32)
    refusal = rule.start(attn, (hidden,), dict(cu_seqlens=torch.tensor([0, 16, 30])))
    assert isinstance(refusal, str) and "do not add up" in refusal and "[0, 16, 30]" in refusal
    call = rule.start(attn, (hidden,), dict(cu_seqlens=torch.tensor([0, 16, 40])))
    assert call.take_softmax(torch.softmax(torch.randn(1, 2, 16, 16), -1)) is None
    assert "segment 1" in call.take_softmax(torch.softmax(torch.randn(1, 2, 16, 16), -1))
    assert "missing" in call.assemble(False)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_streamed_tiles_equal_the_capture_in_memory(attn, tmp_path, monkeypatch):
    """Streaming takes the map a tile of rows at a time (7 rows: tiles that cross segment boundaries)."""
    from attention_hooker import load
    from attention_hooker.capture import session

    model, x = _qwen2(attn), _patches(GRID_2)
    memory, _ = _capture(model, x, GRID_2)
    monkeypatch.setattr(session, "ROWS_PER_TILE", 7)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"^blocks\.\d+\.attn$") as hooker:
        with hooker.stream_to(tmp_path / "capture"):
            model(x, grid_thw=GRID_2)
    loaded = load(tmp_path / "capture")
    for name, (want,) in memory.values.items():
        torch.testing.assert_close(loaded.values[name][0], want, atol=1e-7, rtol=1e-6)
        assert torch.equal(loaded.values[name][0] == 0, want == 0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_whole_qwen2_vl_model_is_hooked_by_default_with_its_vision_tower_assembled(attn):
    """Default discovery on Qwen2VLForConditionalGeneration with two images (16 and 32 patches): the tower's
    layers and the language model's are all captured, the logits unchanged, the tower's maps block-diagonal."""
    torch.manual_seed(0)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2]))
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=150,
                                        video_token_id=151, vision_start_token_id=152, bos_token_id=1, eos_token_id=2)
    model = transformers.Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    ids = torch.tensor([[5, 152] + [150] * 4 + [6, 152] + [150] * 8 + [7, 8]])  # 16 / 4 and 32 / 4 merged tokens
    inputs = dict(input_ids=ids, pixel_values=torch.randn(48, PATCH_FEATURES),
                  image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 8]]), mm_token_type_ids=(ids == 150).int())
    with torch.no_grad():
        plain = model(**inputs).logits
        with TransformerAttentionHooker(model) as hooker:
            hooked = model(**inputs).logits
    assert torch.equal(plain, hooked)
    assert hooker.report().missing == [] and len(hooker.report()) == 4
    same_image = torch.block_diag(torch.ones(16, 16), torch.ones(32, 32)).bool()
    for block in (0, 1):
        (got,) = hooker.values[f"model.visual.blocks.{block}.attn"]
        assert got.shape == (1, 2, 48, 48) and torch.equal(got[0, 0] != 0, same_image)
    assert hooker.values["model.language_model.layers.0.self_attn"][0].shape == (1, 4, 18, 18)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_calls_past_max_calls_start_hold_and_place_nothing(attn, monkeypatch):
    """max_calls=1 over three forwards: the family reads (start) and is handed (take) the first call's segments
    only; the later calls' softmaxes or sdpa calls are dropped as they come, never held until the call returns."""
    from attention_hooker.capture import segments

    started, taken = [], []
    start, take_softmax, take_sdpa = (segments.SegmentedVisionLayer.start, segments._SegmentsCall.take_softmax,
                                      segments._SegmentsCall.take_sdpa)
    monkeypatch.setattr(segments.SegmentedVisionLayer, "start", lambda *a: started.append(1) or start(*a))
    monkeypatch.setattr(segments._SegmentsCall, "take_softmax", lambda *a: taken.append(1) or take_softmax(*a))
    monkeypatch.setattr(segments._SegmentsCall, "take_sdpa", lambda *a: taken.append(1) or take_sdpa(*a))
    model, x = _qwen2(attn), _patches(GRID_2)
    with torch.no_grad():
        plain = model(x, grid_thw=GRID_2).last_hidden_state
        with TransformerAttentionHooker(model, layer_regex=r"^blocks\.\d+\.attn$", max_calls=1) as hooker:
            outs = [model(x, grid_thw=GRID_2).last_hidden_state for _ in range(3)]
    assert all(torch.equal(out, plain) for out in outs)
    assert len(started) == 2 and len(taken) == 2 * 4, (len(started), len(taken))  # 2 layers, 4 segments, 1 call
    assert all(len(maps) == 1 for maps in hooker.values.values()) and len(hooker.values) == 2
    assert hooker.report().missing == []


def test_placing_a_tile_visits_only_the_segments_its_rows_live_in(monkeypatch):
    from attention_hooker.capture.segments import place_segment_rows

    lengths = [2] * 500
    segments = [torch.full((1, 1, 2, 2), 0.5) for _ in lengths]
    looked = []
    nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: looked.append(1) or nonzero(self, *a, **k))
    out = place_segment_rows(segments, lengths, torch.tensor([6, 7, 8]))
    monkeypatch.undo()
    assert len(looked) == 2, len(looked)  # rows 6, 7 in segment 3; row 8 in segment 4: not 500 looks
    want = torch.zeros(1, 1, 3, 1000)
    want[0, 0, :2, 6:8], want[0, 0, 2, 8:10] = 0.5, 0.5
    assert torch.equal(out, want)


def test_no_row_asked_of_segments_made_by_functions_keeps_the_layers_heads():
    """With sdpa segments (functions) and no row asked, the empty result has the layer's heads, not zero."""
    from attention_hooker.capture.segments import place_segment_rows

    make = [lambda heads, local: torch.zeros(1, 2 if heads is None else len(heads), len(local), 3)]
    assert place_segment_rows(make, [3], torch.zeros(0, dtype=torch.long), all_heads=2).shape == (1, 2, 0, 3)
    assert place_segment_rows(make, [3], torch.zeros(0, dtype=torch.long), heads=[1]).shape == (1, 1, 0, 3)
    with pytest.raises(ValueError, match="how many heads"):
        place_segment_rows(make, [3], torch.zeros(0, dtype=torch.long))
