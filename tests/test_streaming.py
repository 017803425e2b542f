"""Issue 11: a capture streamed to disk as sharded safetensors, planned before it is written, opened lazily."""

from __future__ import annotations

import json
import os
from collections import namedtuple

import pytest
import torch
from torch import nn

from attention_hooker import AttentionHookerError, TransformerAttentionHooker, load
from attention_hooker.capture.routes import sdpa
from attention_hooker.keep import stream_call, stream_folder
from tiny_models import Stack, TwoCallsAttention

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


def _llama(implementation="sdpa"):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def _batch():
    ids = torch.randint(3, 60, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def _capture_both_ways(model, inputs, folder, **options):
    with torch.no_grad(), TransformerAttentionHooker(model, **options) as memory:
        model(**inputs)
    with torch.no_grad(), TransformerAttentionHooker(model, **options) as hooker:
        with hooker.stream_to(folder, shard_bytes=options.pop("shard_bytes", 1)) as stream:
            model(**inputs)
        assert hooker.values == {}, "a streamed capture keeps nothing in memory"
    return memory.values, stream


def _assert_equal_captures(expected, folder):
    """Equal to the in-memory capture: exactly, or within float32 tolerance where one was computed
    in tiles of query rows and the other in one product."""
    loaded = load(folder)
    assert list(loaded.values) == list(expected)
    for name, calls in expected.items():
        assert len(loaded.values[name]) == len(calls)
        for want, got in zip(calls, loaded.values[name]):
            assert got.dtype == want.dtype, name
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    return loaded


def _read_with_safetensors(folder):
    """Every tensor of every file, read by safetensors itself (not by our reader)."""
    from safetensors import safe_open

    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    tensors[(name, key)] = handle.get_tensor(key)
    return tensors


OPTIONS = {
    "everything": {},
    "last_row": {"rows": "last"},
    "rows_and_heads": {"rows": slice(2, None, 3), "heads": [3, 0]},
    "float16": {"dtype": torch.float16},
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_a_capture_streamed_tile_by_tile_equals_the_capture_in_memory(options, tmp_path, monkeypatch):
    written = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(stream_call.os, "pwrite", lambda fd, data, offset: written.append(len(data)) or
                        real_pwrite(fd, data, offset))
    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)  # one query row per tile
    expected, stream = _capture_both_ways(_llama(), _batch(), tmp_path / "capture", **OPTIONS[options])
    loaded = _assert_equal_captures(expected, tmp_path / "capture")
    rows = next(iter(expected.values()))[0].shape[2]
    heads = next(iter(expected.values()))[0].shape[1]
    assert len(written) == 2 * 2 * heads * rows, "each tile was written as it came: one row per (batch, head)"
    assert loaded.metadata["selection"] == TransformerAttentionHooker(_llama(), **OPTIONS[options]).selection
    assert stream.closed and sum(stream.calls.values()) == 2
    by_safetensors = _read_with_safetensors(tmp_path / "capture")
    index = json.loads((tmp_path / "capture" / "capture.json").read_text())
    for name, files in zip(index["layers"], index["files"]):
        for (file_name, tensor_name), want in zip(files, expected[name]):
            assert torch.equal(by_safetensors[(file_name, tensor_name)], loaded.values[name][0])


@pytest.mark.parametrize("route", ["eager_softmax", "mha", "bfloat16_sdpa"])
def test_other_routes_and_dtypes_stream_the_same_values(route, tmp_path):
    if route == "eager_softmax":
        model, inputs = _llama("eager"), _batch()
    elif route == "mha":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2).eval()
        inputs = {"src": torch.randn(2, 9, 16)}
    else:
        model, inputs = _llama().to(torch.bfloat16), _batch()
    expected, _ = _capture_both_ways(model, inputs, tmp_path / "capture")
    _assert_equal_captures(expected, tmp_path / "capture")


def test_small_calls_are_gathered_into_shards_and_generation_steps_keep_their_order(tmp_path):
    model = _llama()
    inputs = dict(input_ids=torch.randint(3, 60, (1, 6)), max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), TransformerAttentionHooker(model) as memory:
        model.generate(**inputs)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        stream = hooker.stream_to(tmp_path / "capture", shard_bytes=2000)
        model.generate(**inputs)
    # the hooks came off: what waited for its shard was written
    assert stream.closed
    _assert_equal_captures(memory.values, tmp_path / "capture")
    files = sorted(n for n in os.listdir(tmp_path / "capture") if n.endswith(".safetensors"))
    assert all(n.startswith("calls-") for n in files) and 1 < len(files) < 10, files


