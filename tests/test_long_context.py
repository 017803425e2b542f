"""Issue 11: long contexts: query rows selected before q.kᵀ (``rows=``), and statistics reduced tile by tile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention_hooker import AttentionHookerError, TransformerAttentionHooker
from attention_hooker.capture.routes import sdpa
from tiny_models import Stack, TwoCallsAttention

transformers = pytest.importorskip("transformers")

SELECTIONS = {"last": "last", "first_and_last": [0, -1], "every_other": slice(None, None, 2), "middle": 3}


class _CausalSdpaAttention(nn.Module):
    def __init__(self, dim=16, num_heads=4, kv_heads=2, causal=True):
        super().__init__()
        self.num_heads, self.kv_heads, self.causal = num_heads, kv_heads, causal
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * (dim // num_heads))

    def forward(self, x, mask=None):
        b, t, d = x.shape
        e = d // self.num_heads
        q = self.q(x).view(b, t, self.num_heads, e).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, e).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                                         enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, d)


def _expected(full: torch.Tensor, rows) -> torch.Tensor:
    length = full.shape[2]
    if rows == "last":
        index = [length - 1]
    elif isinstance(rows, slice):
        index = list(range(length))[rows]
    else:
        index = [r % length for r in ([rows] if isinstance(rows, int) else rows)]
    return full[:, :, index]


def _models():
    torch.manual_seed(0)
    return {
        "sdpa_causal_gqa": (_CausalSdpaAttention(), {}),
        "sdpa_bool_mask": (_CausalSdpaAttention(causal=False), {"mask": torch.rand(2, 1, 9, 9) > 0.3}),
        "softmax": (Stack(use_softmax=True), {}),
        "mha": (nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True), {}),
    }


KEY_SELECTIONS = {"sinks": slice(0, 4), "first_and_last": [0, -1], "last": "last", "every_third": slice(None, None, 3)}


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["as_computed", "float16_tiles"])
@pytest.mark.parametrize("keys", list(KEY_SELECTIONS))
@pytest.mark.parametrize("route", list(_models()))
def test_selected_keys_equal_those_columns_of_the_full_capture_normalised_over_every_key(route, keys, dtype,
                                                                                        monkeypatch):
    model, kwargs = _models()[route]
    model.eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        with TransformerAttentionHooker(model) as full:
            out = model(x, **kwargs)
        monkeypatch.setattr(sdpa, "TILE_BYTES", 1)  # one query row per tile
        with TransformerAttentionHooker(model, rows=[0, -1], keys=KEY_SELECTIONS[keys], dtype=dtype) as some:
            out_selected = model(x, **kwargs)
    torch.testing.assert_close(out_selected, out, rtol=0, atol=0)
    assert some.selection["keys"] == {"sinks": {"start": 0, "stop": 4, "step": None}, "first_and_last": [0, -1],
                                      "last": "last", "every_third": {"start": None, "stop": None, "step": 3}}[keys]
    for name, calls in full.values.items():
        expected = _expected(_expected(calls[0], [0, -1]).transpose(2, 3), KEY_SELECTIONS[keys]).transpose(2, 3)
        got = some.values[name][0]
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        torch.testing.assert_close(got.float(), expected, atol=1e-3 if dtype else 1e-6, rtol=0)


def test_keys_outside_a_call_and_with_reductions_or_gradients_are_refused():
    from attention_hooker import HeadStatsAccumulator

    model = Stack().eval()
    with pytest.raises(AttentionHookerError, match=r"keys=\[7\] names key\(s\) \[7\], but layer 'blocks.0' has 4 keys"):
        with torch.no_grad(), TransformerAttentionHooker(model, keys=[7]):
            model(torch.randn(1, 4, 16))
    with pytest.raises(AttentionHookerError, match="keys= and keep_grad=True"):
        TransformerAttentionHooker(model, keys=[0], keep_grad=True)
    with pytest.raises(AttentionHookerError, match="reduce_into"):
        TransformerAttentionHooker(model, keys=[0]).reduce_into(HeadStatsAccumulator())
    with pytest.raises(AttentionHookerError, match="keys='first' is not a selection of keys"):
        TransformerAttentionHooker(model, keys="first")


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["as_computed", "float16_tiles"])
@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("route", list(_models()))
def test_selected_rows_equal_those_rows_of_the_full_capture(route, selection, dtype):
    model, kwargs = _models()[route]
    model.eval()
    x = torch.randn(2, 9, 16)
    rows = SELECTIONS[selection]
    with torch.no_grad():
        with TransformerAttentionHooker(model) as full:
            out = model(x, **kwargs)
        with TransformerAttentionHooker(model, rows=rows, dtype=dtype) as some:
            out_selected = model(x, **kwargs)
    torch.testing.assert_close(out_selected, out, rtol=0, atol=0)
    assert list(some.values) == list(full.values)
    for name, calls in full.values.items():
        got, expected = some.values[name][0], _expected(calls[0], rows)
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        torch.testing.assert_close(got.float(), expected, atol=1e-3 if dtype else 1e-6, rtol=0)


def _count_query_rows(monkeypatch, function: str) -> list:
    """The query rows of every call of ``sdpa.<function>(q, k, ...)`` from now on."""
    rows, original = [], getattr(sdpa, function)

    def spy(q, k, *args):
        rows.append(q.shape[2])
        return original(q, k, *args)

    monkeypatch.setattr(sdpa, function, spy)
    return rows


def test_on_the_sdpa_route_only_the_selected_rows_enter_the_product_with_the_keys(monkeypatch):
    computed = _count_query_rows(monkeypatch, "_scaled_scores")
    model = _CausalSdpaAttention().eval()
    with torch.no_grad(), TransformerAttentionHooker(model, rows="last"):
        model(torch.randn(1, 50, 16))
    assert computed == [1]


def test_last_row_of_a_llama_generating_with_left_padding_equals_the_full_capture():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 60, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with TransformerAttentionHooker(model) as full:
            tokens = model.generate(**kwargs)
        with TransformerAttentionHooker(model, rows="last") as last:
            tokens_last = model.generate(**kwargs)
    assert torch.equal(tokens, tokens_last)
    for name, calls in full.values.items():
        assert len(last.values[name]) == len(calls) == 3
        for got, whole in zip(last.values[name], calls):
            assert got.shape[2] == 1
            torch.testing.assert_close(got, whole[:, :, -1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows, message", [
    ("first", "not a selection of query rows"),
    ([0.5], "non-integer"),
    ([1, 1], "more than once"),
    (slice(0, 4, -1), "step"),
])
def test_a_bad_row_selection_is_refused_when_the_hooker_is_made(rows, message):
    with pytest.raises(AttentionHookerError, match=message):
        TransformerAttentionHooker(Stack(), rows=rows)


def test_rows_outside_a_call_name_the_layer_and_its_rows():
    model = Stack().eval()
    with pytest.raises(AttentionHookerError, match=r"rows=\[7\] names row\(s\) \[7\], but layer 'blocks.0' has 5"):
        with torch.no_grad(), TransformerAttentionHooker(model, rows=[7]):
            model(torch.randn(1, 5, 16))


def test_rows_and_keep_grad_cannot_be_combined():
    with pytest.raises(AttentionHookerError, match="rows= and keep_grad=True"):
        TransformerAttentionHooker(Stack(), rows="last", keep_grad=True)


def test_the_selection_is_saved_with_the_capture(tmp_path):
    from attention_hooker import load

    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model, rows=slice(1, None, 2), heads=[0, 2]) as hooker:
        model(torch.randn(1, 5, 16))
    assert hooker.selection == {"heads": [0, 2], "rows": {"start": 1, "stop": None, "step": 2}, "keys": None}
    assert hooker.values["blocks.0"][0].shape == (1, 2, 2, 5)
    hooker.save(tmp_path / "capture.safetensors")
    loaded = load(tmp_path / "capture.safetensors")
    assert loaded.metadata["selection"] == hooker.selection
    loaded.save(tmp_path / "again.safetensors")
    assert load(tmp_path / "again.safetensors").metadata["selection"] == hooker.selection


# ------------------------------------------------------------------ reductions that keep no matrices
def _stats_both_ways(model, inputs, padding_mask, monkeypatch, tile_rows=2):
    from attention_hooker import HeadStatsAccumulator

    with torch.no_grad(), TransformerAttentionHooker(model) as full:
        model(**inputs)
    expected = HeadStatsAccumulator()
    expected.update({n: c[:1] for n, c in full.values.items()}, padding_mask=padding_mask)
    tiles = _count_query_rows(monkeypatch, "_log_weights")  # statistics take each tile with its log
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)  # one query row per tile
    reduced = HeadStatsAccumulator()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(reduced, padding_mask=padding_mask)
        model(**inputs)
        reduced.add_input(len(padding_mask) if padding_mask is not None else 1)
    assert hooker.values == {}
    return expected, reduced, tiles


def _assert_same_statistics(expected, reduced):
    import numpy as np

    assert reduced.layers == expected.layers
    want, got = expected.result(), reduced.result()
    for key in expected.STATISTICS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)  # fp32 tiles


def test_statistics_reduced_row_by_row_on_a_padded_minilm_equal_those_of_the_full_matrices(
        minilm_sdpa, minilm_batch, monkeypatch):
    expected, reduced, tiles = _stats_both_ways(minilm_sdpa, minilm_batch, minilm_batch["attention_mask"], monkeypatch)
    assert tiles and set(tiles) == {1}, "the sdpa route reduced one query row at a time"
    _assert_same_statistics(expected, reduced)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_statistics_reduced_on_a_causal_llama_equal_those_of_the_full_matrices(implementation, monkeypatch):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    ids = torch.randint(3, 60, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, -3:] = 0
    expected, reduced, tiles = _stats_both_ways(model, dict(input_ids=ids, attention_mask=mask), mask, monkeypatch)
    assert bool(tiles) == (implementation == "sdpa")
    _assert_same_statistics(expected, reduced)


def test_a_layer_computed_in_pieces_adds_nothing_to_the_statistics():
    from attention_hooker import HeadStatsAccumulator

    model = nn.Sequential(TwoCallsAttention())
    accumulator = HeadStatsAccumulator()
    with pytest.warns(Warning), torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(accumulator)
        model(torch.randn(1, 6, 16))
    assert accumulator.layers == [] and "pieces" in hooker.report()["0"].reason


def test_reduce_into_refuses_what_it_cannot_take():
    from attention_hooker import HeadStatsAccumulator

    with pytest.raises(AttentionHookerError, match="reduce_into"):
        TransformerAttentionHooker(Stack(), rows="last").reduce_into(HeadStatsAccumulator())
    with pytest.raises(AttentionHookerError, match="HeadStatsAccumulator"):
        TransformerAttentionHooker(Stack()).reduce_into({})
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(HeadStatsAccumulator())
        model(torch.randn(1, 4, 16))
        assert hooker.values == {}
        hooker.reduce_into(None)
        model(torch.randn(1, 4, 16))
    assert [len(c) for c in hooker.values.values()] == [1, 1]


# ------------------------------------------------------------------ pooled maps for pictures of long contexts
def _pooled_both_ways(model, inputs, size, how, monkeypatch):
    from attention_hooker import PooledAttention

    with torch.no_grad(), TransformerAttentionHooker(model) as full:
        model(**inputs)
    tiles = _count_query_rows(monkeypatch, "_weights")
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)  # one query row per tile
    pooled = PooledAttention(size=size, how=how)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.reduce_into(pooled)
        model(**inputs)
    assert hooker.values == {}
    return full.values, pooled.values, tiles


@pytest.mark.parametrize("how", ["mean", "max"])
def test_pooled_maps_equal_torch_pooling_of_the_full_maps(how, monkeypatch):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    full, pooled, tiles = _pooled_both_ways(model, dict(input_ids=torch.randint(3, 60, (2, 24))), 6, how, monkeypatch)
    assert tiles and set(tiles) == {1}
    pool = torch.nn.functional.avg_pool2d if how == "mean" else torch.nn.functional.max_pool2d
    for name, calls in full.items():
        expected = pool(calls[0].view(8, 24, 24), kernel_size=4).view(2, 4, 6, 6)  # (B, H, 6, 6)
        torch.testing.assert_close(pooled[name][0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_pooled_maps_of_uneven_lengths_equal_block_by_block_pooling_by_hand(how, monkeypatch):
    model = Stack().eval()
    full, pooled, _ = _pooled_both_ways(model, dict(x=torch.randn(2, 10, 16)), 4, how, monkeypatch)
    blocks = [[i for i in range(10) if i * 4 // 10 == b] for b in range(4)]  # sizes 3, 2, 3, 2
    for name, calls in full.items():
        w = calls[0]
        expected = torch.empty(2, 4, 4, 4)
        for bq, qs in enumerate(blocks):
            for bk, ks in enumerate(blocks):
                cell = w[:, :, qs][:, :, :, ks]
                expected[:, :, bq, bk] = cell.mean((-1, -2)) if how == "mean" else cell.amax((-1, -2))
        torch.testing.assert_close(pooled[name][0], expected, atol=1e-6, rtol=1e-5)


def test_pooling_keeps_short_axes_whole():
    from attention_hooker import PooledAttention

    model = Stack().eval()
    pooled = PooledAttention(size=512)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        full = model(torch.randn(1, 7, 16))
        hooker.reduce_into(pooled)
        model(torch.randn(1, 7, 16))
    assert [tuple(c[0].shape) for c in pooled.values.values()] == [(1, 4, 7, 7)] * 2
    assert full is not None
    with pytest.raises(AttentionHookerError, match="how"):
        PooledAttention(how="median")


def test_attention_received_per_key_and_top_keys_equal_those_of_the_full_maps(minilm_sdpa, minilm_batch, monkeypatch):
    from attention_hooker import KeyReductions

    mask = minilm_batch["attention_mask"]
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as full:
        minilm_sdpa(**minilm_batch)
    tiles = _count_query_rows(monkeypatch, "_weights")
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)
    keys = KeyReductions(top=3)
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        hooker.reduce_into(keys, padding_mask=mask)
        minilm_sdpa(**minilm_batch)
    assert tiles and set(tiles) == {1} and hooker.values == {}
    for name, calls in full.values.items():
        w = calls[0]  # (B, H, Q, K)
        expected = (w * mask[:, None, :, None]).sum(2)  # padded query rows receive nothing
        torch.testing.assert_close(keys.received[name][0], expected, atol=1e-5, rtol=1e-5)
        indices, weights = keys.top_keys[name][0]
        want_weights, want_indices = w.topk(3, dim=-1)
        torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)
        assert (indices == want_indices).float().mean() > 0.99  # ties may order differently


def test_sink_share_on_given_positions_equals_the_share_computed_on_the_full_maps(minilm_sdpa, minilm_batch,
                                                                                 monkeypatch):
    from attention_hooker import HeadStatsAccumulator, sink_share

    mask = minilm_batch["attention_mask"]
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as full:
        minilm_sdpa(**minilm_batch)
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)
    reduced = HeadStatsAccumulator(sink_positions=[0, 1, -1])
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        hooker.reduce_into(reduced, padding_mask=mask)
        minilm_sdpa(**minilm_batch)
    table = reduced.result()
    assert reduced.STATISTICS[-1] == "sink_share" and HeadStatsAccumulator.STATISTICS[-1] == "last_token_share"
    rows = mask.sum(-1).double()  # real queries per sequence weigh each sequence's share
    for index, (name, calls) in enumerate(full.values.items()):
        per_sequence = sink_share(calls[0], [0, 1, -1], padding_mask=mask)  # (B, H)
        expected = (per_sequence * rows[:, None]).sum(0) / rows.sum()
        torch.testing.assert_close(torch.as_tensor(table["sink_share"][index]), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(AttentionHookerError, match="sink_positions"):
        HeadStatsAccumulator(sink_positions="0")


@pytest.mark.parametrize("selection, expected, keys, expected_keys", [
    ("last", ["e"], None, None), (slice(1, None, 2), ["b", "d"], None, None), ([0, -2], ["a", "d"], None, None),
    (None, None, slice(0, 2), ["a", "b"]), ("last", ["e"], [0, -1], ["a", "e"])])
def test_the_page_labels_the_kept_rows_with_their_tokens_from_the_hooker_and_from_the_file(
        selection, expected, keys, expected_keys, tmp_path):
    import json
    import re

    from attention_hooker import load, render_html

    tokens = ["a", "b", "c", "d", "e"]
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model, rows=selection, keys=keys) as hooker:
        model(torch.randn(1, 5, 16))
    hooker.save(tmp_path / "rows.safetensors", tokens=tokens)
    expected, expected_keys = expected or tokens, expected_keys or tokens
    for page in (render_html(hooker, tokens=tokens), render_html(load(tmp_path / "rows.safetensors"))):
        meta = json.loads(re.search(r'id="ah-meta">(.*?)</script>', page.html, re.S).group(1))
        for layer in meta["layers"]:
            call = layer["calls"][0]
            assert meta["tokenSets"][call["queryTokens"]] == expected
            assert meta["tokenSets"][call["keyTokens"]] == expected_keys


# ------------------------------------------------------------------ generation: memory held close to what is stored
def test_generation_steps_lie_side_by_side_and_save_and_clear_as_before(tmp_path):
    from attention_hooker import load

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 60, (1, 5))
    generate = dict(max_new_tokens=200, min_new_tokens=200, do_sample=False, pad_token_id=0)
    with torch.no_grad(), TransformerAttentionHooker(model, dtype=torch.float16) as hooker:
        model.generate(ids, **generate)
    steps = [t for calls in hooker.values.values() for t in calls]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in steps}
    assert len(steps) == 400 and len(storages) < 20, "the steps share a few chunks, not one allocation each"
    assert sum(storages.values()) <= 1.2 * hooker.values.nbytes + 2**20, "the chunks hold little beyond the steps"
    assert all(t._base is None and t.is_contiguous() for t in steps)
    before = [t.clone() for t in steps]
    steps[0].fill_(7.0)  # one step written: no other step changes
    assert all(torch.equal(t, b) for t, b in zip(steps[1:], before[1:]))
    steps[0].copy_(before[0])
    with torch.no_grad(), TransformerAttentionHooker(model, dtype=torch.float16) as unchunked:
        unchunked._router.memory.allocation.arena.MAX_CHUNK = 0  # every tensor allocated on its own, as before
        model.generate(ids, **generate)
    for name, calls in unchunked.values.items():
        assert all(torch.equal(a, b) for a, b in zip(calls, hooker.values[name]))
    hooker.save(tmp_path / "steps.safetensors")
    loaded = load(tmp_path / "steps.safetensors")
    assert all(torch.equal(a, b) for name in hooker.values for a, b in zip(loaded.values[name], hooker.values[name]))
    kept = hooker.values[next(iter(hooker.values))][-1]
    hooker.clear()
    assert torch.equal(kept, before[199]), "a tensor the user kept keeps its numbers after clear()"
