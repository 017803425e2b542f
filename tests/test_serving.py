"""Serving-style generation (transformers' continuous batching over a paged KV cache): each
request's attention kept as its own calls, equal to what ``generate()`` of that request alone
captures; the engine's packed batch never stored as if it were one request."""

import logging
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig  # noqa: E402

from attention_hooker import TransformerAttentionHooker, stitch_steps  # noqa: E402
from attention_hooker.errors import AttentionCaptureWarning  # noqa: E402

logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]
NEW = 5


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def _qwen3():
    torch.manual_seed(1)
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=128)
    return transformers.Qwen3ForCausalLM(config).eval()


MODELS = {"llama": _llama, "qwen3": _qwen3}


def _cache(**options):
    """A paged cache sized for these tiny runs (by default the engine fills most of the memory: seconds)."""
    return transformers.ContinuousBatchingConfig(**{"num_blocks": 16, "page_size": 16, **options})


def _batch(model, prompts, eos=None):
    return model.generate_batch(prompts, generation_config=_config(eos), continuous_batching_config=_cache(),
                                progress_bar=False)


def _config(eos=None):
    return GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)


def _alone(model, prompt, eos=None):
    """What generate() of one request alone captures, stitched: ``{layer: (1, H, T, T)}``, and its new tokens."""
    with TransformerAttentionHooker(model) as hooker:
        out = model.generate(torch.tensor([prompt]), generation_config=_config(eos))
    return {name: stitch_steps(calls) for name, calls in hooker.values.items()}, out[0, len(prompt):].tolist()


def _early_eos(model):
    """A token one request generates at its second step and no other request generates before
    its last step: with it as eos, that request finishes early and the others do not."""
    outputs = _batch(model, PROMPTS)
    made = [outputs[f"req_{i}"].generated_tokens for i in range(len(PROMPTS))]
    for i, tokens in enumerate(made):
        token = tokens[1]
        if token not in tokens[:1] and all(token not in other for j, other in enumerate(made) if j != i):
            return i, token
    pytest.skip("no token finishes one request early alone")  # pragma: no cover - fixed seeds


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager", "paged|eager"])
def test_each_request_equals_generate_alone(family, implementation):
    model = MODELS[family]()
    model.set_attn_implementation(implementation)
    early, eos = _early_eos(model)
    with TransformerAttentionHooker(model) as hooker:
        outputs = _batch(model, PROMPTS, eos)
    assert sorted(hooker.requests) == ["req_0", "req_1", "req_2"]
    model.set_attn_implementation(implementation.replace("paged|", ""))  # generate() reads no paged cache
    for i, prompt in enumerate(PROMPTS):
        rid = f"req_{i}"
        expected, tokens = _alone(model, prompt, eos)
        assert outputs[rid].generated_tokens == tokens
        assert (len(tokens) < NEW) == (i == early)
        captured = hooker.requests[rid]
        assert list(captured) == list(expected)
        for layer, calls in captured.items():
            # the prompt, then one call per step: (1, H, 1, positions so far)
            assert calls[0].shape == (1, 4, len(prompt), len(prompt))
            assert [c.shape[-2:] for c in calls[1:]] == [(1, len(prompt) + s) for s in range(1, len(calls))]
            stitched = stitch_steps(calls)
            assert stitched.shape == expected[layer].shape
            torch.testing.assert_close(stitched, expected[layer], atol=1e-6, rtol=0)


def test_the_packed_batch_is_never_stored_as_one_request():
    model = _llama()
    with TransformerAttentionHooker(model) as hooker:
        _batch(model, PROMPTS[:2])
    with pytest.warns(AttentionCaptureWarning, match="hooker.requests"):
        packed = hooker.values
    assert not any(packed.values())  # the old code kept (1, 4, 10, 10) here: both prompts in one row
    shapes = {rid: [tuple(c.shape) for c in calls] for rid, values in hooker.requests.items()
              for calls in values.values()}
    assert shapes == {"req_0": [(1, 4, 7, 7)] + [(1, 4, 1, 7 + s) for s in range(1, NEW)],
                      "req_1": [(1, 4, 3, 3)] + [(1, 4, 1, 3 + s) for s in range(1, NEW)]}
    for values in hooker.requests.values():  # each row is a distribution over the request's own keys
        for calls in values.values():
            for call in calls:
                torch.testing.assert_close(call.sum(-1), torch.ones(call.shape[:-1]))
    assert hooker.report().missing == []