def test_the_lazy_capture_reads_the_file_only_when_a_call_is_touched(tmp_path):
    model = _llama()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c", shard_bytes=1):
        model(**_batch())
    lazy, read = load(tmp_path / "c"), load(tmp_path / "c", lazy=False)
    name = next(iter(lazy.values))
    file_name = json.loads((tmp_path / "c" / "capture.json").read_text())["files"][0][0][0]
    path = tmp_path / "c" / file_name
    raw = bytearray(path.read_bytes())
    raw[-4:] = torch.tensor([7.0]).numpy().tobytes()  # the last weight of the call, rewritten on disk
    path.write_bytes(bytes(raw))
    assert lazy.values[name][0].flatten()[-1].item() == 7.0, "the lazy call reads the file when touched"
    assert read.values[name][0].flatten()[-1].item() != 7.0, "lazy=False read the call at load"


def test_a_saved_file_can_be_opened_lazily_too(tmp_path):
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(torch.randn(2, 5, 16))
    hooker.save(tmp_path / "a.safetensors")
    lazy = load(tmp_path / "a.safetensors", lazy=True)
    for name, calls in hooker.values.items():
        assert torch.equal(lazy.values[name][0], calls[0])


def test_views_and_analyses_take_a_streamed_capture(tmp_path, minilm_sdpa, minilm_tokenizer):
    from attention_hooker import HeadStatsAccumulator, attention_rollout, plot_attention_grid, render_html

    inputs = minilm_tokenizer(["Streaming keeps memory flat."], return_tensors="pt")
    tokens = minilm_tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as memory:
        minilm_sdpa(**inputs)
    with torch.no_grad(), TransformerAttentionHooker(minilm_sdpa) as hooker:
        with hooker.stream_to(tmp_path / "c") as stream:
            minilm_sdpa(**inputs)
        stream.close(tokens=tokens)
    loaded = load(tmp_path / "c")
    assert loaded.tokens == tokens
    assert torch.allclose(attention_rollout(loaded), attention_rollout(memory))
    stats = HeadStatsAccumulator()
    stats.update(loaded)
    assert stats.layers == list(memory.values)
    name = stats.layers[0]
    figure = plot_attention_grid(loaded.values[name][0], tokens, layer_name=name)
    assert len(figure.axes) >= minilm_sdpa.config.num_attention_heads
    assert render_html(loaded, tokens=tokens).html.startswith("<!DOCTYPE html>")


def test_the_plan_refuses_before_anything_is_written_when_the_disk_is_too_small(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(stream_folder.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 2**20, 2**20))
    model = _llama()
    with pytest.raises(AttentionHookerError, match=r"writes about 1\.5 GiB, and 64\.0 MiB are kept free for everything "
                                                   r"else; 1\.0 MiB free on .*keep less"):
        TransformerAttentionHooker(model).stream_to(tmp_path / "a", expected_bytes=int(1.5 * 2**30))
    ran = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    with TransformerAttentionHooker(model) as hooker:
        hooker.stream_to(tmp_path / "b", shard_bytes=1)
        with pytest.raises(AttentionHookerError, match=r"per call x 2 hooked layers x 1 call\(s\) each\), and "):
            with torch.no_grad():
                model(input_ids=torch.randint(3, 60, (1, 200)))
    assert not [n for n in os.listdir(tmp_path / "b") if "safetensors" in n], "nothing was written"
    # issue 28: a refused capture is not "complete"; what it holds (nothing) is read only when asked
    with pytest.raises(AttentionHookerError, match="is partial: a write failed .*per call x 2 hooked layers.*0 forward"):
        load(tmp_path / "b")
    assert load(tmp_path / "b", partial=True).values == {}


def test_a_forward_cut_short_is_rolled_back_and_the_forwards_that_returned_stay(tmp_path):
    model, first, second = _llama(), _batch(), _batch()
    with torch.no_grad(), TransformerAttentionHooker(model) as memory:
        model(**first)

    def fail(module, args, output):
        raise KeyboardInterrupt

    with TransformerAttentionHooker(model) as hooker:
        hooker.stream_to(tmp_path / "c", shard_bytes=1)
        with torch.no_grad():
            model(**first)
        handle = model.model.layers[1].mlp.register_forward_hook(fail)
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(**second)  # layer 0's call of this forward was written, then the forward stopped
    handle.remove()
    assert not [n for n in os.listdir(tmp_path / "c") if n.endswith(".partial")]
    loaded = _assert_equal_captures(memory.values, tmp_path / "c")
    assert [len(c) for c in loaded.values.values()] == [1, 1], "the interrupted forward is not half there"
    index = json.loads((tmp_path / "c" / "capture.json").read_text())
    assert index["complete"] is True and index["state"] == "complete", "every forward that returned is whole"
    assert index["failures"][0]["forward"] == 1 and "closed" in index["failures"][0]["reason"]
    assert len([n for n in os.listdir(tmp_path / "c") if "safetensors" in n]) == 2, "its files were removed"


