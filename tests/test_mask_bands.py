"""Tiles under an explicit mask that hides whole ranges of keys from every row of a tile (a sliding
window, chunked attention, left padding): only the keys the mask leaves to the tile are computed, and
the maps, statistics, pooled maps and streams equal the reference formula and the full maps (issue 22,
part 2: "causal and sliding-window tiles that are fully masked are never computed")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_hooker import HeadStatsAccumulator, KeyReductions, PooledAttention, TransformerAttentionHooker, load
from attention_hooker.capture.routes import sdpa
from attention_hooker.capture.routes.sdpa import sdpa_attention_weights
from attention_hooker.keep.allocator import ComputedBuffer, SpareBuffers, empty
from test_causal_tiles import _both_ways, _pooled_by_hand, _reference, _widths
from test_long_context import _CausalSdpaAttention

CPU = torch.device("cpu")


def _window(length: int, window: int, keys: int = None, batch: int = 1) -> torch.Tensor:
    """``(batch, 1, length, keys)`` bool: row ``i`` sees keys ``i - window + 1 .. i`` (a causal sliding window)."""
    keys = length if keys is None else keys
    rows, cols = torch.arange(length)[:, None], torch.arange(keys)[None, :]
    return ((cols <= rows) & (cols > rows - window)).expand(batch, 1, length, keys).clone()


def test_a_tile_under_a_sliding_window_computes_only_the_keys_its_rows_see(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    mask = _window(32, 6)
    widths = _widths(monkeypatch)
    got = sdpa_attention_weights(q, k, mask, store_as=(torch.float32, CPU), tile_bytes=4 * 2 * 32 * 4)  # 4 rows a tile
    # Tile 0 (rows 0-3) sees keys 0-3, tile 1 keys 0-7; every later tile its 4 rows and the 5 keys before them.
    assert widths == [4, 8] + [9] * 6, f"the whole row of 32 keys was computed for each tile: {widths}"
    torch.testing.assert_close(got.double(), _reference(q, k, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fill", [None, -math.inf, torch.finfo(torch.float32).min])
def test_an_explicit_causal_mask_stops_each_tile_at_its_last_rows_key_as_is_causal_does(fill, monkeypatch):
    torch.manual_seed(11)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    mask = _window(32, 32)  # causal: row i sees keys 0..i
    if fill is not None:  # float masks, as legacy code builds them (finfo.min) or -inf
        mask = torch.where(mask, 0.0, fill)
    widths = _widths(monkeypatch)
    got = sdpa_attention_weights(q, k, mask, store_as=(torch.float32, CPU), tile_bytes=4 * 2 * 32 * 4)
    assert widths == [4, 8, 12, 16, 20, 24, 28, 32]
    torch.testing.assert_close(got.double(), _reference(q, k, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["window", "window_causal", "float_window", "chunks", "batch_union", "gqa",
                                  "rows", "half", "empty_tile", "left_padding", "finfo_min", "finfo_min_uniform_row",
                                  "finfo_min_causal", "half_finfo_min", "nan_in_mask", "longer_keys"])
@pytest.mark.parametrize("fresh", [False, True])
def test_banded_tiles_equal_the_reference(case, fresh):
    torch.manual_seed(1)
    batch, heads, kv_heads, length, keys, window = 2, 4, 4, 40, 40, 7
    is_causal, rows, dtype = False, None, torch.float32
    if case == "gqa":
        kv_heads = 2
    if case == "longer_keys":
        keys = 56  # keys beyond the rows: the window still bounds each tile
    mask = _window(length, window, keys, batch)
    if case == "window_causal":
        is_causal = True
        mask = _window(length, window, keys, batch)
    if case == "float_window":
        mask = torch.where(mask, 0.0, -math.inf) + torch.randn(batch, 1, length, keys).clamp(-1, 1)
    if case == "chunks":  # chunked attention: rows see their own chunk of 8 only
        chunk = torch.arange(length) // 8
        mask = (chunk[:, None] == chunk[None, :]).expand(batch, 1, length, keys).clone()
    if case == "batch_union":  # item 1's window is wider: a tile computes the keys either item sees
        mask[1] = _window(length, 15, keys)[0]
    if case == "rows":
        rows = [33, 2, 19, 18, 39, 0]
    if case == "half":
        dtype = torch.float16
    if case == "empty_tile":
        mask[:, :, 8:16] = False  # a whole tile of rows with every key masked: zeros
    if case == "left_padding":  # (batch, 1, 1, keys): the first 10 keys are padding in every item
        mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
        mask[..., :10] = False
    if case == "finfo_min":  # finfo.min masks as legacy code builds them: their keys weigh exactly 0, skipped
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    if case == "finfo_min_uniform_row":  # a row with every key at finfo.min is uniform over all of them
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        mask[:, :, 9] = torch.finfo(torch.float32).min
    if case == "finfo_min_causal":  # is_causal leaves some rows only finfo.min keys: uniform over keys 0..i
        is_causal = True
        mask = torch.where(torch.arange(keys)[None, :] > torch.arange(length)[:, None], 0.0,
                           torch.finfo(torch.float32).min).expand(batch, 1, length, keys).clone()
    if case == "half_finfo_min":  # a float16 model's mask, at float16's lowest
        dtype = torch.float16
        mask = torch.where(mask, 0.0, torch.finfo(torch.float16).min).half()
    if case == "nan_in_mask":  # a NaN in the mask makes its whole row NaN (not weights), as the formula does
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        mask[:, :, 20, 3] = float("nan")
    q = torch.randn(batch, heads, length, 8, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, 8, dtype=dtype)
    shape = (batch, heads, length if rows is None else len(rows), keys)
    buffer = None  # fresh zero pages: the keys outside the bands are never written
    if not fresh:  # a reused tensor full of NaN: they must be zeroed
        spares = SpareBuffers()
        spares.offer([torch.full(shape, float("nan"), dtype=dtype)])
        buffer = ComputedBuffer(spares, empty)
    got = sdpa_attention_weights(q, k, mask, is_causal=is_causal, rows=rows, buffer=buffer, store_as=(dtype, CPU),
                                 tile_bytes=1 if case != "half" else 8 * heads * keys * 4 * batch)
    want = _reference(q.float(), k.float(), mask, is_causal=is_causal, rows=rows)
    if case == "nan_in_mask":
        assert torch.isnan(got[:, :, 20]).all(), "a NaN in the mask left some of its row looking like weights"
        assert not torch.isnan(got[:, :, :20]).any()
        got, want = got[:, :, :20], want[:, :, :20]
    assert not torch.isnan(got).any(), "keys outside a tile's band were left as the reused buffer held them"
    torch.testing.assert_close(got.double(), want, atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=0)


def test_float16_masks_near_their_lowest_are_scores_not_masks():
    # (the review: -32752 and -32736 are half of float16's lowest and just above; they differ by 16, a
    # difference of scores any row may hold: neither weighs 0)
    q, k = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
    mask = torch.tensor([[-32752.0, -32736.0], [-32752.0, -32736.0]], dtype=torch.float16)[None, None]
    got = sdpa_attention_weights(q, k, mask, store_as=(torch.float32, CPU), tile_bytes=1)
    torch.testing.assert_close(got.double(), _reference(q, k, mask), atol=1e-6, rtol=0)
    standard = torch.tensor([[torch.finfo(torch.float16).min, 0.0, 0.0]] * 2, dtype=torch.float16)[None, None]
    q, k = torch.ones(1, 1, 2, 1) * 300, torch.tensor([0.0, -300.0, -300.0]).view(1, 1, 3, 1)  # scores 0, -90000
    got = sdpa_attention_weights(q.half(), k.half(), standard, store_as=(torch.float32, CPU), tile_bytes=1)
    torch.testing.assert_close(got.double(), _reference(q, k, standard), atol=1e-6, rtol=0)
    assert got[0, 0, 0, 0] == 1.0, "a float16 finfo.min key was skipped while it carried the row's weight"


@pytest.mark.parametrize("how", ["store", "sink"])
def test_a_call_without_query_rows_under_a_mask_of_keys_is_empty(how):
    q, k = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 5, 4)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    mask[..., :2] = False
    tiles = []
    got = sdpa_attention_weights(q, k, mask, store_as=(torch.float32, CPU) if how == "store" else None,
                                 tile_sink=(lambda *a: tiles.append(a)) if how == "sink" else None, tile_bytes=1)
    assert tiles == [] and (got is None if how == "sink" else got.shape == (1, 2, 0, 5))


def test_the_bands_are_read_once_per_tile_from_the_mask_and_left_alone_where_nothing_is_skipped():
    mask = _window(12, 3)
    assert sdpa._key_bands(mask, [0, 4, 8], 4, 12) == [(0, 4), (2, 8), (6, 12)]
    assert sdpa._key_bands(torch.ones(1, 1, 12, 12, dtype=torch.bool), [0, 4, 8], 4, 12) is None
    float_mask = torch.where(mask, 0.0, -math.inf)
    assert sdpa._key_bands(float_mask, [0, 4, 8], 4, 12) == [(0, 4), (2, 8), (6, 12)]
    legacy = torch.where(mask, 0.0, torch.finfo(torch.float32).min)  # finfo.min for masked keys
    assert sdpa._key_bands(legacy, [0, 4, 8], 4, 12) == [(0, 4), (2, 8), (6, 12)]
    legacy[..., 5, :] = torch.finfo(torch.float32).min  # row 5: every key at finfo.min, uniform: tile 1 whole
    assert sdpa._key_bands(legacy, [0, 4, 8], 4, 12) == [(0, 4), (0, 12), (6, 12)]
    none_seen = mask.clone()
    none_seen[:, :, 4:8] = False
    assert sdpa._key_bands(none_seen, [0, 4, 8], 4, 12)[1] == (0, 0)
    padding = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    padding[0, ..., :3] = False
    padding[1, ..., :5] = False
    assert sdpa._key_bands(padding, [0, 4, 8], 4, 12) == [(3, 12)] * 3, "the keys masked in every item"


class _WindowedAttention(_CausalSdpaAttention):
    """One sdpa layer under a causal sliding window given as an explicit bool mask (as Hugging Face's
    sliding-window layers pass theirs)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, x, mask=None):
        return super().forward(x, _window(x.shape[1], self.window, batch=x.shape[0]))


