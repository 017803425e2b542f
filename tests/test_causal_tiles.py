"""Tiles of a causal call: the keys after a tile's last row are never computed, large CPU maps are
computed in cache-sized tiles straight into their place, and the reductions take narrow tiles
(and each tile's log) -- all equal to the reference formula and to the full maps (issue 22)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_hooker import HeadStatsAccumulator, PooledAttention, TransformerAttentionHooker
from attention_hooker.analysis.row_statistics import block_row_statistics
from attention_hooker.capture.routes import sdpa
from attention_hooker.capture.routes.sdpa import CAUSAL_BLOCKS_FROM, sdpa_attention_weights
from attention_hooker.keep.allocator import ComputedBuffer, SpareBuffers, empty, zero_pages
from test_long_context import _CausalSdpaAttention as _CausalAttention  # one causal sdpa layer, grouped kv heads


def _reference(q, k, mask=None, is_causal=False, rows=None):
    """``softmax(q k^T / sqrt(d) + bias)`` by hand, float64, kv heads repeated; fully masked rows 0."""
    q, k = q.double(), k.double()
    if k.shape[1] < q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights if rows is None else weights[:, :, rows]


def _widths(monkeypatch) -> list:
    """The keys of every ``q k^T`` the sdpa route takes from now on."""
    seen, original = [], sdpa._scaled_scores

    def spy(q, k, *args):
        seen.append(k.shape[2])
        return original(q, k, *args)

    monkeypatch.setattr(sdpa, "_scaled_scores", spy)
    return seen


def test_a_causal_tile_never_computes_the_keys_after_its_last_row(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    widths = _widths(monkeypatch)
    got = sdpa_attention_weights(q, k, is_causal=True, store_as=(torch.float32, torch.device("cpu")),
                                 tile_bytes=4 * 2 * 32 * 4)  # 4 rows of (1 item, 2 heads, 32 keys) float32
    assert widths == [4, 8, 12, 16, 20, 24, 28, 32]
    torch.testing.assert_close(got.double(), _reference(q, k, is_causal=True), atol=1e-6, rtol=0)


def test_a_large_cpu_map_is_computed_in_tiles_straight_into_fresh_zero_pages(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(sdpa, "WHOLE_BYTES", 1)  # every map counts as large
    q, k = torch.randn(1, 2, 48, 8), torch.randn(1, 2, 48, 8)
    widths = _widths(monkeypatch)
    monkeypatch.setattr(sdpa, "TILE_BYTES", 8 * 2 * 48 * 4)  # 8 rows per tile
    got = sdpa_attention_weights(q, k, is_causal=True)
    assert widths == [8, 16, 24, 32, 40, 48], "one whole-map product instead of tiles"
    torch.testing.assert_close(got.double(), _reference(q, k, is_causal=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("length", [384, 385, 387, 400, 449])
@pytest.mark.parametrize("case", ["causal", "gqa_batch", "rows", "half", "longer_keys", "garbage_buffer"])
def test_a_causal_cpu_map_kept_whole_is_computed_in_blocks_of_rows_that_stop_at_their_last_key(case, length,
                                                                                                monkeypatch):
    """From CAUSAL_BLOCKS_FROM rows on, a causal map below WHOLE_BYTES (one product of every row with
    every key before) is computed in even blocks of at most 64 rows, each only up to its last row's key,
    and equals the whole computation bitwise (no block so short that the BLAS takes another kernel)."""
    torch.manual_seed(3)
    batch, heads, kv_heads, keys, rows, dtype = 1, 2, 2, length, None, torch.float32
    if case == "gqa_batch":
        batch, heads, kv_heads = 2, 4, 2
    if case == "rows":
        rows = [r for r in range(2 * length) if r % 7][: CAUSAL_BLOCKS_FROM + length % 7]  # 384-390 rows
        length = max(rows) + 1
        keys = length
    if case == "longer_keys":
        keys = length + 50  # top-left aligned: row i sees keys 0..i
    if case == "half":
        dtype = torch.float16
    q = torch.randn(batch, heads, length, 64).to(dtype)
    k = torch.randn(batch, kv_heads, keys, 64).to(dtype)
    shape = (batch, heads, length if rows is None else len(rows), keys)
    buffer = None
    if case == "garbage_buffer":
        garbage = SpareBuffers()
        garbage.offer([torch.full(shape, float("nan"))])
        buffer = ComputedBuffer(garbage, empty)
    assert batch * heads * shape[2] * keys * 4 <= sdpa.WHOLE_BYTES
    widths = _widths(monkeypatch)
    got = sdpa_attention_weights(q, k, is_causal=True, rows=rows, buffer=buffer)
    computed = list(range(length)) if rows is None else rows
    per_block = -(-len(computed) // -(-len(computed) // 64))
    assert per_block >= 48
    assert widths == [max(computed[first:first + per_block]) + 1 for first in range(0, len(computed), per_block)], (
        "not one product per block, each up to its last row's key")
    assert buffer is None or not torch.isnan(got).any(), "the hidden keys of a reused tensor were not zeroed"
    monkeypatch.setattr(sdpa, "CAUSAL_BLOCKS_FROM", 10**9)  # the whole computation, as before
    whole = sdpa_attention_weights(q, k, is_causal=True, rows=rows)
    assert widths[-1] == keys and got.dtype == whole.dtype == dtype
    assert torch.equal(got, whole)
    want = _reference(q.float(), k.float(), is_causal=True, rows=rows)
    torch.testing.assert_close(got.double(), want, atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=0)


@pytest.mark.parametrize("path", ["blocks", "large_tiles"])
@pytest.mark.parametrize("where", ["query", "key_seen", "key_hidden", "inf_query"])
def test_a_row_with_a_nan_score_is_nan_at_every_key_in_tiles_as_in_the_whole_map(path, where, monkeypatch):
    """A NaN (or infinite) score makes its row NaN at every key of the formula's softmax, also at the keys
    the causal mask hides: tiles that stop at their last row's key gave zeros there. A NaN key hidden
    from a row leaves that row alone (the kernels never read it)."""
    torch.manual_seed(6)
    q, k = torch.randn(1, 2, 400, 16), torch.randn(1, 2, 400, 16)
    if where == "query":
        q[0, 1, 100, 3] = float("nan")
    elif where == "inf_query":
        q[0, 0, 70, 0] = float("inf")
    elif where == "key_seen":
        k[0, 0, 5, 2] = float("nan")  # seen by every row from 5 on
    else:
        k[0, 1, 399, 2] = float("nan")  # hidden from every row but the last
    if path == "large_tiles":
        monkeypatch.setattr(sdpa, "WHOLE_BYTES", 1)
        monkeypatch.setattr(sdpa, "TILE_BYTES", 40 * 2 * 400 * 4)  # 40 rows per tile
    got = sdpa_attention_weights(q, k, is_causal=True)
    monkeypatch.setattr(sdpa, "WHOLE_BYTES", 10**12)
    monkeypatch.setattr(sdpa, "CAUSAL_BLOCKS_FROM", 10**9)  # the whole map, one product
    whole = sdpa_attention_weights(q, k, is_causal=True)
    assert torch.isnan(whole).any()
    assert torch.equal(torch.isnan(got), torch.isnan(whole)), "NaN at other places than in the whole map"
    assert torch.equal(got.nan_to_num(7.0), whole.nan_to_num(7.0))
    if where == "key_hidden":
        assert not torch.isnan(got[0, 1, :399]).any() and torch.isnan(got[0, 1, 399]).all()


def test_short_uncausal_or_float64_maps_stay_one_product(monkeypatch):
    torch.manual_seed(4)
    widths = _widths(monkeypatch)
    sdpa_attention_weights(torch.randn(1, 2, 383, 8), torch.randn(1, 2, 383, 8), is_causal=True)
    sdpa_attention_weights(torch.randn(1, 2, 400, 8), torch.randn(1, 2, 400, 8))
    sdpa_attention_weights(torch.randn(1, 2, 401, 8).double(), torch.randn(1, 2, 401, 8).double(), is_causal=True)
    assert widths == [383, 400, 401]


def test_a_hooked_causal_layer_equals_its_oracle_through_the_blocks(monkeypatch):
    torch.manual_seed(5)
    model = _CausalAttention().eval()
    x = torch.randn(1, 450, 16)
    widths = _widths(monkeypatch)
    with torch.no_grad():
        plain = model(x)
        with TransformerAttentionHooker(model) as hooker:
            out = model(x)
    assert torch.equal(out, plain)
    assert widths[:2] == [57, 114]  # 450 rows in 8 blocks of 57 (the last 51)
    ((got,),) = hooker.values.values()  # one layer, one call
    e = 16 // model.num_heads  # the layer's own projections, by hand
    q = model.q(x).view(1, 450, model.num_heads, e).transpose(1, 2)
    k = model.kv(x).view(1, 450, 2, model.kv_heads, e)[:, :, 0].transpose(1, 2)
    torch.testing.assert_close(got.double(), _reference(q, k, is_causal=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["causal", "causal_rows", "causal_gqa_batch", "causal_bool_mask",
                                  "causal_float_mask", "longer_keys", "half_query", "empty_rows"])
def test_weights_in_tiles_equal_the_reference_on_a_buffer_full_of_garbage(case):
    torch.manual_seed(1)
    batch, heads, kv_heads, length, keys = 1, 2, 2, 24, 24
    mask, rows, dtype, store = None, None, torch.float32, torch.float32
    if case == "causal_gqa_batch":
        batch, heads, kv_heads = 2, 4, 2
    if case == "longer_keys":
        keys = 40  # top-left aligned: row i sees keys 0..i
    q = torch.randn(batch, heads, length, 8)
    k = torch.randn(batch, kv_heads, keys, 8)
    if case == "causal_rows":
        rows = [17, 3, 9, 23]
    if case in ("causal_bool_mask", "empty_rows"):
        mask = torch.rand(batch, 1, length, keys) > 0.3
        if case == "empty_rows":
            mask[:, :, 5] = False  # a row with every key masked: zeros
    if case == "causal_float_mask":
        mask = torch.where(torch.rand(batch, 1, length, keys) > 0.3, 0.0, -math.inf)
        mask[..., 0] = 0.0
    if case == "half_query":
        dtype, store = torch.float16, torch.float16
        q, k = q.half(), k.half()
    garbage = SpareBuffers()
    shape = (batch, heads, length if rows is None else len(rows), keys)
    garbage.offer([torch.full(shape, float("nan"), dtype=store)])
    buffer = ComputedBuffer(garbage, empty)
    got = sdpa_attention_weights(q, k, mask, is_causal=True, rows=rows, buffer=buffer, store_as=(store, q.device),
                                 tile_bytes=1)
    assert not buffer.zeroed and not torch.isnan(got).any(), "the masked keys of a reused tensor were not zeroed"
    want = _reference(q.float(), k.float(), mask, is_causal=True, rows=rows)
    torch.testing.assert_close(got.double(), want, atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=0)


def test_fresh_buffers_say_they_are_zero_and_reused_ones_do_not(monkeypatch):
    from attention_hooker.keep import allocator

    monkeypatch.setattr(allocator, "PAGED_BYTES", 1)
    spares = SpareBuffers()
    buffer = ComputedBuffer(spares, empty)
    fresh = buffer((2, 3), torch.float32, "cpu")
    assert buffer.zeroed and torch.equal(fresh, torch.zeros(2, 3))
    spares.offer([torch.ones(2, 3)])
    reused = buffer((2, 3), torch.float32, "cpu")
    assert not buffer.zeroed and torch.equal(reused, torch.ones(2, 3))
    page = zero_pages((4, 5), torch.float16)
    assert page.dtype == torch.float16 and torch.equal(page, torch.zeros(4, 5, dtype=torch.float16))


def _both_ways(model, x, reducer_of, monkeypatch, padding_mask=None):
    with torch.no_grad(), TransformerAttentionHooker(model) as full:
        model(x)
    widths = _widths(monkeypatch)
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)  # one query row per tile
    reducer = reducer_of()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(reducer, padding_mask=padding_mask)
        model(x)
    return full.values, reducer, widths


@pytest.mark.parametrize("padded", [False, True])
def test_statistics_from_narrow_tiles_and_their_logs_equal_those_of_the_full_maps(padded, monkeypatch):
    import numpy as np

    torch.manual_seed(2)
    model = _CausalAttention().eval()
    x = torch.randn(2, 40, 16)
    padding = None
    if padded:
        padding = torch.ones(2, 40, dtype=torch.long)
        padding[1, 31:] = 0
    values, reduced, widths = _both_ways(
        model, x, lambda: HeadStatsAccumulator(sink_positions=[0, 5, -1]), monkeypatch, padding)
    reduced.add_input(2)
    assert widths == list(range(1, 41)), "each row's tile stops at its own key"
    expected = HeadStatsAccumulator(sink_positions=[0, 5, -1])
    expected.update(values, padding_mask=padding)
    want, got = expected.result(), reduced.result()
    for key in expected.STATISTICS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("size,how", [(8, "mean"), (8, "max"), (7, "mean"), (7, "max"), (64, "max")])
def test_pooled_maps_from_narrow_tiles_equal_the_pooled_full_maps(size, how, monkeypatch):
    torch.manual_seed(3)
    model = _CausalAttention().eval()
    x = torch.randn(1, 40, 16)
    values, pooled, widths = _both_ways(model, x, lambda: PooledAttention(size=size, how=how), monkeypatch)
    assert widths == list(range(1, 41))
    expected = _pooled_by_hand(values[""][0], min(size, 40), how)  # of (1, 4, 40, 40)
    torch.testing.assert_close(pooled.values[""][0], expected, atol=1e-6, rtol=0)


def _pooled_by_hand(full: torch.Tensor, blocks: int, how: str) -> torch.Tensor:
    """``(batch, heads, blocks, blocks)``: the mean or max of each block of ``full``'s square maps, cell by cell."""
    batch, heads, n = full.shape[:3]
    index = torch.arange(n) * blocks // n
    expected = torch.zeros(batch, heads, blocks, blocks)
    for i in range(blocks):
        for j in range(blocks):
            cell = full[:, :, index == i][:, :, :, index == j]
            expected[:, :, i, j] = cell.mean((-1, -2)) if how == "mean" else cell.amax((-1, -2))
    return expected


