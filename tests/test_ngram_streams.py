"""ProphetNet's n-gram self-attention (issue 24): the main stream stored as the layer's
``(batch, heads, T, K)`` map, each predict stream as its own entry ``"<layer>:ngram<s>"``
``(batch, heads, T, K + T)`` (keys: the main keys, then the stream's own positions), never as
token attention.

Oracles: transformers' own ``decoder_attentions`` and ``decoder_ngram_attentions`` (the two
softmaxes of the layer), and, by hand from the module's own weights, each map times its values
(``value_proj`` of the layer's input: the main values, then ``[main; stream s]``) equal to what
the layer hands its ``out_proj`` for that stream, on a padded batch and during ``generate``,
where the past main values come from the earlier steps' inputs.

The decoder's cross-attention (one softmax over the main and predict streams' rows) is checked the
same way: against transformers' ``cross_attentions`` cut by rows here, and each entry times the
encoder's values against what the layer hands ``out_proj`` at that stream's rows.
"""

from __future__ import annotations

import pytest
import torch

from attention_hooker import TransformerAttentionHooker

transformers = pytest.importorskip("transformers")

NGRAM, HEADS, WIDTH = 2, 4, 32


def _config():
    return transformers.ProphetNetConfig(
        vocab_size=64, hidden_size=WIDTH, num_encoder_attention_heads=HEADS, num_decoder_attention_heads=HEADS,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=2, num_decoder_layers=2, ngram=NGRAM,
        num_buckets=8, relative_max_distance=16, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)


def _model(kind=transformers.ProphetNetModel):
    torch.manual_seed(0)
    return kind(_config()).eval()


def _padded_inputs():
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    decoder = torch.randint(3, 60, (2, 5))
    decoder_mask = torch.ones(2, 5, dtype=torch.long)
    decoder_mask[1, -1:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, decoder_attention_mask=decoder_mask)


def _self_attentions(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "ProphetNetNgramSelfAttention"]


class _ProjectionInputs:
    """Per n-gram layer, per call: the layer's input and what it hands ``out_proj`` (main, then predict)."""

    def __init__(self, model):
        self.calls = {}
        self.handles = []
        for name, module in _self_attentions(model):
            self.calls[name] = []
            self.handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: self.calls[name].append(
                    {"hidden": args[0] if args else kwargs["hidden_states"], "out_proj": []}), with_kwargs=True))
            self.handles.append(module.out_proj.register_forward_pre_hook(
                lambda m, args, name=name: self.calls[name][-1]["out_proj"].append(args[0])))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _heads(x, module):
    """``(B, N, C)`` -> ``(B, H, N, d)``."""
    return x.view(x.shape[0], x.shape[1], module.num_attn_heads, -1).transpose(1, 2)