def test_selection_and_max_calls_apply_per_request():
    model = _llama()
    with TransformerAttentionHooker(model, rows="last", heads=[1, 3], max_calls=3) as hooker:
        _batch(model, PROMPTS)
    with TransformerAttentionHooker(model) as whole:
        _batch(model, PROMPTS)
    for rid, values in hooker.requests.items():
        for layer, calls in values.items():
            full = whole.requests[rid][layer]
            assert len(calls) == 3  # the first three of this request, not of the batch
            for kept, call in zip(calls, full):
                torch.testing.assert_close(kept, call[:, [1, 3], -1:])


def test_requests_that_join_late_and_chunked_prefill():
    """The manager's own loop: one request added while another decodes, prompts longer than the
    batch's token budget (prefilled in chunks), requests of different lengths."""
    model = _llama()
    prompts = {"long": list(range(1, 13)), "short": [20, 21], "late": [30, 31, 32, 33]}
    lengths = {"long": 6, "short": 2, "late": 4}
    cb_config = _cache(max_batch_tokens=8)
    with TransformerAttentionHooker(model) as hooker:
        manager = model.init_continuous_batching(generation_config=_config(), continuous_batching_config=cb_config)
        manager.start()
        try:
            for rid in ("long", "short"):
                manager.add_request(prompts[rid], request_id=rid, max_new_tokens=lengths[rid])
            first = manager.get_result(request_id="short", timeout=60)
            while first is not None and not first.is_finished():
                first = manager.get_result(request_id="short", timeout=60)
            manager.add_request(prompts["late"], request_id="late", max_new_tokens=lengths["late"])
            results = {}
            deadline = time.monotonic() + 120
            while len(results) < 2 and time.monotonic() < deadline:
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
        finally:
            manager.stop(block=True, timeout=60)
    assert sorted(hooker.requests) == ["late", "long", "short"]
    for rid, prompt in prompts.items():
        config = _config()
        config.max_new_tokens = lengths[rid]
        with TransformerAttentionHooker(model) as alone:
            model.generate(torch.tensor([prompt]), generation_config=config)
        for layer, calls in hooker.requests[rid].items():
            if rid == "long":  # 12 prompt tokens over a budget of 8 per batch: at least two chunks
                assert calls[0].shape[-2] < len(prompt)
            torch.testing.assert_close(stitch_steps(calls), stitch_steps(alone.values[layer]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_sliding_window_keys_are_placed_at_their_positions(implementation):
    """Mistral with a window of 4: the engine reads only the last keys of each request; they are
    stored at their positions (the dropped ones exact zeros) and each request's stitched map
    equals an eager forward of its whole sequence with output_attentions."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        sliding_window=4)
    model = transformers.MistralForCausalLM(config).eval()
    model.set_attn_implementation(implementation)
    with TransformerAttentionHooker(model) as hooker:
        outputs = _batch(model, PROMPTS)
    model.set_attn_implementation("eager")
    for i, prompt in enumerate(PROMPTS):
        sequence = prompt + outputs[f"req_{i}"].generated_tokens[:-1]  # the last new token is never read
        with torch.no_grad():
            reference = model(torch.tensor([sequence]), output_attentions=True).attentions
        for layer, (calls, expected) in enumerate(zip(hooker.requests[f"req_{i}"].values(), reference)):
            assert calls[-1].shape[-1] == len(sequence) and calls[-1][..., :-4].abs().max() == 0
            torch.testing.assert_close(stitch_steps(calls), expected, atol=1e-6, rtol=0)


def test_one_request_decoding_alone_is_unpacked_per_head():
    """A batch of one decode query: Hugging Face's sdpa packs grouped-query heads as (1, kv_heads,
    groups, dim); each request's call still has every query head, in order."""
    model = _llama()
    with TransformerAttentionHooker(model) as hooker:
        _batch(model, PROMPTS[1:2])
    expected, _ = _alone(model, PROMPTS[1])
    for layer, calls in hooker.requests["req_0"].items():
        assert {c.shape[1] for c in calls} == {4}
        torch.testing.assert_close(stitch_steps(calls), expected[layer], atol=1e-6, rtol=0)


def test_requests_are_summed_into_one_reduction():
    """reduce_into under continuous batching: every request's own calls, none packed."""
    from attention_hooker import HeadStatsAccumulator

    model = _llama()
    with TransformerAttentionHooker(model) as hooker:
        _batch(model, PROMPTS)
    stats = HeadStatsAccumulator()
    with TransformerAttentionHooker(model) as reduced:
        reduced.reduce_into(stats)
        _batch(model, PROMPTS)
    assert sorted(reduced.requests) == ["req_0", "req_1", "req_2"] and not any(reduced.requests["req_0"].values())
    expected = HeadStatsAccumulator()
    for values in hooker.requests.values():
        for layer, calls in values.items():
            for call in calls:
                expected.update({layer: [call]})
    for name in HeadStatsAccumulator.STATISTICS:
        numpy = pytest.importorskip("numpy")
        numpy.testing.assert_allclose(stats.result()[name], expected.result()[name], rtol=1e-6, atol=1e-7)


def test_stream_to_writes_one_folder_per_request(tmp_path):
    from attention_hooker import load

    model = _llama()
    with TransformerAttentionHooker(model) as hooker:
        _batch(model, PROMPTS)
    with TransformerAttentionHooker(model, rows="last") as streamed, streamed.stream_to(tmp_path / "cap"):
        _batch(model, PROMPTS)
    loaded = load(tmp_path / "cap")
    assert not any(loaded.values.values())  # nothing packed at the top
    assert sorted(loaded.requests) == ["req_0", "req_1", "req_2"]
    for rid, saved in loaded.requests.items():
        assert saved.metadata["state"] == "complete" and saved.metadata["request_id"] == rid
        for layer, calls in hooker.requests[rid].items():
            assert len(saved.values[layer]) == len(calls)
            for kept, call in zip(saved.values[layer], calls):
                torch.testing.assert_close(kept, call[:, :, -1:])


def test_a_request_folder_listed_outside_the_capture_is_refused(tmp_path):
    import json

    from attention_hooker import load
    from attention_hooker.errors import AttentionHookerError

    model = _llama()
    with TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "cap"):
        _batch(model, PROMPTS[:1])
    index = tmp_path / "cap" / "capture.json"
    meta = json.loads(index.read_text())
    for bad in ("../../elsewhere", "requests/../..", "/etc"):
        meta["requests"] = {"req_0": bad}
        index.write_text(json.dumps(meta))
        with pytest.raises(AttentionHookerError, match="not a folder requests/<name>"):
            load(tmp_path / "cap").requests