def _causal_call_tiled_by_rows(seed: int, monkeypatch):
    """``(model, x, full, widths)``: a causal layer, its input of 24 tokens, a full capture of it,
    and the key widths of every product from now on, one query row per tile."""
    torch.manual_seed(seed)
    model = _CausalAttention().eval()
    x = torch.randn(1, 24, 16)
    with torch.no_grad(), TransformerAttentionHooker(model) as full:
        model(x)
    widths = _widths(monkeypatch)
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)
    return model, x, full, widths


def test_a_stream_beside_statistics_writes_narrow_tiles_whose_zeros_it_never_writes(tmp_path, monkeypatch):
    import numpy as np

    from attention_hooker import load

    model, x, full, widths = _causal_call_tiled_by_rows(4, monkeypatch)
    stats = HeadStatsAccumulator()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, \
            hooker.stream_to(tmp_path / "cap", shard_bytes=1):  # the call gets a file of its own
        hooker.reduce_into(stats)
        model(x)
    stats.add_input(1)
    assert widths == list(range(1, 25)), "the stream and the statistics both take narrow tiles"
    torch.testing.assert_close(load(tmp_path / "cap").values[""][0], full.values[""][0], atol=1e-6, rtol=0)
    expected = HeadStatsAccumulator()
    expected.update(full.values)
    np.testing.assert_allclose(stats.result()["entropy"], expected.result()["entropy"], rtol=1e-5)


