"""Where in time each frame of a speech encoder lies: encoder frame index -> seconds.

A speech encoder's attention runs over *encoder frames*: the audio is cut into input frames (mel or
filter-bank frames ``hop_length`` samples apart, or raw samples), and a stack of strided convolutions
turns those into the frames its attention layers see. Frame ``j`` therefore lies
``hop / sampling_rate * (product of the conv strides)`` seconds after frame ``j - 1``, and frame 0 is
centred where the convolutions' first output is centred. The cross-attention keys of a speech
encoder-decoder (Whisper, Speech2Text) are these frames, so a decoder token's attention over its keys is
attention over time.

:func:`audio_frames` reads this from a model's config (and its feature extractor, where the rate or hop
differs from the family's default), one small function per family, and returns one
:class:`AudioFrames`. Families it knows: Whisper; Speech2Text; the Wav2Vec2-style CNN feature
encoders (Wav2Vec2, HuBERT, WavLM, Data2VecAudio, UniSpeech, UniSpeech-SAT, Wav2Vec2-Conformer). Any
other model is refused by name rather than given a guessed rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import AttentionHookerError

__all__ = ["AudioFrames", "audio_frames", "audio_frame_families"]

# The defaults of transformers' feature extractors (tests/test_speech_alignment.py checks them against
# the classes): WhisperFeatureExtractor(hop_length=160, sampling_rate=16000); Speech2TextFeatureExtractor
# (sampling_rate=16000, frames of 400 samples every 160, not centred); Wav2Vec2FeatureExtractor
# (sampling_rate=16000, raw samples).
_WHISPER_HOP, _RATE = 160, 16000
_S2T_HOP, _S2T_WINDOW = 160, 400


@dataclass(frozen=True)
class AudioFrames:
    """How one speech encoder's frames lie in time.

    Attributes:
        model_type: the family (``config.model_type``) this was read for.
        seconds_per_frame: seconds between the centres of consecutive encoder frames.
        first_centre: seconds at the centre of encoder frame 0 (Whisper: 0.0, its first mel frame is
            centred on the first sample).
        convs: the encoder's input convolutions, ``(kernel, stride, padding)`` each, over input frames
            (mel frames, or samples for a CNN feature encoder); :meth:`encoder_frames` runs lengths
            through them.
        input_unit: what one input frame is: ``"mel frame"``, ``"filter-bank frame"`` or ``"sample"``.
        window_frames: how many encoder frames one input window gives, where the model fixes it
            (Whisper: ``max_source_positions``, 30 s), else ``None``.

    Example:
        >>> frames = AudioFrames("whisper", 0.02, 0.0, ((3, 1, 1), (3, 2, 1)), "mel frame", 1500)
        >>> frames.seconds([0, 1, 50]).tolist()
        [0.0, 0.02, 1.0]
        >>> frames.encoder_frames(3000)
        1500
    """

    model_type: str
    seconds_per_frame: float
    first_centre: float
    convs: Tuple[Tuple[int, int, int], ...]
    input_unit: str
    window_frames: Optional[int] = None

    def __repr__(self) -> str:
        window = "" if self.window_frames is None else f", {self.window_frames} frames a window"
        return (f"AudioFrames({self.model_type}: one encoder frame every {self.seconds_per_frame * 1000:g} ms, "
                f"frame 0 at {self.first_centre:g} s{window})")

    def seconds(self, frames: Union[int, Sequence[int], np.ndarray, torch.Tensor]) -> np.ndarray:
        """The time, in seconds (float64), at the centre of each encoder frame index given."""
        index = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
        if index.dtype.kind not in "iu":
            raise AttentionHookerError(f"frames must be integer frame indices, got an array of dtype {index.dtype}")
        return self.first_centre + index.astype(np.int64) * self.seconds_per_frame

    def frame_at(self, seconds: float) -> int:
        """The encoder frame whose centre is nearest to ``seconds`` (may lie outside the input)."""
        return int(round((float(seconds) - self.first_centre) / self.seconds_per_frame))

    def encoder_frames(self, input_frames: Union[int, torch.Tensor]):
        """How many encoder frames ``input_frames`` input frames give (the convolutions' output length).

        Args:
            input_frames: a count of input frames (``attention_mask.sum(-1)`` of the feature
                extractor's output: mel frames, filter-bank frames or samples), an int or a tensor.

        Returns:
            The same kind (int or tensor): ``floor((n + 2 * padding - kernel) / stride) + 1`` applied for
            each convolution in turn.

        Note: Whisper's own ``return_token_timestamps`` keeps ``num_frames // 2`` encoder frames for
        ``num_frames`` mel frames, one fewer than the convolutions give when ``num_frames`` is odd.
        """
        n = input_frames
        for kernel, stride, padding in self.convs:
            n = (n + 2 * padding - kernel) // stride + 1
        return n


def _rate_and_hop(feature_extractor, *, family: str, hop_default: Optional[int], needs_hop: bool) -> Tuple[int, int]:
    """The feature extractor's sampling rate and hop (or the family's defaults when none is given)."""
    if feature_extractor is None:
        return _RATE, hop_default
    rate = getattr(feature_extractor, "sampling_rate", None)
    if not isinstance(rate, int) or rate <= 0:
        raise AttentionHookerError(
            f"the {family} feature extractor {type(feature_extractor).__name__} has sampling_rate={rate!r}; "
            "expected a positive int (samples per second)")
    hop = hop_default
    if needs_hop:
        hop = getattr(feature_extractor, "hop_length", None)
        if not isinstance(hop, int) or hop <= 0:
            raise AttentionHookerError(
                f"the {family} feature extractor {type(feature_extractor).__name__} has hop_length={hop!r}; "
                "expected a positive int (samples between mel frames)")
    return rate, hop


def _whisper(config, feature_extractor) -> AudioFrames:
    # WhisperEncoder: conv1 (kernel 3, stride 1, padding 1), conv2 (kernel 3, stride 2, padding 1) over mel
    # frames; the mel frames are centred STFT frames (mel frame m centred at sample m * hop), so encoder
    # frame j is centred at mel frame 2j.
    rate, hop = _rate_and_hop(feature_extractor, family="Whisper", hop_default=_WHISPER_HOP, needs_hop=True)
    convs = ((3, 1, 1), (3, 2, 1))
    return AudioFrames("whisper", hop / rate * _stride(convs), 0.0, convs, "mel frame",
                       int(config.max_source_positions))


def _speech_to_text(config, feature_extractor) -> AudioFrames:
    # Speech2TextFeatureExtractor: filter-bank frames of 400 samples every 160 samples, not centred (frame m
    # is centred at sample 160 m + 200); Conv1dSubsampler: one conv per kernel size, stride 2, padding k // 2,
    # so encoder frame j is centred at filter-bank frame j * 2**layers.
    rate, _ = _rate_and_hop(feature_extractor, family="Speech2Text", hop_default=_S2T_HOP, needs_hop=False)
    if rate != _RATE:
        raise AttentionHookerError(
            f"Speech2Text frames are read for 16000 Hz audio (filter-bank frames of 25 ms every 10 ms); "
            f"the feature extractor says sampling_rate={rate}")
    convs = tuple((int(k), 2, int(k) // 2) for k in config.conv_kernel_sizes)
    return AudioFrames("speech_to_text", _S2T_HOP / rate * _stride(convs), _S2T_WINDOW / 2 / rate, convs,
                       "filter-bank frame", None)


_CNN_FEATURE_ENCODERS = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat",
                         "wav2vec2-conformer")


def _cnn_feature_encoder(config, feature_extractor) -> AudioFrames:
    # Wav2Vec2-style feature encoder: unpadded convs over raw samples (conv_kernel, conv_stride); encoder
    # frame j reads samples [j * stride, j * stride + field), centred at j * stride + (field - 1) / 2.
    if getattr(config, "add_adapter", False):
        raise AttentionHookerError(
            f"{config.model_type} with add_adapter=True: the adapter after the encoder shortens the frames again "
            "(adapter_stride), so its output is not on the encoder's frames; read the encoder's own attention, "
            "or build without the adapter")
    rate, _ = _rate_and_hop(feature_extractor, family=config.model_type, hop_default=1, needs_hop=False)
    convs = tuple((int(k), int(s), 0) for k, s in zip(config.conv_kernel, config.conv_stride))
    if len(convs) != len(config.conv_kernel) or len(convs) != len(config.conv_stride):
        raise AttentionHookerError(
            f"{config.model_type} config has {len(config.conv_kernel)} conv_kernel and {len(config.conv_stride)} "
            "conv_stride entries; expected one of each per feature-encoder layer")
    field, jump = 1, 1
    for kernel, stride, _ in convs:
        field += (kernel - 1) * jump
        jump *= stride
    return AudioFrames(config.model_type, jump / rate, (field - 1) / 2 / rate, convs, "sample", None)


def _stride(convs) -> int:
    return math.prod(stride for _, stride, _ in convs)


_FAMILIES: Dict[str, Callable] = {"whisper": _whisper, "speech_to_text": _speech_to_text,
                                  **{name: _cnn_feature_encoder for name in _CNN_FEATURE_ENCODERS}}


def audio_frame_families() -> Tuple[str, ...]:
    """The ``model_type`` names :func:`audio_frames` knows."""
    return tuple(sorted(_FAMILIES))


def audio_frames(model_or_config, feature_extractor=None) -> AudioFrames:
    """How the encoder frames of a speech model lie in time.

    Args:
        model_or_config: a speech model or its config (``config.model_type`` picks the family; a
            speech encoder-decoder's ``config.encoder`` is read).
        feature_extractor: the model's feature extractor, for its ``sampling_rate`` (and Whisper's
            ``hop_length``); default: the family's feature-extractor defaults (16000 Hz; Whisper's hop
            160 samples, which gives 0.02 s a frame, the ``time_precision`` Whisper's own
            timestamps use).

    Returns:
        An :class:`AudioFrames`: ``seconds(j)`` is the centre of encoder frame ``j``.

    Raises:
        AttentionHookerError: for a model type it does not know (named in the message), or a feature
            extractor without a usable rate or hop.

    Example:
        >>> from transformers import WhisperConfig
        >>> audio_frames(WhisperConfig(max_source_positions=1500))
        AudioFrames(whisper: one encoder frame every 20 ms, frame 0 at 0 s, 1500 frames a window)
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) == "speech-encoder-decoder" and hasattr(config, "encoder"):
        config = config.encoder
    model_type = getattr(config, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        raise AttentionHookerError(
            f"no frame-to-time rule for model_type {model_type!r} ({type(config).__name__}); known: "
            f"{', '.join(audio_frame_families())}. A speech encoder's frame rate comes from its feature "
            "extractor's hop and its conv strides: give it for this family rather than guess")
    return family(config, feature_extractor)
