"""Maps that are not attention probabilities over tokens are marked with their kind (``_map_kinds.py``), and
every analysis that reads probabilities refuses them by name, whatever their numbers.

DiffLlama's differential map ``D = P[:, :H/2] - λ P[:, H/2:]`` (rows sum to ``1 - λ``), Nystromformer's landmark
map (a pseudo-inverse and a learned convolution) and CaiT's talking-heads map (heads mixed after the softmax) are
each the map that multiplies the values, stored as such (their own tests check them against the modules'
weights). Before the mark, the analyses checked probabilities by the numbers only (rows may sum to less than 1,
as sink rows do): a ``D`` with no negative entry ran through rollout and head statistics silently. The mark is
kept by the keeper, survives save/load (eager and lazy) and streaming, and the report names the kind.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import test_diffllama  # noqa: E402  (tests/ is on the path: pytest's rootdir import mode)
import test_landmarks  # noqa: E402
from attention_hooker import TransformerAttentionHooker, attention_rollout, load  # noqa: E402
from attention_hooker._map_kinds import MapKind, kind_of, mark_kind, not_probabilities  # noqa: E402
from attention_hooker.analysis.stats import HeadStatsAccumulator, head_entropy  # noqa: E402
from attention_hooker.errors import AttentionHookerError  # noqa: E402
from attention_hooker.page_scores import page_scores  # noqa: E402


def _diffllama():
    model, inputs = test_diffllama._model("eager"), test_diffllama._inputs()
    hooker, _ = test_diffllama._capture(model, inputs)
    return model, inputs, hooker


def _nystromformer():
    model = test_landmarks._model(landmarks=4)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"attention\.self$") as hooker:
        model(test_landmarks._ids())
    return hooker


def _cait():
    timm = pytest.importorskip("timm")
    from timm.models.cait import Cait

    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, depth_token_only=1,
                 num_classes=5).eval()
    del timm
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"attn$") as hooker:
        model(torch.randn(2, 3, 32, 32))
    return hooker


def test_a_differential_map_with_no_negative_entry_is_refused_by_rollout_and_head_statistics_by_name():
    """The numbers alone pass (no negative entry, rows summing to 1 - λ < 1): only the mark tells."""
    _, _, hooker = _diffllama()
    name = next(iter(hooker.values))
    (stored,) = hooker.values[name]
    assert float(stored.min()) >= 0 and float(stored.sum(-1).max()) < 1  # what the numeric check lets through
    assert kind_of(stored).name == "not probabilities"
    with pytest.raises(AttentionHookerError, match=r"attentions\[0\] is DiffLlama's differential map .*rows sum to "
                                                   r"1 - λ.*not attention probabilities"):
        attention_rollout(hooker.values)
    with pytest.raises(AttentionHookerError, match="DiffLlama's differential map"):
        head_entropy(stored)
    with pytest.raises(AttentionHookerError, match="DiffLlama's differential map"):
        HeadStatsAccumulator().update(hooker.values)
    assert "DiffLlama's differential map" in hooker.report()[name].kind
    assert page_scores(hooker)[name] == [{}]  # the page draws the map but scores no probability reading of it


def test_a_value_computed_from_a_marked_map_is_not_marked():
    """The mark says what the library stored: a copy made by the user is theirs to read."""
    _, _, hooker = _diffllama()
    stored = next(iter(hooker.values.values()))[0]
    assert kind_of(stored.clone()) is None
    head_entropy(stored.clone().clamp(min=0))  # the user's own numbers, checked by the numbers


def test_the_nystromformer_landmark_map_and_the_cait_mixed_map_are_refused_by_name():
    hooker = _nystromformer()
    assert hooker.values and all(kind_of(t) is not None for calls in hooker.values.values() for t in calls)
    with pytest.raises(AttentionHookerError, match="Nystromformer's landmark map"):
        attention_rollout(hooker.values)
    with pytest.raises(AttentionHookerError, match="Nystromformer's landmark map"):
        head_entropy(next(iter(hooker.values.values()))[0])
    hooker = _cait()
    mixed = [name for name, c in hooker.report().items() if c.kind is not None]
    assert len(mixed) == 2 and all("talking-heads" in hooker.report()[name].kind for name in mixed)
    with pytest.raises(AttentionHookerError, match="talking-heads map mixed across heads"):
        head_entropy(hooker.values[mixed[0]][0])
    plain = [name for name in hooker.values if name not in mixed]  # the class-attention layers: softmax probabilities
    assert plain and all(kind_of(hooker.values[name][0]) is None for name in plain)
    head_entropy(hooker.values[plain[0]][0])


def test_head_statistics_reduced_during_the_capture_refuse_a_differential_layer():
    model, inputs = test_diffllama._model("eager"), test_diffllama._inputs()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"self_attn$") as hooker:
        hooker.reduce_into(HeadStatsAccumulator())
        with pytest.raises(AttentionHookerError, match="DiffLlama's differential map"):
            model(**inputs)
        hooker.reduce_into(None)  # the capture goes on: the next forward keeps the maps, marked
        model(**inputs)
    assert all(len(calls) == 1 and kind_of(calls[0]) is not None for calls in hooker.values.values())


@pytest.mark.parametrize("lazy", [False, True])
def test_the_kind_survives_save_and_load_and_saving_again(tmp_path, lazy):
    _, _, hooker = _diffllama()
    hooker.save(tmp_path / "a.safetensors")
    loaded = load(tmp_path / "a.safetensors", lazy=lazy)
    for name, calls in hooker.values.items():
        assert torch.equal(loaded.values[name][0], calls[0])
        assert kind_of(loaded.values[name][0]) == kind_of(calls[0])
    assert "kinds" not in loaded.metadata
    with pytest.raises(AttentionHookerError, match="DiffLlama's differential map"):
        attention_rollout(loaded)
    loaded.save(tmp_path / "b.safetensors")
    again = load(tmp_path / "b.safetensors")
    assert all(kind_of(calls[0]) is not None for calls in again.values.values())


def test_a_plain_capture_saves_no_kinds_and_loads_unmarked(tmp_path):
    from attention_hooker.io.saved import save_values

    plain = {"layer": [torch.rand(1, 2, 3, 3).softmax(-1)]}
    save_values(plain, tmp_path / "p.safetensors")
    loaded = load(tmp_path / "p.safetensors")
    assert kind_of(loaded.values["layer"][0]) is None
    attention_rollout(loaded)


def test_a_damaged_kind_is_refused_on_load(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, _, hooker = _diffllama()
    hooker.save(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["attention_hooker"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(meta["kinds"]))
    meta["kinds"][name][0]["name"] = "probabilities after all"
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata={"attention_hooker": json.dumps(meta)})
    with pytest.raises(AttentionHookerError, match="is damaged: .* is not the description of a kind of map"):
        load(tmp_path / "d.safetensors")
    meta["kinds"][name] = []
    save_file(tensors, str(tmp_path / "e.safetensors"), metadata={"attention_hooker": json.dumps(meta)})
    with pytest.raises(AttentionHookerError, match="do not list one entry per call"):
        load(tmp_path / "e.safetensors")


@pytest.mark.parametrize("shard_bytes", [1, 1 << 20])
def test_the_kind_survives_streaming_and_load(tmp_path, shard_bytes):
    model, inputs = test_diffllama._model("eager"), test_diffllama._inputs()
    _, _, memory = _diffllama()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"self_attn$") as hooker:
        with hooker.stream_to(tmp_path / "s", shard_bytes=shard_bytes):
            model(**inputs)
    loaded = load(tmp_path / "s")
    assert list(loaded.values) == list(memory.values)
    for name, calls in loaded.values.items():
        assert torch.equal(calls[0], memory.values[name][0])
        assert kind_of(calls[0]) == kind_of(memory.values[name][0])
    with pytest.raises(AttentionHookerError, match="DiffLlama's differential map"):
        attention_rollout(loaded)


def test_the_mark_goes_with_its_tensor_and_a_reused_buffer_loses_it():
    t = torch.zeros(1, 1, 2, 2)
    kind = not_probabilities("a test map", "made up")
    mark_kind(t, kind)
    assert kind_of(t) is kind
    mark_kind(t, None)
    assert kind_of(t) is None
    with pytest.raises(AttentionHookerError):
        MapKind("token attention", "a", "b")


def test_the_grid_draws_a_differential_map_and_its_colour_scale_says_it_is_not_probabilities():
    from attention_hooker import plot_attention_grid

    _, _, hooker = _diffllama()
    name = next(iter(hooker.values))
    fig = plot_attention_grid(hooker.values[name][0], layer_name=name)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert labels == ["attention weight\nnot probabilities: DiffLlama's differential map P[:, j] - λ P[:, j + heads/2]"]
    fig = plot_attention_grid(hooker.values[name][0].clone(), layer_name=name)  # the user's own copy: a plain label
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"] == ["attention weight"]


def test_stitched_generation_steps_of_a_differential_map_stay_marked_and_are_refused():
    """stitch_steps used to return an unmarked tensor, which head_entropy and rollout then read as probabilities."""
    from attention_hooker import stitch_steps

    model = test_diffllama._model("eager", causal_lm=True)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"self_attn$") as hooker:
        model.generate(torch.randint(3, 100, (1, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    calls = next(iter(hooker.values.values()))
    assert len(calls) == 3 and all(kind_of(c) is not None for c in calls)
    stitched = stitch_steps(calls)
    assert tuple(stitched.shape[-2:]) == (6, 6)
    assert kind_of(stitched) == kind_of(calls[0])
    with pytest.raises(AttentionHookerError, match="DiffLlama's differential map"):
        head_entropy(stitched)
    with pytest.raises(AttentionHookerError, match="DiffLlama's differential map"):
        attention_rollout([stitched])
    with pytest.raises(AttentionHookerError, match="different kinds"):
        stitch_steps([calls[0], calls[1].clone(), calls[2]])  # a plain step among marked ones


def test_words_of_a_marked_map_stay_marked_and_a_map_over_channels_has_no_words():
    from attention_hooker import to_words
    from attention_hooker._map_kinds import channels

    diff = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    mark_kind(diff, not_probabilities("a test map", "made up"))
    words = to_words({"a": [diff]}, word_ids=[[0, 0, 1, 1, 2]])
    assert kind_of(words["a"][0]) == kind_of(diff)
    assert kind_of(to_words(diff, [0, 0, 1, 1, 2]).weights) == kind_of(diff)
    with pytest.raises(AttentionHookerError, match="not probabilities"):
        head_entropy(words["a"][0])
    over_channels = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    mark_kind(over_channels, channels("XCiT's channel map", "over channels"))
    with pytest.raises(AttentionHookerError, match="channels of each head"):
        to_words({"a": [over_channels]}, word_ids=[[0, 0, 1, 1, 2]])
    with pytest.raises(AttentionHookerError, match="channels of each head"):
        to_words(over_channels[0], [0, 0, 1, 1, 2])


def test_a_view_of_a_marked_map_keeps_its_kind_and_a_copy_does_not():
    t = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    kind = not_probabilities("a test map", "made up")
    mark_kind(t, kind)
    for view in (t[0:1], t[:, :2], t[0:1][:, :1], t[0], t.view(4, 3, 3)):
        assert kind_of(view) is kind
    with pytest.raises(AttentionHookerError, match="a test map"):
        head_entropy(t[0:1])
    for copy in (t.clone(), t.double(), t[0:1].clone()):
        assert kind_of(copy) is None


def test_a_collection_while_the_registry_lock_is_held_does_not_hang():
    """The weak reference's callback takes the registry's lock: a collection that frees a marked tensor while the
    lock is held in the same thread (mark_kind allocates under it) used to deadlock."""
    import gc
    import threading

    from attention_hooker import _map_kinds

    def run(done):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            t = torch.zeros(1)
            mark_kind(t, not_probabilities("a test map", "made up"))
            cycle = [t]
            cycle.append(cycle)
            key = id(t)
            del t, cycle
            with _map_kinds._lock:
                gc.collect()
            done.append(key not in _map_kinds._marked)
        finally:
            if was_enabled:
                gc.enable()

    done = []
    worker = threading.Thread(target=run, args=(done,), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "a collection under the registry's lock deadlocked in the weak reference callback"
    assert done == [True]
