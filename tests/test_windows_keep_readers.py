"""windows="keep" and the readers of maps: a call kept per window ``(batch * windows, heads, N, N)`` is
refused wherever ``(batch, heads, query, key)`` is read, the rollouts place it (first calls only) from
the index given or the hooker's own, and the index itself is checked, comparable and read under the
keeper's lock (review of the keep change, findings 3, 4, 5, 6, 7 and 9).

Oracles: a ``windows="dense"`` capture of the same forward (the map the placement must give), and
the gradient-weighted rollout computed here from its formula on the placed maps.
"""

import json

import pytest
import torch

from attention_hooker import (AttentionHookerError, TransformerAttentionHooker, attention_rollout,
                              gradient_weighted_rollout, head_entropy, load, plot_attention_overview, stage_rollout,
                              to_numpy)
from attention_hooker.io.saved import save_values
from attention_hooker.window_index import WindowIndex

transformers = pytest.importorskip("transformers")

KEPT = r"kept per window .* window_index=hooker\.window_index .*dense_values"


def _hf_swin(depths=(2,), heads=(2,)):
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=40, patch_size=4, embed_dim=16, depths=list(depths),
                                     num_heads=list(heads), window_size=4, attn_implementation="eager")
    model = transformers.SwinModel(config).eval()
    with torch.no_grad():  # zero at init: an index that ignored positions could pass
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0, 1)
    return model


def _captures(model, *inputs, **options):
    with torch.no_grad():
        with TransformerAttentionHooker(model, windows="keep", **options) as kept:
            for x in inputs:
                model(x)
        with TransformerAttentionHooker(model) as dense:
            for x in inputs:
                model(x)
    return kept, dense


def test_per_window_calls_are_refused_by_every_reader_of_maps(tmp_path):
    model = _hf_swin()
    x = torch.randn(2, 3, 40, 40)  # 10 x 10 tokens padded to 12: 9 windows an image, 18 rows a call
    kept, _ = _captures(model, x)
    name = next(iter(kept.values))
    assert kept.values[name][0].shape[0] == 18
    readers = {
        "attention_rollout": lambda v: attention_rollout(v),
        "stage_rollout": lambda v: stage_rollout(v),
        "head_entropy": lambda v: head_entropy(v[name][0]),
        "plot_attention_overview": lambda v: plot_attention_overview(v),
        "to_numpy": lambda v: to_numpy(v),
    }
    kept.save(tmp_path / "c.safetensors")
    for source in (kept.values, load(tmp_path / "c.safetensors").values, load(tmp_path / "c.safetensors",
                                                                                lazy=True).values):
        for what, read in readers.items():
            with pytest.raises(AttentionHookerError, match=KEPT):
                read(source)
    # The placed call is an ordinary map again.
    placed = kept.window_index[name][0].dense(kept.values[name][0])
    assert head_entropy(placed).shape == (2, 2)


def test_the_rollouts_pick_up_the_hooker_s_index_and_equal_the_dense_capture_s(tmp_path):
    model = _hf_swin()
    kept, dense = _captures(model, torch.randn(2, 3, 40, 40))
    expected = attention_rollout(dense.values)
    torch.testing.assert_close(attention_rollout(kept), expected, atol=0, rtol=0)
    torch.testing.assert_close(stage_rollout(kept), stage_rollout(dense.values), atol=0, rtol=0)
    kept.save(tmp_path / "c.safetensors")
    torch.testing.assert_close(attention_rollout(load(tmp_path / "c.safetensors")), expected, atol=0, rtol=0)


def test_the_multi_stage_refusal_names_stage_rollout_and_window_index():
    model = _hf_swin(depths=(2, 2), heads=(2, 2))
    _, dense = _captures(model, torch.randn(1, 3, 40, 40))
    with pytest.raises(AttentionHookerError, match=r"stage_rollout; a capture with windows=\"keep\": pass "
                                                   r"window_index=hooker\.window_index"):
        attention_rollout(dense.values)