def test_a_keeper_that_takes_whole_rows_beside_a_narrow_one_gets_whole_tiles(tmp_path, monkeypatch):
    from attention_hooker import KeyReductions, load

    model, x, full, widths = _causal_call_tiled_by_rows(5, monkeypatch)
    keys = KeyReductions(top=2)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, \
            hooker.stream_to(tmp_path / "cap", shard_bytes=1):
        hooker.reduce_into(keys)
        model(x)
    assert set(widths) == {24}
    torch.testing.assert_close(keys.received[""][0], full.values[""][0].sum(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(load(tmp_path / "cap").values[""][0], full.values[""][0], atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_block_row_statistics_equal_their_definitions(data):
    n_key = data.draw(st.integers(2, 30))
    n_rows = data.draw(st.integers(1, 6))
    rows = data.draw(st.lists(st.integers(0, n_key - 1), min_size=1, max_size=n_rows, unique=True))
    n_rows = len(rows)
    width = data.draw(st.integers(max(rows) + 1, n_key))
    seed = data.draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    full = torch.zeros(2, 3, n_rows, n_key, dtype=torch.float64)
    full[..., :width] = torch.softmax(torch.randn(2, 3, n_rows, width, dtype=torch.float64), -1)
    block = full[..., :width]
    rows_t = torch.tensor(rows)
    last = torch.tensor([n_key - 1, data.draw(st.integers(0, n_key - 1))])
    got = block_row_statistics(block, rows_t, n_key, n_key, log_a=block.log(), sinks=[0, n_key - 1], last=last)
    distance = (full * (rows_t[:, None] - torch.arange(n_key)[None, :]).abs()).sum(-1)
    torch.testing.assert_close(got["distance"], distance)
    torch.testing.assert_close(got["entropy"], torch.special.entr(full).sum(-1))
    torch.testing.assert_close(got["sink_share"], full[..., 0] + full[..., -1])
    torch.testing.assert_close(got["last_token_share"], full[torch.arange(2), :, :, last])
    torch.testing.assert_close(got["first_token_share"], full[..., 0])


def test_large_stored_tensors_on_fresh_pages_are_plain_private_tensors_reused_after_clear():
    import os

    from attention_hooker.keep.allocator import unreachable_tensors

    stored = {"layer": [zero_pages((256, 1024), torch.float32)]}  # held by the store alone
    assert len(unreachable_tensors(stored)) == 1, "a tensor on fresh pages must be reusable as a spare"
    page = stored["layer"][0]
    assert page._base is None and page.is_contiguous() and page.shape == (256, 1024)
    pid = os.fork()
    if pid == 0:  # the child writes; a private mapping keeps it from the parent's tensor
        page[0, 0] = 42.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert float(page[0, 0]) == 0.0, "a write in a forked child reached the parent's tensor (a shared mapping)"


def _tiles_with_logs(q, k, mask=None, **kwargs) -> list:
    """``[(rows, tile, log_tile)]`` of a causal call handed to a sink that takes narrow tiles and their logs."""
    tiles = []

    class Sink:
        def begin(self, shape):
            return sdpa.TileNeeds(narrow=True, log_probabilities=True)

        def __call__(self, tile, rows, shape, log_tile):
            tiles.append((rows.clone(), tile.clone(), log_tile.clone()))

    sdpa_attention_weights(q, k, mask, is_causal=True, tile_sink=Sink(), **kwargs)
    return tiles


def test_the_log_handed_beside_a_tile_is_zero_wherever_its_weight_is_zero_under_a_float_mask():
    torch.manual_seed(6)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 2] = -math.inf
    mask[..., 4] = torch.finfo(torch.float32).min
    for _, tile, log_tile in _tiles_with_logs(q, k, mask, tile_bytes=1):
        assert torch.isfinite(log_tile).all()
        assert (log_tile[tile == 0] == 0).all()
        torch.testing.assert_close(log_tile[tile > 0].exp(), tile[tile > 0])


def _called(fn) -> set:
    """The torch functions ``fn()`` calls (a function mode sees each one)."""
    from torch.overrides import TorchFunctionMode

    seen = set()

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen


@pytest.mark.parametrize("tiled", [False, True])
def test_the_causal_mask_is_set_by_a_triangle_not_by_a_broadcast_boolean_fill(tiled):
    # masked_fill_ with a broadcast (rows, keys) boolean cost 40-60% of the product itself on the
    # CPU (issue 22: the default capture next to the plain forward); tril_ and a -inf bias cost ~10%.
    torch.manual_seed(7)
    q, k = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    kwargs = {"store_as": (torch.float32, torch.device("cpu")), "tile_bytes": 4 * 6 * 16 * 4} if tiled else {}
    seen = _called(lambda: sdpa_attention_weights(q, k, is_causal=True, **kwargs))
    assert "masked_fill_" not in seen
    assert "tril_" in seen


@pytest.mark.parametrize("path", ["whole", "tiles", "tiles_with_logs", "rows"])
def test_keys_hidden_by_the_causal_mask_count_for_nothing_even_when_not_finite(path):
    # The kernel never reads a key after a row's position: a NaN or infinite score there must not
    # reach the row (an added -inf bias alone would turn +inf or NaN into NaN).
    torch.manual_seed(8)
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    k[0, 0, 9] = float("nan")
    k[0, 1, 5] = float("inf")
    expected = torch.zeros(1, 2, 12, 12, dtype=torch.float64)
    finite = _reference(q, k, is_causal=True)
    expected[0, 0, :9] = finite[0, 0, :9]  # rows before the NaN key never see it
    expected[0, 1, :5] = finite[0, 1, :5]
    if path == "whole":
        got = sdpa_attention_weights(q, k, is_causal=True)
    elif path == "rows":
        got = sdpa_attention_weights(q, k, is_causal=True, rows=[1, 3, 4, 8])
        expected = expected[:, :, [1, 3, 4, 8]]
    elif path == "tiles":
        got = sdpa_attention_weights(q, k, is_causal=True, store_as=(torch.float32, torch.device("cpu")),
                                     tile_bytes=3 * 2 * 12 * 4)
    else:
        got = torch.zeros(1, 2, 12, 12)
        for rows, tile, log_tile in _tiles_with_logs(q, k, tile_bytes=3 * 2 * 12 * 4):
            got[:, :, rows, :tile.shape[-1]] = tile
            seen, finite_rows = tile > 0, torch.isfinite(tile).all(-1, keepdim=True)  # rows that saw a NaN: NaN
            assert (log_tile[~seen & finite_rows] == 0).all()  # 0 after each row's position, whatever the key held
            torch.testing.assert_close(log_tile[seen].exp(), tile[seen])
    head0, head1 = got[0, 0], got[0, 1]
    rows0 = [i for i, r in enumerate([1, 3, 4, 8] if path == "rows" else range(12)) if r < 9]
    rows1 = [i for i, r in enumerate([1, 3, 4, 8] if path == "rows" else range(12)) if r < 5]
    torch.testing.assert_close(head0[rows0].double(), expected[0, 0, rows0], atol=1e-6, rtol=0)
    torch.testing.assert_close(head1[rows1].double(), expected[0, 1, rows1], atol=1e-6, rtol=0)


def test_the_log_beside_a_tile_is_zero_at_a_key_whose_score_is_minus_infinity():
    # A -inf in a key gives its score -inf: weight 0, log -inf, and statistics took 0 * -inf = NaN
    # for the entropy of every row (left alone by the last stop's review, fixed here).
    torch.manual_seed(9)
    q, k = torch.randn(1, 2, 6, 4).abs() + 0.1, torch.randn(1, 2, 6, 4)  # q > 0: q . k = -inf at key 1
    k[0, :, 1, 0] = -math.inf
    for _, tile, log_tile in _tiles_with_logs(q, k, tile_bytes=2 * 2 * 6 * 4):
        assert torch.isfinite(tile).all() and torch.isfinite(log_tile).all()
        assert (log_tile[tile == 0] == 0).all() and (tile[..., 1:2] == 0).all()
        torch.testing.assert_close(log_tile[tile > 0].exp(), tile[tile > 0])
        assert torch.isfinite((tile * log_tile).sum(-1)).all()  # the entropy statistics take