def _served_one_after_another(model, prompts, **cache_options):
    """Each prompt served after the previous one finished (so its blocks are in the prefix cache)."""
    with TransformerAttentionHooker(model) as hooker:
        manager = model.init_continuous_batching(generation_config=_config(),
                                                 continuous_batching_config=_cache(**cache_options))
        manager.start()
        try:
            for rid, prompt in prompts.items():
                manager.add_request(prompt, request_id=rid, max_new_tokens=3)
                result = manager.get_result(request_id=rid, timeout=60)
                while result is not None and not result.is_finished():
                    result = manager.get_result(request_id=rid, timeout=60)
        finally:
            manager.stop(block=True, timeout=60)
    return hooker


def test_a_prompt_read_from_the_prefix_cache_starts_where_the_request_computed():
    """Prefix sharing (on by default): a prompt whose first blocks another request computed is
    computed from its first new position. Its calls hold exactly the rows it computed, each equal
    to the same row of generate() alone; stitching says why it cannot start there, and without
    block sharing every prompt is computed whole."""
    from attention_hooker.errors import AttentionHookerError

    model = _llama()
    shared = list(range(1, 40))  # two full pages of 16, then more
    prompts = {"first": shared, "second": shared + [50, 51, 52]}
    hooker = _served_one_after_another(model, prompts)
    config = _config()
    config.max_new_tokens = 3
    for layer, calls in hooker.requests["second"].items():
        assert calls[0].shape[-2:] == (42 - 32, 42)  # the two shared pages were not computed again
        with TransformerAttentionHooker(model) as alone:
            model.generate(torch.tensor([prompts["second"]]), generation_config=config)
        expected = stitch_steps(alone.values[layer])
        torch.testing.assert_close(calls[0], expected[:, :, 32:42, :42], atol=1e-6, rtol=0)
        with pytest.raises(AttentionHookerError, match="allow_block_sharing=False"):
            stitch_steps(calls)
    whole = _served_one_after_another(model, prompts, allow_block_sharing=False)
    for layer, calls in whole.requests["second"].items():
        assert calls[0].shape[-2:] == (42, 42)


