"""Speech (issue 23, part 5): encoder frames as seconds, and token timestamps read from a capture of Whisper's
cross-attention, checked against what Whisper's own ``generate(return_token_timestamps=True)`` computes from
its eager cross-attentions (same alignment heads, same numbers), and against the models' own code paths."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.whisper import generation_whisper  # noqa: E402

from attention_hooker import (AttentionHookerError, AudioFrames, TransformerAttentionHooker,  # noqa: E402
                              align_tokens, audio_frames, plot_token_alignment)
from attention_hooker.analysis.speech_alignment import (cross_attention_steps, median_filter,  # noqa: E402
                                                        time_warping_path)

HEADS = [[1, 0], [1, 2], [0, 3]]
MEL_FRAMES = 60  # 2 * max_source_positions: Whisper's fixed window, 30 encoder frames
GENERATE = dict(max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True)


def tiny_whisper(implementation: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, d_model=32,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, num_mel_bins=8, max_source_positions=30,
        max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        init_std=0.2, suppress_tokens=None, begin_suppress_tokens=None, median_filter_width=3,
        attn_implementation=implementation)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    model.generation_config.alignment_heads = HEADS
    model.generation_config.no_timestamps_token_id = 99  # no token of this vocabulary is a timestamp
    return model


def pair(seed: int = 0):
    eager = tiny_whisper("eager", seed)
    sdpa = tiny_whisper("sdpa", seed)
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    return eager, sdpa


@pytest.fixture(autouse=True)
def _quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _whisper_and_ours(seed: int, batch: int, **generate):
    eager, sdpa = pair(seed)
    torch.manual_seed(100 + seed)
    features = torch.randn(batch, 8, MEL_FRAMES)
    with torch.no_grad():
        reference = eager.generate(features, return_token_timestamps=True, **GENERATE, **generate)
        with TransformerAttentionHooker(sdpa, layer_regex=r"encoder_attn$") as hooker:
            out = sdpa.generate(features, **GENERATE, **generate)
    assert torch.equal(out["sequences"], reference["sequences"])
    return reference, hooker, sdpa, out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 2])
def test_sdpa_capture_gives_whisper_own_token_timestamps(seed, batch):
    reference, hooker, model, _ = _whisper_and_ours(seed, batch)
    found = align_tokens(hooker, model.generation_config.alignment_heads, audio=audio_frames(model),
                         median_filter_width=model.config.median_filter_width)
    expected = reference["token_timestamps"]
    assert found.times.shape == expected.shape == reference["sequences"].shape
    torch.testing.assert_close(found.times, expected, atol=1e-6, rtol=0)
    assert found.prompt_tokens == 2  # decoder start + no-timestamps
    assert len(set(expected[:, 2:].flatten().tolist())) > 4, "the timestamps tell tokens apart (the check can fail)"
    if batch == 2:
        assert not torch.equal(expected[0], expected[1]), "the two rows are aligned differently"
    for b, (positions, frames) in enumerate(found.paths):
        assert positions[0] == found.prompt_tokens and frames[0] == 0
        assert (np.diff(positions) >= 0).all() and (np.diff(frames) >= 0).all()
        assert frames[-1] == found.matrices[b].shape[1] - 1
    torch.testing.assert_close(found.end[:, :-1], found.times[:, 1:], atol=0, rtol=0)


@pytest.mark.parametrize("seed", [0, 5])
def test_beam_search_read_through_beam_indices_gives_whisper_own_timestamps(seed):
    reference, hooker, model, out = _whisper_and_ours(seed, 2, num_beams=3)
    beams = out["beam_indices"]  # the capturing run's own
    assert torch.equal(beams, reference["beam_indices"])
    assert beams.max() >= 3, "the second sequence's beams are slots 3..5 of the capture"
    found = align_tokens(hooker, HEADS, audio=audio_frames(model), median_filter_width=3, beam_indices=beams)
    torch.testing.assert_close(found.times, reference["token_timestamps"], atol=1e-6, rtol=0)
    slot_by_slot = align_tokens(hooker, HEADS, audio=audio_frames(model), median_filter_width=3)
    assert slot_by_slot.times.shape[0] == 6  # without beam_indices: slots, not sequences
    wrong = torch.full((2, 12), 9)
    wrong[:, 0] = 0
    with pytest.raises(AttentionHookerError, match="names slots 0..9; the capture has 6"):
        align_tokens(hooker, HEADS, audio=audio_frames(model), beam_indices=wrong)
    ragged = beams.clone()
    ragged[0, -2:] = -1
    with pytest.raises(AttentionHookerError, match="end at different steps"):
        align_tokens(hooker, HEADS, audio=audio_frames(model), beam_indices=ragged)


def test_eager_capture_during_whisper_own_timestamps_equals_its_returned_tensors():
    """The hooker on the eager model while that same model computes its own timestamps: the calls it stored
    are the cross-attentions generate returns, and they give the same timestamps."""
    eager = tiny_whisper("eager", 3)
    features = torch.randn(2, 8, MEL_FRAMES)
    with torch.no_grad(), TransformerAttentionHooker(eager) as hooker:  # every attention layer: cross found by name
        reference = eager.generate(features, return_token_timestamps=True, **GENERATE)
    assert len(hooker.values) == 6
    for layer in range(2):
        calls = hooker.values[f"model.decoder.layers.{layer}.encoder_attn"]
        returned = [step[layer] for step in reference["cross_attentions"]]
        assert len(calls) == len(returned)
        torch.testing.assert_close(cross_attention_steps(calls), torch.cat(returned, dim=2), atol=0, rtol=0)
    found = align_tokens(hooker.values, HEADS, audio=audio_frames(eager), median_filter_width=3)
    torch.testing.assert_close(found.times, reference["token_timestamps"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("lengths", [(44, 44), (60, 41)])
def test_audio_shorter_than_the_window_reads_only_its_frames(lengths):
    """With the feature extractor's attention_mask, Whisper keeps mask.sum(-1) // 2 encoder frames (all rows
    alike when the lengths agree, each its own otherwise); frames= does the same."""
    mask = torch.zeros(2, MEL_FRAMES, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    reference, hooker, model, _ = _whisper_and_ours(4, 2, attention_mask=mask)
    frames = mask.sum(-1) // 2
    found = align_tokens(hooker, HEADS, audio=audio_frames(model), frames=frames, median_filter_width=3)
    torch.testing.assert_close(found.times, reference["token_timestamps"], atol=1e-6, rtol=0)
    assert [m.shape[1] for m in found.matrices] == frames.tolist()
    assert found.times.max() <= (frames.max() - 1) * 0.02 + 1e-6
    whole = align_tokens(hooker, HEADS, audio=audio_frames(model), median_filter_width=3)
    assert not torch.equal(whole.times, found.times), "reading all 30 frames gives other times (the check can fail)"


def test_time_warping_matches_whisper_dynamic_time_warping_ties_included():
    generator = np.random.default_rng(0)
    for trial in range(60):
        rows, frames = generator.integers(1, 9), generator.integers(1, 14)
        if trial % 2:  # small integers: many ties, where the tie rule decides the path
            cost = generator.integers(-2, 3, size=(rows, frames)).astype(np.float64)
        else:
            cost = generator.standard_normal((rows, frames))
        tokens, times = time_warping_path(cost)
        their_tokens, their_times = generation_whisper._dynamic_time_warping(cost)
        np.testing.assert_array_equal(tokens, their_tokens)
        np.testing.assert_array_equal(times, their_times)


@pytest.mark.parametrize("width", [1, 3, 7])
def test_median_filter_matches_whisper_median_filter(width):
    values = torch.randint(-3, 4, (2, 3, 5, 11)).float()  # ties
    for n in (1, 2, 3, 4, 11):
        torch.testing.assert_close(median_filter(values[..., :n], width),
                                   generation_whisper._median_filter(values[..., :n], width), atol=0, rtol=0)
    with pytest.raises(AttentionHookerError, match="odd positive"):
        median_filter(values, 4)


def test_whisper_frames_are_20_ms_as_whisper_own_timestamps_and_feature_extractor_say():
    model = tiny_whisper("sdpa")
    frames = audio_frames(model)
    assert isinstance(frames, AudioFrames) and frames.window_frames == 30
    precision = inspect.signature(model._extract_token_timestamps).parameters["time_precision"].default
    assert frames.seconds_per_frame == precision == 0.02
    extractor = transformers.WhisperFeatureExtractor(feature_size=8)
    assert audio_frames(model, extractor) == frames  # the class's own defaults are the ones assumed
    slower = transformers.WhisperFeatureExtractor(feature_size=8, hop_length=320)
    assert audio_frames(model, slower).seconds_per_frame == 0.04
    # The encoder's convolutions: 60 mel frames give the 30 frames its attention sees.
    assert frames.encoder_frames(MEL_FRAMES) == 30
    with torch.no_grad():
        states = model.model.encoder(torch.randn(1, 8, MEL_FRAMES)).last_hidden_state
    assert states.shape[1] == 30


def test_whisper_frame_seconds_against_an_impulse_through_the_feature_extractor_and_encoder_convs():
    """A click at 0.5 s: the feature extractor puts it in mel frame 50, and the encoder's convolutions make
    frame 25 the one centred on that mel frame; seconds(25) is 0.5."""
    extractor = transformers.WhisperFeatureExtractor(feature_size=8, chunk_length=2)
    audio = np.zeros(32000, dtype=np.float32)
    audio[8000] = 1.0
    features = extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"][0]  # (mels, frames)
    assert int(features.sum(0).argmax()) == 50
    model = tiny_whisper("eager")
    mel = torch.zeros(1, 8, MEL_FRAMES, requires_grad=True)
    encoder = model.model.encoder
    hidden = torch.nn.functional.gelu(encoder.conv2(torch.nn.functional.gelu(encoder.conv1(mel))))
    hidden[0, :, 25].sum().backward()
    read = mel.grad[0].abs().sum(0).nonzero().flatten().tolist()  # the mel frames encoder frame 25 reads
    assert (min(read) + max(read)) / 2 == 50
    assert audio_frames(model).seconds(25) == 0.5 and audio_frames(model).frame_at(0.5) == 25


def _frames_read(convs_forward, samples: int, frame: int, channels: int) -> list:
    x = torch.randn(1, channels, samples, requires_grad=True)
    out = convs_forward(x)[0, :, frame]
    (out * torch.randn(out.shape)).sum().backward()  # a random read of the frame (a sum is 0 after a LayerNorm)
    return x.grad[0].abs().sum(0).nonzero().flatten().tolist()


def test_wav2vec2_frames_against_its_feature_encoder():
    config = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, conv_dim=(8, 8, 8), conv_stride=(5, 2, 2),
                                         conv_kernel=(10, 3, 3), num_feat_extract_layers=3,
                                         feat_extract_norm="layer")  # "group" norms over all of time: no locality
    model = transformers.Wav2Vec2Model(config).eval()
    frames = audio_frames(model)
    assert frames.seconds_per_frame == 20 / 16000
    for n in (400, 401, 999):
        assert frames.encoder_frames(n) == int(model._get_feat_extract_output_lengths(n))
    read = _frames_read(lambda x: model.feature_extractor(x[:, 0]), 400, 7, 1)
    centre = (read[0] + read[-1]) / 2  # samples frame 7 reads, from the model's own convolutions
    assert frames.seconds(7) == pytest.approx(centre / 16000, abs=1e-12)
    assert audio_frames(model, transformers.Wav2Vec2FeatureExtractor(sampling_rate=8000)).seconds_per_frame == 20 / 8000


def test_speech_to_text_frames_against_its_subsampler():
    config = transformers.Speech2TextConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                            decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                                            conv_channels=8, input_feat_per_channel=4, vocab_size=50,
                                            conv_kernel_sizes=(5, 5))
    model = transformers.Speech2TextModel(config).eval()
    frames = audio_frames(model)
    assert frames.seconds_per_frame == pytest.approx(0.04) and frames.first_centre == 0.0125
    subsample = model.encoder.conv
    for n in (37, 40, 41):
        with torch.no_grad():
            out = subsample(torch.zeros(1, n, 4))
        assert frames.encoder_frames(n) == out.shape[1]
    read = _frames_read(lambda x: subsample(x.transpose(1, 2)).transpose(1, 2), 40, 3, 4)
    assert (read[0] + read[-1]) / 2 == 3 * 4  # encoder frame 3 is centred on filter-bank frame 12
    assert frames.seconds(3) == pytest.approx(0.0125 + 12 * 0.01)


def test_unknown_models_and_broken_extractors_are_refused():
    with pytest.raises(AttentionHookerError, match="no frame-to-time rule for model_type 'bert'"):
        audio_frames(transformers.BertConfig())
    with pytest.raises(AttentionHookerError, match="hop_length"):
        audio_frames(transformers.WhisperConfig(), transformers.Wav2Vec2FeatureExtractor())
    with pytest.raises(AttentionHookerError, match="add_adapter"):
        audio_frames(transformers.Wav2Vec2Config(add_adapter=True))


def test_captures_that_are_not_one_generation_are_refused():
    _, sdpa = pair(0)
    features = torch.randn(2, 8, MEL_FRAMES)
    with torch.no_grad(), TransformerAttentionHooker(sdpa, layer_regex=r"encoder_attn$") as hooker:
        sdpa.generate(features, **GENERATE)
        sdpa.generate(features[:1], **GENERATE)  # a second generation, of another batch
    with pytest.raises(AttentionHookerError, match="share batch, heads and encoder frames"):
        align_tokens(hooker, HEADS, audio=audio_frames(sdpa))
    with torch.no_grad(), TransformerAttentionHooker(sdpa, layer_regex=r"encoder_attn$") as hooker:
        sdpa.generate(features, **GENERATE)
        sdpa.generate(features, **GENERATE)  # the same batch again: the second prefill gives it away
    with pytest.raises(AttentionHookerError, match=r"queries; one generate\(\) with a KV cache .* second generation"):
        align_tokens(hooker, HEADS, audio=audio_frames(sdpa))
    with torch.no_grad(), TransformerAttentionHooker(sdpa, layer_regex=r"encoder_attn$") as hooker:
        sdpa.generate(features, use_cache=False, **GENERATE)
    with pytest.raises(AttentionHookerError, match=r"\[2, 3, 4, 5, 6, 7\]\.\.\. queries.*use_cache=False"):
        align_tokens(hooker, HEADS, audio=audio_frames(sdpa))
    with torch.no_grad(), TransformerAttentionHooker(sdpa, layer_regex=r"layers\.0\.encoder_attn$") as hooker:
        sdpa.generate(features, **GENERATE)
    with pytest.raises(AttentionHookerError, match=r"alignment head \(1, 0\) is in decoder layer 1, which the capture"):
        align_tokens(hooker, HEADS, audio=audio_frames(sdpa))
    with pytest.raises(AttentionHookerError, match="decoder layer 0 has 4 heads"):
        align_tokens(hooker, [(0, 4)], audio=audio_frames(sdpa))
    with pytest.raises(AttentionHookerError, match="at least 2 are needed"):
        align_tokens(hooker, [(0, 1)], audio=audio_frames(sdpa), prompt_tokens=12)
    with pytest.raises(AttentionHookerError, match="frames"):
        align_tokens(hooker, [(0, 1)], audio=audio_frames(sdpa), frames=31)
    with pytest.raises(AttentionHookerError, match="audio is a float"):
        align_tokens(hooker, [(0, 1)], audio=0.02)
    with pytest.raises(AttentionHookerError, match="no captured layer is named"):
        align_tokens({"model.encoder.layers.0.self_attn": [torch.ones(1, 1, 2, 2) / 2]}, [(0, 0)],
                     audio=audio_frames(sdpa))


def test_a_frame_no_token_tells_apart_is_refused_not_turned_into_nan():
    uniform = torch.full((1, 1, 4, 5), 0.2)
    uniform[..., :4] = torch.eye(4) * 0.6 + 0.05  # rows sum to 1; frame 4 gets 0.2 from every row
    with pytest.raises(AttentionHookerError, match="encoder frame 4 has the same weight for every aligned token"):
        align_tokens([uniform], [(0, 0)], audio=audio_frames(tiny_whisper("sdpa")), prompt_tokens=0)


def test_alignment_view_draws_tokens_against_seconds(tmp_path):
    reference, hooker, model, _ = _whisper_and_ours(0, 1)
    found = align_tokens(hooker, HEADS, audio=audio_frames(model), median_filter_width=3)
    tokens = [f"t{i}" for i in reference["sequences"][0].tolist()]
    positions, frames = found.paths[0]
    path = tmp_path / "plots" / "alignment.png"
    fig = plot_token_alignment(found.matrices[0], positions, frames, seconds_per_frame=found.audio.seconds_per_frame,
                               first_centre=found.audio.first_centre, first_position=found.prompt_tokens,
                               tokens=tokens, save_path=path)
    assert path.exists() and path.stat().st_size > 1000
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (s)"
    left, right = ax.get_xlim()
    assert left == pytest.approx(-0.01) and right == pytest.approx(30 * 0.02 - 0.01)
    drawn = [line for line in ax.get_lines() if line.get_label() == "alignment path"][0]
    np.testing.assert_allclose(drawn.get_xdata(), frames * 0.02)
    np.testing.assert_array_equal(drawn.get_ydata(), positions - found.prompt_tokens)
    rows = found.matrices[0].shape[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens[2 : 2 + rows]
    generated = plot_token_alignment(found.matrices[0], positions, frames, seconds_per_frame=0.02,
                                     first_position=found.prompt_tokens, tokens=tokens[2:])  # as generate() gives
    assert [t.get_text() for t in generated.axes[0].get_yticklabels()] == tokens[2 : 2 + rows]
    fig.canvas.draw()
    ticks = [(x, t.get_text().replace("\u2212", "-")) for x, t in zip(ax.get_xticks(), ax.get_xticklabels())
             if left <= x <= right]
    assert len(ticks) >= 3 and all(float(text) == pytest.approx(x) for x, text in ticks), "x ticks read seconds"
    assert max(x for x, _ in ticks) >= 0.5, "the ticks span the 0.6 s of audio"
    with pytest.raises(AttentionHookerError, match="leaves the matrix"):
        plot_token_alignment(found.matrices[0], positions, frames + 1, seconds_per_frame=0.02,
                             first_position=found.prompt_tokens)
    with pytest.raises(AttentionHookerError, match="token labels"):
        plot_token_alignment(found.matrices[0], positions, frames, seconds_per_frame=0.02,
                             first_position=found.prompt_tokens, tokens=["a"])