def _windowed_both_ways(seed: int, reducer_of, monkeypatch, window: int = 5, length: int = 40):
    """``(full map, reducer, widths)``: a windowed layer captured whole, then reduced one row per tile."""
    torch.manual_seed(seed)
    values, reducer, widths = _both_ways(_WindowedAttention(window).eval(), torch.randn(2, length, 16), reducer_of,
                                         monkeypatch)
    return values[""][0], reducer, widths


def test_statistics_under_a_sliding_window_take_banded_tiles_and_equal_those_of_the_full_maps(monkeypatch):
    full, stats, widths = _windowed_both_ways(7, lambda: HeadStatsAccumulator(sink_positions=[0, -1]), monkeypatch)
    stats.add_input(2)
    assert max(widths) == 5, f"a row's tile computed more than its window of 5 keys: {sorted(set(widths))}"
    expected = HeadStatsAccumulator(sink_positions=[0, -1])
    expected.update({"": [full]})
    want, got = expected.result(), stats.result()
    for key in expected.STATISTICS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("size,how", [(8, "mean"), (7, "max")])
def test_pooled_maps_under_a_sliding_window_equal_the_pooled_full_maps(size, how, monkeypatch):
    full, pooled, widths = _windowed_both_ways(8, lambda: PooledAttention(size=size, how=how), monkeypatch)
    assert max(widths) == 5
    torch.testing.assert_close(pooled.values[""][0], _pooled_by_hand(full, size, how), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shard_bytes", [1, None])
def test_a_stream_of_tiles_whose_rows_see_no_key_writes_their_zeros(tmp_path, monkeypatch, shard_bytes):
    # (the review: a band of no key reached the stream as a (B, H, r, 0) block, and a call with a file of
    # its own failed with a TypeError on turning it into bytes)
    torch.manual_seed(13)
    model = _WindowedAttention(4).eval()

    def forward(x, mask=None):
        window = _window(x.shape[1], 4, batch=x.shape[0])
        window[:, :, 5:9] = False  # rows 5-8 see no key
        return _CausalSdpaAttention.forward(model, x, window)

    model.forward = forward
    x = torch.randn(2, 16, 16)
    with torch.no_grad(), TransformerAttentionHooker(model) as full:
        model(x)
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, \
            hooker.stream_to(tmp_path / "cap", **({"shard_bytes": shard_bytes} if shard_bytes else {})):
        model(x)
    streamed = load(tmp_path / "cap").values[""][0]
    torch.testing.assert_close(streamed, full.values[""][0], atol=1e-6, rtol=0)
    assert not streamed[:, :, 5:9].any()


@pytest.mark.parametrize("beside", [None, "pooled", "stats", "keys"])
def test_a_stream_under_a_sliding_window_writes_only_each_rows_window(tmp_path, monkeypatch, beside):
    from attention_hooker.keep import stream_call

    torch.manual_seed(9)
    model = _WindowedAttention(6).eval()
    x = torch.randn(2, 30, 16)
    with torch.no_grad(), TransformerAttentionHooker(model) as full:
        model(x)
    widths = _widths(monkeypatch)
    written, pwrite = [], stream_call.os.pwrite
    monkeypatch.setattr(stream_call.os, "pwrite", lambda fd, data, offset: written.append(len(data)) or
                        pwrite(fd, data, offset))
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)
    reducer = {None: None, "pooled": PooledAttention(size=7), "stats": HeadStatsAccumulator(sink_positions=[0, 9]),
               "keys": KeyReductions(top=2)}[beside]
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, \
            hooker.stream_to(tmp_path / "cap", shard_bytes=1):  # the call gets a file of its own
        if reducer is not None:  # as `attention-hooker run --stream` pools beside its stream
            hooker.reduce_into(reducer)
        model(x)
    assert max(widths) == 6
    torch.testing.assert_close(load(tmp_path / "cap").values[""][0], full.values[""][0], atol=1e-6, rtol=0)
    window_bytes = 2 * 4 * sum(min(6, row + 1) for row in range(30)) * 4  # items x heads x keys seen x float32
    if beside == "keys":  # key reductions take whole rows: every tile laid out, zeros and all
        torch.testing.assert_close(reducer.received[""][0], full.values[""][0].sum(2), atol=1e-5, rtol=0)
        assert sum(written) == 2 * 4 * 30 * 30 * 4
        return
    if beside == "stats":  # statistics take bands
        reducer.add_input(2)
        expected = HeadStatsAccumulator(sink_positions=[0, 9])
        expected.update(full.values)
        for key in expected.STATISTICS:
            np.testing.assert_allclose(reducer.result()[key], expected.result()[key], rtol=1e-5, atol=1e-6,
                                       err_msg=key)
    if beside == "pooled":  # pooled maps take bands
        torch.testing.assert_close(reducer.values[""][0], _pooled_by_hand(full.values[""][0], 7, "mean"),
                                   atol=1e-6, rtol=0)
    assert sum(written) == window_bytes, "the stream wrote zeros outside the rows' windows"