def test_a_second_run_reusing_request_ids_is_never_mixed_with_the_first():
    """Each generate_batch names its requests req_0, req_1...: a second run under the same hooker
    was appended to the first run's requests (with max_calls, another request's prompt took the
    place of a step)."""
    model = _llama()
    with TransformerAttentionHooker(model, max_calls=4) as hooker:
        _batch(model, PROMPTS[:2])
        with pytest.warns(AttentionCaptureWarning, match="another run of the serving engine"):
            _batch(model, [[40, 41]])
    assert sorted(hooker.requests) == ["req_0", "req_0#2", "req_1"]
    for rid, prompt in (("req_0", PROMPTS[0]), ("req_0#2", [40, 41])):
        for calls in hooker.requests[rid].values():
            assert calls[0].shape[-2:] == (len(prompt), len(prompt))
            assert [c.shape[-1] for c in calls] == list(range(len(prompt), len(prompt) + 4))
            stitch_steps(calls)


def test_a_request_evicted_and_prefilled_again_is_kept_apart():
    """A cache too small for every request: the engine evicts one and prefills it again (prompt and
    the tokens generated so far) under the same id. Its positions were stored twice in one
    sequence; now the second prefill begins a new label, which alone is the whole request."""
    model = _llama()
    prompts = [list(range(1, 11)), list(range(11, 21)), list(range(21, 31))]
    config = _config()
    config.max_new_tokens = 30
    with TransformerAttentionHooker(model) as hooker:
        with pytest.warns(AttentionCaptureWarning, match="computed again from position 0"):
            outputs = model.generate_batch(prompts, generation_config=config, progress_bar=False,
                                           continuous_batching_config=_cache(num_blocks=4))
    again = [label for label in hooker.requests if "#" in label]
    assert again
    for label in again:
        rid = label.split("#")[0]
        for calls in hooker.requests[label].values():
            stitched = stitch_steps(calls)  # the whole request: its prompt and every token it read
            assert stitched.shape[-1] == len(prompts[int(rid[-1])]) + len(outputs[rid].generated_tokens) - 1
    for label, values in hooker.requests.items():
        for calls in values.values():
            stitch_steps(calls)  # each label one sequence of positions: no position twice


def test_request_streams_hold_only_their_own_forwards_and_requests(tmp_path):
    """A request's stream opened a unit at every forward of the engine (also after the request
    finished); a stream opened after an earlier run listed that run's requests; each request's
    index listed the requests made before it as folders inside it."""
    from attention_hooker import load

    model = _llama()
    with TransformerAttentionHooker(model) as hooker:
        _batch(model, PROMPTS[:2])  # an earlier run, kept in memory
        with hooker.stream_to(tmp_path / "cap"), pytest.warns(AttentionCaptureWarning, match="another run"):
            outputs = model.generate_batch([[1, 2, 3], [4, 5]], generation_config=_config(), progress_bar=False,
                                           continuous_batching_config=_cache())
    loaded = load(tmp_path / "cap")
    assert sorted(loaded.requests) == ["req_0#2", "req_1#2"]
    for saved in loaded.requests.values():
        assert saved.requests == {}
        steps = len(next(iter(saved.values.values())))
        assert steps == 5 and saved.metadata["whole_units"] == steps  # one unit per forward it took part in
    assert sorted(outputs) == ["req_0", "req_1"]


def test_value_vectors_and_save_point_to_the_requests(tmp_path):
    from attention_hooker import load
    from attention_hooker.errors import AttentionHookerError

    model = _llama()
    with TransformerAttentionHooker(model, keep_values=True) as hooker:
        _batch(model, PROMPTS[:2])
    with pytest.warns(AttentionCaptureWarning, match="request_value_vectors"):
        assert not hooker.value_vectors
    vectors = hooker.request_value_vectors["req_1"]["model.layers.0.self_attn"]
    assert [(v.shape[0], v.shape[2], v.shape[3]) for v in vectors] == [(1, 3 + s, 8) for s in range(NEW)]
    with pytest.raises(AttentionHookerError, match="request="):
        hooker.save(tmp_path / "all.safetensors")
    hooker.save(tmp_path / "one.safetensors", request="req_1")
    saved = load(tmp_path / "one.safetensors").values
    for layer, calls in hooker.requests["req_1"].items():
        assert all(torch.equal(a, b) for a, b in zip(saved[layer], calls))


def test_keep_last_keeps_each_requests_most_recent_calls():
    model = _llama()
    with TransformerAttentionHooker(model, max_calls=2, keep="last") as hooker:
        _batch(model, PROMPTS)
    with TransformerAttentionHooker(model) as whole:
        _batch(model, PROMPTS)
    for rid, values in hooker.requests.items():
        for layer, calls in values.items():
            assert [c.shape for c in calls] == [c.shape for c in whole.requests[rid][layer][-2:]]
            assert all(torch.equal(a, b) for a, b in zip(calls, whole.requests[rid][layer][-2:]))