def test_a_layer_call_refused_for_its_pieces_leaves_no_file(tmp_path):
    model = nn.Sequential(TwoCallsAttention())
    with pytest.warns(Warning), torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        stream = hooker.stream_to(tmp_path / "c", shard_bytes=1)
        model(torch.randn(1, 6, 16))
        assert not [n for n in os.listdir(tmp_path / "c") if "safetensors" in n]
    assert stream.closed and load(tmp_path / "c").values == {}


def test_stream_to_refuses_what_it_cannot_keep(tmp_path):
    with pytest.raises(AttentionHookerError, match="keep_grad"):
        TransformerAttentionHooker(Stack(), keep_grad=True).stream_to(tmp_path / "a")
    with pytest.raises(AttentionHookerError, match='keep="last"'):
        TransformerAttentionHooker(Stack(), max_calls=2, keep="last").stream_to(tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AttentionHookerError, match="is a file; expected a folder"):
        TransformerAttentionHooker(Stack()).stream_to(tmp_path / "file")
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c"):
        model(torch.randn(1, 4, 16))
    with pytest.raises(AttentionHookerError, match="already holds a capture .*overwrite=True"):
        TransformerAttentionHooker(model).stream_to(tmp_path / "c")
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c", overwrite=True):
        model(torch.randn(1, 7, 16))
    assert next(iter(load(tmp_path / "c").values.values()))[0].shape[-1] == 7
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine", "only our own files were replaced"


def test_load_names_a_folder_that_is_not_a_capture_and_a_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttentionHookerError, match="without capture.json"):
        load(tmp_path / "empty")
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c", shard_bytes=1):
        model(torch.randn(1, 4, 16))
    victim = sorted(n for n in os.listdir(tmp_path / "c") if n.endswith(".safetensors"))[0]
    os.remove(tmp_path / "c" / victim)
    with pytest.raises(AttentionHookerError, match=f"damaged: {victim}"):
        load(tmp_path / "c")


def test_a_call_can_be_streamed_and_pooled_in_one_pass(tmp_path, monkeypatch):
    from attention_hooker import PooledAttention

    monkeypatch.setattr(sdpa, "TILE_BYTES", 1)
    model, inputs = _llama(), _batch()
    with torch.no_grad(), TransformerAttentionHooker(model) as memory:
        model(**inputs)
    pooled = PooledAttention(size=4)
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        hooker.stream_to(tmp_path / "c", shard_bytes=1)
        hooker.reduce_into(pooled)
        model(**inputs)
        assert hooker.values == {}
    _assert_equal_captures(memory.values, tmp_path / "c")
    for name, calls in memory.values.items():
        full = calls[0]  # (2, 4, 13, 13): blocks of 4, 3, 3, 3 positions
        bounds = [0, 4, 7, 10, 13]
        by_hand = torch.stack([torch.stack([full[..., bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]].mean((-2, -1))
                                            for j in range(4)], -1) for i in range(4)], -2)
        torch.testing.assert_close(pooled.values[name][0], by_hand, rtol=1e-5, atol=1e-6)


def test_load_names_unreadable_metadata_of_a_file_and_of_a_folder(tmp_path):
    from safetensors.torch import save_file

    save_file({"0.0": torch.rand(1, 1, 2, 2)}, tmp_path / "other.safetensors",
              metadata={"attention_hooker": json.dumps({"format": "attention-hooker/0"})})
    with pytest.raises(AttentionHookerError, match=r"unreadable attention_hooker metadata \(format "
                                                   r"'attention-hooker/0'\); expected attention-hooker/1"):
        load(tmp_path / "other.safetensors")
    model = Stack().eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "c"):
        model(torch.randn(1, 4, 16))
    index = json.loads((tmp_path / "c" / "capture.json").read_text())
    del index["files"]
    (tmp_path / "c" / "capture.json").write_text(json.dumps(index))
    with pytest.raises(AttentionHookerError, match=r"unreadable capture index \('files'\); expected attention-hooker-stream/1"):
        load(tmp_path / "c")