def _merged(x):
    """``(B, H, N, d)`` -> ``(B, N, H * d)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def test_main_stream_and_each_ngram_stream_equal_transformers_own_attentions_outputs_unchanged():
    model, inputs = _model(), _padded_inputs()
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True)
        with TransformerAttentionHooker(model) as hooker:
            hooked = model(**inputs)
    assert torch.equal(hooked.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(hooked.last_hidden_state_ngram, reference.last_hidden_state_ngram)
    assert hooker.report().missing == []
    for i, (name, _) in enumerate(_self_attentions(model)):
        main = hooker.values[name]
        assert len(main) == 1 and main[0].shape == (2, HEADS, 5, 5)
        assert torch.equal(main[0], reference.decoder_attentions[i])
        for s in range(NGRAM):
            stream = hooker.values[f"{name}:ngram{s + 1}"]
            assert len(stream) == 1 and stream[0].shape == (2, HEADS, 5, 10)
            assert torch.equal(stream[0], reference.decoder_ngram_attentions[i][:, s])


def test_each_stored_map_times_its_values_is_what_the_layer_hands_out_proj():
    model, inputs = _model(), _padded_inputs()
    seen = _ProjectionInputs(model)
    try:
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            model(**inputs)
    finally:
        seen.remove()
    t = 5
    for name, module in _self_attentions(model):
        (call,) = seen.calls[name]
        with torch.no_grad():
            value = _heads(module.value_proj(call["hidden"]), module)  # (B, H, 3T, d)
        main_value = value[:, :, :t]
        main_out, predict_out = call["out_proj"]  # (B, 1, T, C), (B, n, T, C)
        torch.testing.assert_close(_merged(hooker.values[name][0] @ main_value), main_out[:, 0], atol=1e-6, rtol=0)
        for s in range(1, NGRAM + 1):
            stream = hooker.values[f"{name}:ngram{s}"][0]  # (B, H, T, 2T)
            values = torch.cat([main_value, value[:, :, s * t:(s + 1) * t]], 2)
            torch.testing.assert_close(_merged(stream @ values), predict_out[:, s - 1], atol=1e-6, rtol=0)
            # Stream query t sees the main keys up to t and, of its own positions, only t itself.
            query, key = torch.arange(t)[:, None], torch.arange(t)[None, :]
            assert (stream[..., :t][..., key > query] == 0).all()
            assert (stream[..., t:][..., key != query] == 0).all()
            torch.testing.assert_close(stream.sum(-1), torch.ones(2, HEADS, t))


def test_generate_stores_every_step_main_and_streams_against_the_cache():
    model = _model(transformers.ProphetNetForConditionalGeneration)
    inputs = _padded_inputs()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3,
                  min_new_tokens=3, do_sample=False, num_beams=1)
    with torch.no_grad():
        reference = model.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
    seen = _ProjectionInputs(model)
    try:
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            tokens = model.generate(**kwargs)
    finally:
        seen.remove()
    assert torch.equal(tokens, reference.sequences)
    assert hooker.report().missing == []
    for i, (name, module) in enumerate(_self_attentions(model)):
        steps = seen.calls[name]
        assert len(hooker.values[name]) == len(steps) == len(reference.decoder_attentions) == 3
        past = []
        for step, call in enumerate(steps):
            main = hooker.values[name][step]
            assert main.shape == (2, HEADS, 1, step + 1)
            assert torch.equal(main, reference.decoder_attentions[step][i])
            with torch.no_grad():
                value = _heads(module.value_proj(call["hidden"]), module)  # (B, H, 3, d): this step only
            past.append(value[:, :, :1])
            main_value = torch.cat(past, 2)  # the cache: every step's main value so far
            main_out, predict_out = call["out_proj"]
            torch.testing.assert_close(_merged(main @ main_value), main_out[:, 0], atol=1e-6, rtol=0)
            for s in range(1, NGRAM + 1):
                stream = hooker.values[f"{name}:ngram{s}"][step]
                assert stream.shape == (2, HEADS, 1, step + 2)
                values = torch.cat([main_value, value[:, :, s:s + 1]], 2)
                torch.testing.assert_close(_merged(stream @ values), predict_out[:, s - 1], atol=1e-6, rtol=0)


def test_selections_apply_to_each_entry_on_its_own_axes_and_keep_values_keeps_each_streams_values():
    model, inputs = _model(), _padded_inputs()
    with torch.no_grad():
        with TransformerAttentionHooker(model, layer_regex=r"decoder\.layers\.0\.self_attn$") as whole:
            model(**inputs)
        with TransformerAttentionHooker(model, layer_regex=r"decoder\.layers\.0\.self_attn$", heads=[1, 3],
                                        rows=[4], keys=[0, 2]) as chosen:
            model(**inputs)
        with TransformerAttentionHooker(model, layer_regex=r"decoder\.layers\.0\.self_attn$",
                                        keep_values=True) as kept:
            model(**inputs)
    name, module = _self_attentions(model)[0]
    assert sorted(chosen.values) == sorted(whole.values) == [name, f"{name}:ngram1", f"{name}:ngram2"]
    for entry, calls in whole.values.items():
        assert torch.equal(chosen.values[entry][0], calls[0][:, [1, 3]][:, :, [4]][..., [0, 2]])
        assert torch.equal(kept.values[entry][0], calls[0])
    main_value = kept.value_vectors[name][0]
    assert main_value.shape == (2, HEADS, 5, WIDTH // HEADS)
    for s in (1, 2):
        value = kept.value_vectors[f"{name}:ngram{s}"][0]
        assert value.shape == (2, HEADS, 10, WIDTH // HEADS)
        assert torch.equal(value[:, :, :5], main_value)


def test_keep_values_while_generating_with_a_cache_is_refused_with_its_reason():
    model = _model(transformers.ProphetNetForConditionalGeneration)
    inputs = _padded_inputs()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"decoder\.layers\.0\.self_attn$",
                                                     keep_values=True) as hooker:
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, num_beams=1)
    name = "prophetnet.decoder.layers.0.self_attn"
    report = hooker.report()[name]
    assert len(hooker.values[name]) == 1  # the first step has no past
    assert report.refused == 1 and "cache" in report.reason and "keep_values" in report.reason
    assert len(hooker.values[f"{name}:ngram1"]) == 1


def test_an_input_that_is_not_main_plus_streams_is_refused_and_other_prophetnet_attention_is_ordinary():
    model = _model()
    name, module = _self_attentions(model)[0]
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        with pytest.raises(Exception):  # 7 positions cannot be 3 streams of equal length: the module fails too
            module(torch.randn(2, 7, WIDTH))
    report = hooker.report()
    assert report[name].refused == 1 and "cannot be told apart" in report[name].reason
    assert dict(hooker.values) == {}
    # The encoder's and the cross attention (ProphetNetAttention) are not n-gram layers.
    from attention_hooker.capture.ngram import ngram_layer

    assert ngram_layer(module) is not None
    assert all(ngram_layer(m) is None for n, m in model.named_modules() if n.endswith(("encoder.layers.0.self_attn",
                                                                                       "cross_attn")))


def test_stream_entries_are_streamed_to_disk_counted_by_max_calls_and_kept_in_the_models_dtype(tmp_path):
    from attention_hooker import load

    model, inputs = _model(), _padded_inputs()
    with torch.no_grad():
        with TransformerAttentionHooker(model) as whole:
            model(**inputs)
        with TransformerAttentionHooker(model) as hooker, hooker.stream_to(tmp_path / "capture"):
            model(**inputs)  # the keepers take tiles: each entry is written a block of rows at a time
        with TransformerAttentionHooker(model, max_calls=1) as limited:
            model(**inputs)
            model(**inputs)
    loaded = load(tmp_path / "capture").values
    assert sorted(loaded) == sorted(whole.values) and len(whole.values) == 6 + 2 * 2 * NGRAM  # self and cross
    for name, calls in whole.values.items():
        assert torch.equal(loaded[name][0], calls[0])
        assert len(limited.values[name]) == 1
    half = _model().to(torch.bfloat16)
    with torch.no_grad():
        reference = half(**inputs, output_attentions=True)
        with TransformerAttentionHooker(half) as hooker:
            half(**inputs)
    name = _self_attentions(half)[0][0]
    assert hooker.values[name][0].dtype == torch.bfloat16  # computed in float32, multiplied in the model's dtype
    assert torch.equal(hooker.values[name][0], reference.decoder_attentions[0])
    assert torch.equal(hooker.values[f"{name}:ngram2"][0], reference.decoder_ngram_attentions[0][:, 1])
    cross, full = "decoder.layers.0.cross_attn", reference.cross_attentions[0].softmax(-1)  # masked bf16 scores
    assert hooker.values[cross][0].dtype == torch.bfloat16 and torch.equal(hooker.values[cross][0], full[:, :, :5])
    assert torch.equal(hooker.values[f"{cross}:ngram2"][0], full[:, :, 10:15])


def test_rollout_over_stream_entries_says_they_are_stream_positions_not_cross_attention():
    import attention_hooker as ah

    model = _model()
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"decoder\.layers\.\d\.self_attn$") as hooker:
        model(**_padded_inputs())
    assert "decoder.layers.0.self_attn:ngram1" in hooker.values
    with pytest.raises(ah.AttentionHookerError, match="n-gram stream 1") as refused:
        ah.attention_rollout(hooker)
    assert "stream's positions" in str(refused.value) and "cross-attention" not in str(refused.value)


def _cross_attentions(model):
    return [(name, m) for name, m in model.named_modules()
            if name.endswith(("decoder.layers.0.cross_attn", "decoder.layers.1.cross_attn"))]


class _CrossCalls:
    """Per decoder cross-attention, per call: the encoder states it was given and what it hands ``out_proj``."""

    def __init__(self, model):
        self.calls, self.handles = {}, []
        for name, module in _cross_attentions(model):
            self.calls[name] = []
            self.handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: self.calls[name].append(
                    {"source": kwargs["key_value_states"], "out_proj": None}), with_kwargs=True))
            self.handles.append(module.out_proj.register_forward_pre_hook(
                lambda m, args, name=name: self.calls[name][-1].update(out_proj=args[0])))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_cross_attention_main_rows_are_the_layers_map_each_streams_rows_its_own_entry_times_values_is_context():
    model, inputs = _model(), _padded_inputs()
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True)
    seen = _CrossCalls(model)
    try:
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            hooked = model(**inputs)
    finally:
        seen.remove()
    assert torch.equal(hooked.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(hooked.last_hidden_state_ngram, reference.last_hidden_state_ngram)
    assert hooker.report().missing == []
    t = 5
    for i, (name, module) in enumerate(_cross_attentions(model)):
        full = reference.cross_attentions[i].softmax(-1)  # transformers returns the masked scores (B, H, 3T, S)
        assert full.shape == (2, HEADS, (1 + NGRAM) * t, 7)
        (call,) = seen.calls[name]
        with torch.no_grad():
            value = _heads(module.value_proj(call["source"]), module)  # (B, H, S, d)
        main = hooker.values[name]
        assert len(main) == 1 and main[0].shape == (2, HEADS, t, 7)
        assert torch.equal(main[0], full[:, :, :t])
        torch.testing.assert_close(_merged(main[0] @ value), call["out_proj"][:, :t], atol=1e-6, rtol=0)
        assert (main[0][1, :, :, -2:] == 0).all()  # the source's padding is not attended
        for s in range(1, NGRAM + 1):
            stream = hooker.values[f"{name}:ngram{s}"]
            assert len(stream) == 1 and stream[0].shape == (2, HEADS, t, 7)
            assert torch.equal(stream[0], full[:, :, s * t:(s + 1) * t])
            torch.testing.assert_close(_merged(stream[0] @ value), call["out_proj"][:, s * t:(s + 1) * t],
                                       atol=1e-6, rtol=0)


def test_generate_stores_each_steps_cross_attention_main_and_stream_rows():
    model = _model(transformers.ProphetNetForConditionalGeneration)
    inputs = _padded_inputs()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3,
                  min_new_tokens=3, do_sample=False, num_beams=1)
    with torch.no_grad():
        reference = model.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
    seen = _CrossCalls(model)
    try:
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            tokens = model.generate(**kwargs)
    finally:
        seen.remove()
    assert torch.equal(tokens, reference.sequences)
    assert hooker.report().missing == []
    for i, (name, module) in enumerate(_cross_attentions(model)):
        steps = seen.calls[name]
        assert len(hooker.values[name]) == len(steps) == len(reference.cross_attentions) == 3
        with torch.no_grad():  # the encoder's states are the same at every step (the cache holds their values)
            value = _heads(module.value_proj(steps[0]["source"]), module)
        for step, call in enumerate(steps):
            full = reference.cross_attentions[step][i].softmax(-1)  # (B, H, 1 + n, S): one row per stream
            main = hooker.values[name][step]
            assert main.shape == (2, HEADS, 1, 7) and torch.equal(main, full[:, :, :1])
            torch.testing.assert_close(_merged(main @ value), call["out_proj"][:, :1], atol=1e-6, rtol=0)
            for s in range(1, NGRAM + 1):
                stream = hooker.values[f"{name}:ngram{s}"][step]
                assert stream.shape == (2, HEADS, 1, 7) and torch.equal(stream, full[:, :, s:s + 1])
                torch.testing.assert_close(_merged(stream @ value), call["out_proj"][:, s:s + 1], atol=1e-6, rtol=0)


def test_cross_attention_selections_per_entry_keep_values_and_its_refusal_on_cached_steps():
    model, inputs = _model(), _padded_inputs()
    layer = r"decoder\.layers\.0\.cross_attn$"
    seen = _CrossCalls(model)
    try:
        with torch.no_grad():
            with TransformerAttentionHooker(model, layer_regex=layer) as whole:
                model(**inputs)
            with TransformerAttentionHooker(model, layer_regex=layer, heads=[0, 2], rows=[1, 4], keys=[6, 3]) as chosen:
                model(**inputs)
            with TransformerAttentionHooker(model, layer_regex=layer, keep_values=True) as kept:
                model(**inputs)
    finally:
        seen.remove()
    name, module = _cross_attentions(model)[0]
    assert sorted(chosen.values) == sorted(whole.values) == [name, f"{name}:ngram1", f"{name}:ngram2"]
    with torch.no_grad():
        value = _heads(module.value_proj(seen.calls[name][-1]["source"]), module)
    for entry, calls in whole.values.items():
        assert torch.equal(chosen.values[entry][0], calls[0][:, [0, 2]][:, :, [1, 4]][..., [6, 3]])
        assert torch.equal(kept.values[entry][0], calls[0])
        assert torch.equal(kept.value_vectors[entry][0], value)  # every stream multiplies the encoder's values
    generator = _model(transformers.ProphetNetForConditionalGeneration)
    with torch.no_grad(), TransformerAttentionHooker(generator, layer_regex=layer, keep_values=True) as hooker:
        generator.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2,
                           min_new_tokens=2, do_sample=False, num_beams=1)
    name = "prophetnet.decoder.layers.0.cross_attn"
    report = hooker.report()[name]
    assert len(hooker.values[name]) == len(hooker.values[f"{name}:ngram1"]) == 1  # the first step computes them
    assert report.refused == 1 and "cache" in report.reason and "keep_values" in report.reason


def test_the_cross_attention_rule_takes_the_decoders_cross_attn_only():
    from attention_hooker.capture.ngram_cross import ngram_cross_layer

    model = _model()
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    found = {name for name, m in model.named_modules() if ngram_cross_layer(m, parents) is not None}
    assert found == {"decoder.layers.0.cross_attn", "decoder.layers.1.cross_attn"}
    assert ngram_cross_layer(model.decoder.layers[0].cross_attn, None) is None  # no place known: not taken