def test_gradient_weighted_rollout_places_the_kept_calls_and_their_gradients():
    model = _hf_swin()
    x = torch.randn(1, 3, 40, 40)
    with TransformerAttentionHooker(model, windows="keep", keep_grad=True) as kept:
        pooled = model(x).pooler_output
        (pooled * torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    with pytest.raises(AttentionHookerError, match=KEPT):
        gradient_weighted_rollout(kept.values, kept.gradients)
    got = gradient_weighted_rollout(kept.values, kept.gradients, window_index=kept.window_index)
    assert torch.equal(gradient_weighted_rollout(kept, kept.gradients), got)
    # The formula (Chefer et al. 2021) by hand on the placed maps and gradients.
    relevance = torch.eye(100, dtype=torch.float64)[None]
    for name, (index,) in kept.window_index.items():
        a = index.dense(kept.values[name][0]).double()
        g = index.dense(kept.gradients[name][0]).double()
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    torch.testing.assert_close(got, relevance.float())
    assert not torch.allclose(got, torch.eye(100)[None])  # the gradients reached it


def test_a_rollout_with_an_index_places_only_the_first_call_of_each_layer(monkeypatch):
    import attention_hooker.window_index as window_index

    model = _hf_swin()
    x = torch.randn(1, 3, 40, 40)
    kept, dense = _captures(model, x, torch.randn(3, 3, 40, 40))  # two calls a layer
    placed = []
    real = window_index.place_windows
    monkeypatch.setattr(window_index, "place_windows", lambda *a, **k: placed.append(a[2]) or real(*a, **k))
    for rollout in (attention_rollout, stage_rollout):
        placed.clear()
        got = rollout(kept.values, window_index=kept.window_index)
        assert placed == [1, 1]  # one call (of batch 1) for each of the two layers
        torch.testing.assert_close(got, rollout(dense.values), atol=0, rtol=0)


def test_one_call_s_index_where_the_mapping_is_expected_is_refused():
    model = _hf_swin()
    kept, _ = _captures(model, torch.randn(1, 3, 40, 40))
    name = next(iter(kept.values))
    one = kept.window_index[name][0]
    for rollout in (attention_rollout, stage_rollout):
        with pytest.raises(AttentionHookerError, match=r"window_index= takes \{layer_name: \[WindowIndex or None per "
                                                       r"call\]\} .* got one WindowIndex"):
            rollout(kept.values, window_index=one)
    with pytest.raises(AttentionHookerError, match=r"window_index= takes .* got list"):
        attention_rollout(kept.values, window_index=[one])


def test_save_values_refuses_a_windows_argument_that_is_not_an_index_per_call(tmp_path):
    model = _hf_swin()
    kept, _ = _captures(model, torch.randn(1, 3, 40, 40))
    name = next(iter(kept.values))
    one = kept.window_index[name][0]
    cases = [({name: ["junk"]}, r"holds str: expected a list of one WindowIndex or None per call"),
             ({name: one}, r"is WindowIndex: expected a list of one WindowIndex or None per call"),
             (one, r"windows= takes .* got one WindowIndex")]
    for windows, message in cases:
        with pytest.raises(AttentionHookerError, match=message):
            save_values(kept.values, tmp_path / "c.safetensors", windows=windows)


def test_window_index_compares_and_its_constructor_checks():
    table = torch.tensor([[0, 1], [2, -1]])
    a, b = WindowIndex(table, 1, 1, 3), WindowIndex(table.clone(), 1, 1, 3)
    assert a == b and not (a != b) and a != WindowIndex(table, 2, 1, 3) and a != "index"
    assert a != WindowIndex(torch.tensor([[0, 2], [1, -1]]), 1, 1, 3)
    assert len({a, b}) == 1
    for args, message in [((torch.tensor([[0, 0], [0, 0]]), 1, 1, 3), "does not hold each of the 3 tokens"),
                          ((torch.tensor([[0, 1], [2, -2]]), 1, 1, 3), "does not hold each of the 3 tokens"),
                          ((table, 0, 1, 3), r"\[0, 1, 3\] are not positive integers"),
                          ((table, 1, True, 3), "are not positive integers"),
                          ((table.float(), 1, 1, 3), r"not a \(windows, N\) tensor of integers"),
                          ((table[0], 1, 1, 3), r"not a \(windows, N\) tensor of integers")]:
        with pytest.raises(AttentionHookerError, match=message):
            WindowIndex(*args)
    with pytest.raises(AttributeError):
        a.batch = 2
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a


def test_the_hooker_reads_its_index_under_the_keeper_s_lock():
    model = _hf_swin()
    kept, _ = _captures(model, torch.randn(1, 3, 40, 40))
    memory = kept._router.memory
    held = []

    class Watched(dict):  # records whether the keeper's lock is held each time the index is walked
        def __iter__(self):
            held.append(memory._lock._is_owned())
            return super().__iter__()

        def __getitem__(self, name):
            held.append(memory._lock._is_owned())
            return super().__getitem__(name)

    memory.window_index = Watched(memory.window_index)
    index = kept.window_index
    assert list(index) == list(kept.values) and held and all(held)


def test_clear_resets_the_index_with_the_values():
    model = _hf_swin()
    with torch.no_grad(), TransformerAttentionHooker(model, windows="keep") as hooker:
        model(torch.randn(1, 3, 40, 40))
        hooker.clear()
        assert hooker.window_index == {} and not any(hooker.values.values())
        model(torch.randn(2, 3, 40, 28))
    assert {len(v) for v in hooker.window_index.values()} == {1}
    assert {(i[0].batch, i[0].height, i[0].width) for i in hooker.window_index.values()} == {(2, 10, 7)}


def test_keep_last_keeps_each_call_with_its_own_grid():
    model = _hf_swin()
    inputs = [torch.randn(1, 3, 40, 40), torch.randn(2, 3, 40, 36), torch.randn(3, 3, 40, 28)]
    kept, dense = _captures(model, *inputs, max_calls=2, keep="last")
    _, every = _captures(model, *inputs)
    for name, indices in kept.window_index.items():
        assert [(i.batch, i.height, i.width) for i in indices] == [(2, 10, 9), (3, 10, 7)]
        for call, index in enumerate(indices):
            assert torch.equal(index.dense(kept.values[name][call]), every.values[name][call + 1])


def _rewrite_windows(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["attention_hooker"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["windows"] = change(meta["windows"])
    save_file(tensors, str(path), metadata={"attention_hooker": json.dumps(meta)})


@pytest.mark.parametrize("change, message", [
    (lambda w: [w], "its window index is not a mapping of layers"),
    (lambda w: {k: v * 2 for k, v in w.items()}, "does not list one entry per call"),
    (lambda w: {**w, "no.such.layer": next(iter(w.values()))}, r"layer 'no\.such\.layer' does not list one entry"),
    (lambda w: {k: [{**v[0], "height": 5}] for k, v in w.items()}, "does not hold each of the 50 tokens"),
])
def test_load_refuses_a_damaged_window_index(tmp_path, change, message):
    model = _hf_swin()
    kept, _ = _captures(model, torch.randn(1, 3, 40, 40))
    path = tmp_path / "c.safetensors"
    kept.save(path)
    _rewrite_windows(path, change)
    with pytest.raises(AttentionHookerError, match=rf"is damaged.*{message}"):
        load(path)