def test_a_large_map_under_a_sliding_window_is_stored_from_its_bands(monkeypatch):
    torch.manual_seed(10)
    model = _WindowedAttention(4).eval()
    x = torch.randn(1, 48, 16)
    with torch.no_grad(), TransformerAttentionHooker(model) as again:  # the map computed whole
        model(2 * x)
    monkeypatch.setattr(sdpa, "WHOLE_BYTES", 1)  # every map counts as large: tiles straight into place
    monkeypatch.setattr(sdpa, "TILE_BYTES", 8 * 4 * 48 * 4)  # 8 rows a tile
    widths = _widths(monkeypatch)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(x)
        hooker.clear()  # the next call reuses this one's tensor: keys outside the bands must be zeroed again
        model(2 * x)
    assert widths == [8] + [11] * 5 + [8] + [11] * 5
    torch.testing.assert_close(hooker.values[""][0], again.values[""][0], atol=1e-6, rtol=0)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_banded_tiles_equal_the_reference_on_random_masks(data):
    length = data.draw(st.integers(1, 24))
    keys = data.draw(st.integers(1, 24))
    batch = data.draw(st.integers(1, 2))
    lo = data.draw(st.lists(st.integers(0, keys), min_size=length, max_size=length))
    span = data.draw(st.lists(st.integers(0, keys), min_size=length, max_size=length))
    is_causal = data.draw(st.booleans())
    as_float = data.draw(st.sampled_from([None, -math.inf, torch.finfo(torch.float32).min]))
    tile_rows = data.draw(st.integers(1, 8))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    cols = torch.arange(keys)[None, :]
    start, end = torch.tensor(lo)[:, None], torch.tensor(lo)[:, None] + torch.tensor(span)[:, None]
    mask = ((cols >= start) & (cols < end)).expand(batch, 1, length, keys).clone()  # each row: one band of keys
    if as_float is not None:  # -inf, or finfo.min (a row of only those is uniform, not zeros)
        mask = torch.where(mask, 0.0, as_float)
    q, k = torch.randn(batch, 2, length, 4), torch.randn(batch, 2, keys, 4)
    got = sdpa_attention_weights(q, k, mask, is_causal=is_causal, store_as=(torch.float32, CPU),
                                 tile_bytes=tile_rows * batch * 2 * keys * 4)
    torch.testing.assert_close(got.double(), _reference(q, k, mask, is_causal=is_causal), atol=1e-6, rtol=0)


@pytest.mark.parametrize("narrow,bands,log", [(True, True, False), (True, True, True), (True, False, True),
                                              (False, False, False)])
def test_a_sink_gets_each_band_as_it_says_it_takes_them(narrow, bands, log):
    torch.manual_seed(12)
    q, k = torch.randn(2, 2, 24, 4), torch.randn(2, 2, 24, 4)
    mask = _window(24, 5, batch=2)
    rebuilt, logs = torch.zeros(2, 2, 24, 24), torch.zeros(2, 2, 24, 24)
    got_first_keys = []

    class Sink:
        def begin(self, shape):
            return sdpa.TileNeeds(narrow=narrow, log_probabilities=log, bands=bands)

        def __call__(self, tile, rows, shape, log_tile=None, first_key=0):
            got_first_keys.append(first_key)
            if not narrow:
                assert tile.shape[3] == 24, "a sink that takes whole rows got a narrow tile"
            if not bands:
                assert first_key == 0
            rebuilt[:, :, rows, first_key:first_key + tile.shape[3]] = tile
            if log_tile is not None:
                logs[:, :, rows, first_key:first_key + tile.shape[3]] = log_tile

    sdpa_attention_weights(q, k, mask, tile_sink=Sink(), tile_bytes=3 * 2 * 2 * 24 * 4)  # 3 rows a tile
    want = _reference(q, k, mask)
    torch.testing.assert_close(rebuilt.double(), want, atol=1e-6, rtol=0)
    assert (max(got_first_keys) > 0) == bands, "bands were handed to a sink that takes none, or none to one that does"
    if log:
        assert (logs[want == 0] == 0).all()
        torch.testing.assert_close(logs[want > 0].double().exp(), want[want > 0], atol=1e-6, rtol=0)


def _sliding_models():
    """Hugging Face decoders whose sdpa layers get explicit sliding-window or chunked masks (tiny)."""
    import transformers

    sizes = dict(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0)
    return {
        "mistral": (transformers.MistralConfig, dict(sizes, sliding_window=5)),
        "qwen2": (transformers.Qwen2Config, dict(sizes, use_sliding_window=True, sliding_window=5, max_window_layers=0,
                                                 layer_types=["sliding_attention", "full_attention"])),
        "gemma3": (transformers.Gemma3TextConfig, dict(sizes, head_dim=8, sliding_window=5,
                                                       layer_types=["sliding_attention", "full_attention"])),
        "llama4_chunked": (transformers.Llama4TextConfig, dict(sizes, head_dim=8, attention_chunk_size=6,
                                                               no_rope_layers=[1, 1], num_local_experts=1,
                                                               intermediate_size_mlp=32, use_qk_norm=False)),
    }


@pytest.mark.parametrize("family", sorted(_sliding_models()))
def test_hugging_face_sliding_and_chunked_layers_through_band_tiles_equal_eager(family, monkeypatch):
    """Oracle: the eager model's output_attentions, with left padding; the sdpa capture forced into
    tiles of 3 rows, so that the bands of the real masks decide what each tile computes."""
    import transformers

    config_class, kwargs = _sliding_models()[family]
    config = config_class(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, 100, (2, 19))
    attention = torch.ones(2, 19, dtype=torch.long)
    attention[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(sdpa, "WHOLE_BYTES", 1)  # every map computed in tiles straight into place
    monkeypatch.setattr(sdpa, "TILE_BYTES", 3 * 2 * 4 * 19 * 4)  # 3 rows of (2 items, 4 heads, 19 keys)
    widths = _widths(monkeypatch)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(input_ids=ids, attention_mask=attention)
    assert len(hooker.values) == len(expected) == 2
    for (got,), want in zip(hooker.values.values(), expected):
        # The padding's own query rows see no key: eager spreads them evenly over finfo.min scores, the
        # sdpa route gives zeros (as before tiles had bands); every real row must be equal.
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[1, :, 4:], want[1, :, 4:], atol=1e-6, rtol=0)
    assert min(widths) < 19, f"no tile of a sliding or chunked layer skipped a key: {sorted(set(widths))}"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pooled_blocks_of_a_band_equal_those_of_its_row_laid_out_whole(data):
    from attention_hooker.keep.pooling import _pooled_keys

    n_key = data.draw(st.integers(1, 40))
    p_key = data.draw(st.sampled_from(sorted({d for d in range(1, n_key + 1) if n_key % d == 0} | {min(7, n_key)})))
    lo = data.draw(st.integers(0, n_key))
    width = data.draw(st.integers(0, n_key - lo))
    mean = data.draw(st.booleans())
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    band = torch.rand(2, 3, 4, width)
    whole = torch.zeros(2, 3, 4, n_key)
    whole[..., lo:lo + width] = band
    got = _pooled_keys(band, n_key, p_key, mean, lo)
    want = _pooled_keys(whole, n_key, p_key, mean)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # sums in another order: float32 rounding


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_row_statistics_of_a_band_equal_those_of_its_rows_laid_out_whole(data):
    from attention_hooker.analysis.row_statistics import block_row_statistics

    n_key = data.draw(st.integers(1, 30))
    rows = data.draw(st.lists(st.integers(0, n_key - 1), min_size=1, max_size=5, unique=True))
    lo = data.draw(st.integers(0, n_key))
    width = data.draw(st.integers(0, n_key - lo))
    sinks = data.draw(st.lists(st.integers(0, n_key - 1), max_size=3, unique=True)) or None
    last = torch.tensor([data.draw(st.integers(0, n_key - 1)) for _ in range(2)])
    with_last = data.draw(st.booleans())
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    whole = torch.zeros(2, 3, len(rows), n_key, dtype=torch.float64)
    if width:
        whole[..., lo:lo + width] = torch.softmax(torch.randn(2, 3, len(rows), width, dtype=torch.float64), -1)
    band = whole[..., lo:lo + width]
    rows_t = torch.tensor(rows)
    kwargs = dict(sinks=sinks, last=last if with_last else None)
    got = block_row_statistics(band, rows_t, n_key, n_key, log_a=band.log().nan_to_num(0.0, neginf=0.0),
                               first_key=lo, **kwargs)
    want = block_row_statistics(whole, rows_t, n_key, n_key, **kwargs)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)



@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_a_non_finite_key_a_mask_hides_makes_its_rows_nan_as_in_the_kernel(bad, kind):
    # The kernels add a mask to the scores (a bool one as 0 / -inf): q.k + (-inf) is NaN when q.k is
    # infinite or NaN, so every row is NaN in the kernel's output; neither the whole call nor its key
    # bands may turn that key into a clean 0 (masked_fill_ of -inf, or skipping the key, did).
    torch.manual_seed(0)
    q, k, v = torch.ones(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    k[0, 0, 0] = bad  # every row's score at key 0 is not finite; rows 2.. do not see key 0
    window = _window(8, 2)
    mask = window if kind == "bool" else torch.zeros(1, 1, 8, 8).masked_fill(~window, -math.inf)
    kernel_nan = torch.isnan(torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)).any(-1)
    assert kernel_nan.all()
    whole = sdpa_attention_weights(q, k, mask)
    tiled = sdpa_attention_weights(q, k, mask, store_as=(torch.float32, CPU), tile_bytes=2 * 8 * 4)
    assert torch.equal(torch.isnan(whole).any(-1), kernel_nan)
    assert torch.equal(torch.isnan(tiled).any(-1), kernel_nan)


def test_finite_inputs_whose_score_overflows_at_a_hidden_key_are_computed_whole():
    # q and k finite, q.k infinite at a key the mask hides from every row of a tile: the kernel's
    # rows are NaN (inf + -inf), so that key must not be skipped as a band would (found by review).
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    q[..., 0], k[0, 0, 0, 0] = 4.0, 3e38  # every value (and each one's sum) finite, 4 * 3e38 / 2 is not
    float_mask = torch.zeros(1, 1, 8, 8).masked_fill(~_window(8, 2), -math.inf)
    kernel_nan = torch.isnan(torch.nn.functional.scaled_dot_product_attention(q, k, v, float_mask)).any(-1)
    tiled = sdpa_attention_weights(q, k, float_mask, store_as=(torch.float32, CPU), tile_bytes=2 * 8 * 4)
    assert kernel_nan.all() and torch.equal(torch.isnan(tiled).any(-1), kernel_nan)
