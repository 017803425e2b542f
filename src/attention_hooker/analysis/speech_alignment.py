"""Token timestamps from a speech decoder's cross-attention: which moment of the audio each token came from.

A Whisper-style decoder attends over the encoder's frames at every step; a few of its cross-attention heads
(the model's *alignment heads*, ``generation_config.alignment_heads``: ``(decoder layer, head)`` pairs)
follow the audio as the text goes on. :func:`align_tokens` reads them from a capture of ``generate()`` and
gives each token the time where it starts, computed as Whisper's own ``return_token_timestamps`` does:

1. Stitch each layer's per-step calls along the query axis (:func:`cross_attention_steps`) and take the
   alignment heads: ``(heads, rows, frames)`` per batch row, one row per decoder input position; drop the
   prompt rows (the decoder input ids given to ``generate``) and keep the first ``frames`` keys (the
   encoder frames that hold audio).
2. Standardise each frame's column over the token rows (mean 0, population standard deviation 1), smooth
   each row along time with a median filter (:func:`median_filter`, reflected edges), average the heads.
3. Find the monotonic path through the token x frame matrix that collects the most weight
   (:func:`time_warping_path`: dynamic time warping on the negated matrix; a step moves to the next
   frame, the next token, or both).
4. A token starts at the first frame the path gives its row; seconds come from the encoder's frame rate
   (:class:`~attention_hooker.media.AudioFrames`). The prompt tokens get 0; the last token, which no row
   reads (it was never fed back), repeats the time of the one before (Whisper's layout).

Shapes: attention is ``(batch, heads, query, key)``; here the queries are decoder positions and the keys
encoder frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import check_probabilities, is_int
from .._map_kinds import refuse_kind
from .._tensor import on_one_device
from ..errors import AttentionHookerError
from ..media.audio_frames import AudioFrames
from .core import to_tensor

__all__ = ["TokenAlignment", "align_tokens", "cross_attention_steps", "decoder_cross_attention", "median_filter",
           "time_warping_path"]

_DECODER_CROSS = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.encoder_attn$")


@dataclass(frozen=True)
class TokenAlignment:
    """Each token's place in the audio, for every batch row.

    Attributes:
        times: ``(batch, tokens)`` float32 seconds, one per position of the generated sequence (prompt
            included): where each token starts, as Whisper's ``token_timestamps`` (prompt tokens 0.0, the
            last token repeats the one before).
        prompt_tokens: how many leading positions were the prompt (not aligned).
        matrices: per batch row, ``(rows, frames)``: the standardised, filtered, head-averaged weights the
            path was found on (row ``r`` is sequence position ``prompt_tokens + r``).
        paths: per batch row, ``(positions, frames)``: two int64 arrays of equal length, the path's cells
            in order, positions counted in the sequence.
        audio: the frame-to-time rule used.
    """

    times: torch.Tensor
    prompt_tokens: int
    matrices: Tuple[torch.Tensor, ...]
    paths: Tuple[Tuple[np.ndarray, np.ndarray], ...]
    audio: AudioFrames

    def __repr__(self) -> str:
        batch, tokens = self.times.shape
        return (f"TokenAlignment({batch} row(s) x {tokens} tokens ({self.prompt_tokens} prompt), "
                f"up to {float(self.times.max()):.2f} s)")

    @property
    def end(self) -> torch.Tensor:
        """``(batch, tokens)``: where each token ends, the start of the next one (the last token's own start)."""
        return torch.cat([self.times[:, 1:], self.times[:, -1:]], dim=1)


def cross_attention_steps(calls: Sequence[torch.Tensor]) -> torch.Tensor:
    """One cross-attention map from the per-step calls of a KV-cache generation loop.

    Call ``i`` is ``(batch, heads, q_i, frames)``: the prompt's queries first, then the queries each step
    added, all over the same encoder frames. Unlike self-attention (:func:`stitch_steps`) the key axis does
    not grow, so the calls stack along the query axis.

    Args:
        calls: one cross-attention layer's calls in order (``hooker.values[layer]``) of one ``generate()``.

    Returns:
        ``(batch, heads, sum q_i, frames)``.

    Raises:
        AttentionHookerError: when the calls are not 4-D, do not share batch, heads and frames, or are not
            attention probabilities (a map stored as another kind included).

    Example:
        >>> steps = [torch.full((1, 2, 3, 4), 0.25), torch.full((1, 2, 1, 4), 0.25)]
        >>> cross_attention_steps(steps).shape
        torch.Size([1, 2, 4, 4])
    """
    if isinstance(calls, torch.Tensor) or not isinstance(calls, Sequence) or not calls:
        raise AttentionHookerError(
            f"calls is a {type(calls).__name__}; expected a non-empty list of (batch, heads, query, key) tensors, "
            "one per call of the layer")
    tensors = [to_tensor(c, f"calls[{i}]") for i, c in enumerate(calls)]
    first = tensors[0]
    for i, c in enumerate(tensors):
        refuse_kind(c, f"calls[{i}]", need="cross-attention probabilities over encoder frames")
        if c.dim() != 4:
            raise AttentionHookerError(f"calls[{i}] has {c.dim()} dims; expected 4: (batch, heads, query, key)")
        if (c.shape[0], c.shape[1], c.shape[3]) != (first.shape[0], first.shape[1], first.shape[3]):
            raise AttentionHookerError(
                f"calls[{i}] is {tuple(c.shape)} but calls[0] is {tuple(first.shape)}: the steps of one "
                "generation share batch, heads and encoder frames (a capture of one generate() call)")
        check_probabilities(c, f"calls[{i}]")
    return torch.cat(on_one_device(tensors), dim=2)  # (B, H, Q, K); device="auto" may keep later steps on the CPU


def decoder_cross_attention(values) -> Dict[int, list]:
    """The decoder's cross-attention layers of a capture, by decoder layer index.

    Layers are found by the Whisper / Speech2Text / BART naming, ``...decoder.layers.<i>.encoder_attn``.

    Args:
        values: ``hooker.values`` (``{layer name: [call, ...]}``) or the hooker.

    Returns:
        ``{decoder layer index: [call, ...]}``.

    Raises:
        AttentionHookerError: when no layer has that name, or two have the same index.

    Example:
        >>> sorted(decoder_cross_attention({"model.decoder.layers.1.encoder_attn": [], "x.self_attn": []}))
        [1]
    """
    if hasattr(values, "values") and isinstance(getattr(values, "values"), Mapping):
        values = values.values
    if not isinstance(values, Mapping):
        raise AttentionHookerError(f"values is a {type(values).__name__}; expected hooker.values or the hooker")
    found: Dict[int, list] = {}
    for name, calls in values.items():
        match = _DECODER_CROSS.search(str(name))
        if match is None:
            continue
        index = int(match.group(1))
        if index in found:
            raise AttentionHookerError(
                f"two captured layers are decoder layer {index}'s cross-attention (the last: {name!r}); capture "
                "one model at a time, or pass {layer index: calls} yourself")
        found[index] = calls if isinstance(calls, torch.Tensor) else list(calls)
    if not found:
        raise AttentionHookerError(
            f"no captured layer is named '...decoder.layers.<i>.encoder_attn' (captured: {list(values)[:6]}...); "
            "capture the decoder's cross-attention (layer_regex=r'encoder_attn$'), or pass "
            "{decoder layer index: calls} for another naming")
    return found


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """The median of each window of ``width`` values along the last axis, edges reflected.

    The value at ``t`` is the median of ``x[..., t - width//2 : t + width//2 + 1]``, where positions past
    an edge read the values mirrored about it (``x[-1]`` reads ``x[1]``). A last axis of ``width // 2``
    values or fewer is returned unchanged (it has no room to reflect), as Whisper does.

    Args:
        x: ``(..., time)``.
        width: an odd positive window length.

    Returns:
        ``(..., time)``, same dtype.

    Example:
        >>> median_filter(torch.tensor([1., 9., 2., 3., 4.]), 3).tolist()
        [9.0, 2.0, 3.0, 3.0, 3.0]
    """
    if not is_int(width) or width <= 0 or width % 2 != 1:
        raise AttentionHookerError(f"median filter width is {width!r}; expected an odd positive int")
    half = int(width) // 2
    n = x.shape[-1]
    if n <= half:
        return x
    index = torch.arange(-half, n + half, device=x.device).abs()  # reflect the left edge
    index = torch.where(index > n - 1, 2 * (n - 1) - index, index)  # and the right one
    windows = x[..., index].unfold(-1, int(width), 1)  # (..., time, width)
    return windows.kthvalue(half + 1, dim=-1).values


def time_warping_path(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The monotonic path of least total cost through a ``(tokens, frames)`` cost matrix.

    The path starts at ``(0, 0)``, ends at ``(tokens - 1, frames - 1)``, and each step moves to the next
    frame, the next token, or both. Totals are accumulated in float32 as Whisper's own dynamic time warping
    does, and each cell's choice breaks ties as it does: the diagonal only if strictly cheapest, else the
    previous token if strictly cheapest, else the previous frame.

    Args:
        cost: ``(tokens, frames)``, finite; lower is better (pass the negated alignment weights).

    Returns:
        ``(token index, frame index)`` of each cell along the path, in order, as two int64 arrays.

    Example:
        >>> tokens, frames = time_warping_path(np.array([[0., 5., 5.], [5., 0., 0.]]))
        >>> tokens.tolist(), frames.tolist()
        ([0, 1, 1], [0, 1, 2])
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise AttentionHookerError(f"cost is {cost.shape}; expected a non-empty (tokens, frames) matrix")
    if not np.isfinite(cost).all():
        raise AttentionHookerError("cost holds NaN or infinite values; expected finite costs")
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    total[0, 0] = 0.0
    move = np.full((n + 1, m + 1), 2, dtype=np.int8)  # 0: from both previous, 1: previous token, 2: previous frame
    for d in range(2, n + m + 1):  # one anti-diagonal i + j = d at a time: its cells depend on the two before
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        both, token, frame = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        take_both = (both < token) & (both < frame)
        take_token = ~take_both & (token < both) & (token < frame)
        best = np.where(take_both, both, np.where(take_token, token, frame))
        total[i, j] = cost[i - 1, j - 1] + best.astype(np.float64)  # stored as float32
        move[i, j] = np.where(take_both, 0, np.where(take_token, 1, 2))
    move[0, :] = 2
    move[:, 0] = 1
    i, j = n, m
    tokens, frames = [], []
    while i > 0 or j > 0:
        tokens.append(i - 1)
        frames.append(j - 1)
        step = move[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(tokens[::-1], dtype=np.int64), np.array(frames[::-1], dtype=np.int64)


def _layers(cross_attention) -> Tuple[Dict[int, torch.Tensor], Optional[int]]:
    """``{decoder layer: (batch, heads, query, frames)}`` and the first call's query count (or None)."""
    source = cross_attention
    if hasattr(source, "values") and isinstance(getattr(source, "values"), Mapping):
        source = source.values
    if isinstance(source, Mapping) and source and all(isinstance(k, str) for k in source):
        source = decoder_cross_attention(source)
    if isinstance(source, Mapping):
        items = list(source.items())
    elif isinstance(source, Sequence) and not isinstance(source, (str, torch.Tensor)):
        items = list(enumerate(source))
    else:
        raise AttentionHookerError(
            f"cross_attention is a {type(cross_attention).__name__}; expected the hooker, hooker.values, "
            "{decoder layer index: calls or tensor}, or a list over decoder layers")
    layers: Dict[int, torch.Tensor] = {}
    first_queries = None
    for index, entry in items:
        if not is_int(index):
            raise AttentionHookerError(f"cross_attention has key {index!r}; expected decoder layer indices (ints)")
        if isinstance(entry, torch.Tensor):
            refuse_kind(entry, f"decoder layer {index}", need="cross-attention probabilities over encoder frames")
            if entry.dim() != 4:
                raise AttentionHookerError(
                    f"decoder layer {index} is {tuple(entry.shape)}; expected (batch, heads, query, key)")
            check_probabilities(entry, f"decoder layer {index}")
            layers[int(index)] = entry
        else:
            calls = list(entry)
            try:
                layers[int(index)] = cross_attention_steps(calls)
            except AttentionHookerError as err:
                raise AttentionHookerError(f"decoder layer {index}: {err}") from None
            counts = [int(c.shape[2]) for c in calls]
            if any(q != 1 for q in counts[1:]):
                shown = f"{counts[:6]}{'...' if len(counts) > 6 else ''}"
                raise AttentionHookerError(
                    f"decoder layer {index}'s calls have {shown} queries; one generate() with a KV cache gives the "
                    "prompt's queries, then one query a step. A later call with more is a second generation "
                    "(another generate(), Whisper's long-form segments or temperature fallback), a step without the "
                    "cache (use_cache=False) or a multi-token step (assisted decoding): capture one generate() with "
                    "the cache, or pass the stitched rows and prompt_tokens yourself")
            queries = int(calls[0].shape[2])
            if first_queries is not None and queries != first_queries:
                raise AttentionHookerError(
                    f"decoder layer {index}'s first call has {queries} queries, another layer's {first_queries}: "
                    "the layers are not from the same generate() call")
            first_queries = queries
    return layers, first_queries


def _frame_counts(frames, batch: int, keys: int) -> List[int]:
    if frames is None:
        return [keys] * batch
    if isinstance(frames, torch.Tensor):
        frames = frames.tolist()
    counts = [frames] * batch if is_int(frames) else list(frames)
    if len(counts) != batch or not all(is_int(c) for c in counts):
        raise AttentionHookerError(
            f"frames is {frames!r}; expected an int or one int per batch row ({batch}): the encoder frames that "
            "hold audio")
    for b, c in enumerate(counts):
        if not 1 <= c <= keys:
            raise AttentionHookerError(
                f"frames[{b}] is {c}; expected 1..{keys} (the cross-attention has {keys} encoder frames)")
    return [int(c) for c in counts]


def _heads(alignment_heads, layers: Mapping[int, torch.Tensor]) -> List[Tuple[int, int]]:
    pairs = []
    try:
        pairs = [(int(p[0]), int(p[1])) for p in alignment_heads if len(p) == 2]
        complete = len(pairs) == len(alignment_heads)
    except (TypeError, ValueError):
        complete = False
    if not complete or not pairs:
        raise AttentionHookerError(
            f"alignment_heads is {alignment_heads!r}; expected a non-empty list of (decoder layer, head) pairs "
            "(generation_config.alignment_heads)")
    for layer, head in pairs:
        if layer not in layers:
            raise AttentionHookerError(
                f"alignment head ({layer}, {head}) is in decoder layer {layer}, which the capture lacks "
                f"(it has layers {sorted(layers)})")
        if not 0 <= head < layers[layer].shape[1]:
            raise AttentionHookerError(
                f"alignment head ({layer}, {head}): decoder layer {layer} has {layers[layer].shape[1]} heads")
    return pairs


def _follow_beams(chosen: torch.Tensor, beam_indices, prompt_tokens: int) -> torch.Tensor:
    """``(slots, A, Q, K)`` -> ``(sequences, A, Q', K)``: each sequence's rows read from its tokens' slots."""
    slots, _, queries, _ = chosen.shape
    indices = to_tensor(beam_indices, "beam_indices")
    if indices.dim() != 2 or indices.dtype.is_floating_point or indices.shape[1] == 0:
        raise AttentionHookerError(
            f"beam_indices is {tuple(indices.shape)} {indices.dtype}; expected (sequences, steps) integer slots "
            "(generate's beam_indices)")
    indices = indices.long().cpu()
    steps = int((indices != -1).sum(-1).max())
    indices = indices[:, :steps]
    if (indices == -1).any():
        raise AttentionHookerError(
            "the beam-search sequences end at different steps (beam_indices holds -1 before the longest one "
            "ends); rows past a sequence's end belong to no beam: align sequences of one length (min_new_tokens), "
            "or each on its own")
    if indices.min() < 0 or indices.max() >= slots:
        raise AttentionHookerError(
            f"beam_indices names slots {int(indices.min())}..{int(indices.max())}; the capture has {slots} "
            "(batch x num_beams)")
    # The prompt's rows were computed before any token was chosen: read them from the first token's slot.
    per_row = torch.cat([indices[:, :1].expand(-1, max(prompt_tokens - 1, 0)), indices], dim=1)  # (S, Q')
    if per_row.shape[1] > queries:
        raise AttentionHookerError(
            f"beam_indices covers {per_row.shape[1]} rows with the {prompt_tokens} prompt tokens; the capture has "
            f"{queries}: they are not from the same generate()")
    rows = torch.arange(per_row.shape[1])
    return chosen[per_row, :, rows[None, :], :].permute(0, 2, 1, 3)  # (S, Q', A, K) -> (S, A, Q', K)


def align_tokens(cross_attention, alignment_heads: Sequence[Sequence[int]], *, audio: AudioFrames,
                 prompt_tokens: Optional[int] = None, frames: Union[int, Sequence[int], torch.Tensor, None] = None,
                 median_filter_width: int = 7, beam_indices: Optional[torch.Tensor] = None) -> TokenAlignment:
    """Where in the audio each generated token starts, from a capture of a speech decoder's cross-attention.

    Args:
        cross_attention: the hooker (or ``hooker.values``) that captured the decoder's cross-attention
            (``...decoder.layers.<i>.encoder_attn``) during one ``generate()``; or ``{decoder layer index:
            calls}`` / a list over decoder layers, each entry the layer's calls or one stitched
            ``(batch, heads, query, frames)`` tensor.
        alignment_heads: ``(decoder layer, head)`` pairs (``model.generation_config.alignment_heads``).
        audio: the encoder's frame-to-time rule (:func:`attention_hooker.media.audio_frames`).
        prompt_tokens: how many decoder positions were given before generation (their rows are not
            aligned); default: the query count of the first call (``generate``'s prefill). Required when
            stitched tensors are passed.
        frames: how many encoder frames hold audio (an int, or one per batch row; from the feature
            extractor's ``attention_mask``: ``mask.sum(-1) // 2`` is what Whisper reads); default: all.
        median_filter_width: odd window of the median filter along time (``model.config.median_filter_width``).
        beam_indices: under beam search, ``generate``'s ``beam_indices`` (``return_dict_in_generate=True``):
            ``(sequences, steps)``, the batch slot each token came from. The capture holds every slot of every
            step; each sequence's row ``r`` is read from the slot its token came from (the prompt's rows from
            the slot of its first token). Without it, a beam-search capture cannot be told from a batch and
            would be read slot by slot, which is no sequence: pass it whenever ``num_beams > 1``.

    Returns:
        A :class:`TokenAlignment`; ``.times`` is ``(batch, prompt + rows + 1)`` seconds.

    Raises:
        AttentionHookerError: for a capture that is not one generation's cross-attention, heads the capture
            lacks, beam indices that do not fit it (or sequences of different lengths under beam search),
            fewer than two aligned rows (one row has no spread to standardise), or a frame whose weight is
            the same for every token (its standardisation is undefined).

    Example:
        >>> from attention_hooker.media import AudioFrames
        >>> rule = AudioFrames("whisper", 0.02, 0.0, ((3, 1, 1), (3, 2, 1)), "mel frame", 4)
        >>> eye = torch.eye(4)[None, None]  # 4 decoder rows, each on its own frame: (1, 1, 4, 4)
        >>> found = align_tokens([[eye]], [(0, 0)], audio=rule, prompt_tokens=0, median_filter_width=1)
        >>> [round(t, 3) for t in found.times[0].tolist()]
        [0.0, 0.02, 0.04, 0.06, 0.06]
    """
    if not isinstance(audio, AudioFrames):
        raise AttentionHookerError(f"audio is a {type(audio).__name__}; expected AudioFrames (media.audio_frames)")
    layers, first_queries = _layers(cross_attention)
    pairs = _heads(alignment_heads, layers)
    shapes = {(t.shape[0], t.shape[2], t.shape[3]) for t in layers.values()}
    if len(shapes) != 1:
        raise AttentionHookerError(
            f"the decoder layers' cross-attention shapes (batch, query, frames) differ: {sorted(shapes)}; "
            "expected the layers of one generate() call")
    batch, rows_total, keys = shapes.pop()
    if prompt_tokens is None:
        if first_queries is None:
            raise AttentionHookerError("prompt_tokens is needed with stitched tensors: how many decoder positions "
                                       "were given before generation")
        prompt_tokens = first_queries
    if not is_int(prompt_tokens) or not 0 <= prompt_tokens <= rows_total:
        raise AttentionHookerError(f"prompt_tokens is {prompt_tokens!r}; expected an int in 0..{rows_total}")
    prompt_tokens = int(prompt_tokens)
    rows = rows_total - prompt_tokens
    if rows < 2:
        raise AttentionHookerError(
            f"{rows} decoder row(s) after the {prompt_tokens} prompt tokens; at least 2 are needed (each frame is "
            "standardised over the token rows); generate more tokens")
    chosen = torch.stack(on_one_device([layers[layer][:, head] for layer, head in pairs]), dim=1)  # (B, A, Q, K)
    if beam_indices is not None:
        chosen = _follow_beams(chosen, beam_indices, prompt_tokens)  # (sequences, A, Q', K)
        batch, rows_total = chosen.shape[0], chosen.shape[2]
        rows = rows_total - prompt_tokens
        if rows < 2:
            raise AttentionHookerError(f"the beams hold {rows} decoder row(s) after the prompt; at least 2 are needed")
    counts = _frame_counts(frames, batch, keys)
    times = torch.zeros(batch, rows_total + 1, dtype=torch.float32)
    matrices, paths = [], []
    for b in range(batch):
        w = chosen[b, :, prompt_tokens:, : counts[b]]  # (A, rows, frames)
        std = torch.std(w, dim=-2, keepdim=True, correction=0)
        if (std == 0).any():
            frame = int((std == 0).nonzero()[0, -1])
            raise AttentionHookerError(
                f"batch row {b}: encoder frame {frame} has the same weight for every aligned token, so it cannot "
                "be standardised; pass frames= to leave out frames no token tells apart (padding)")
        w = (w - torch.mean(w, dim=-2, keepdim=True)) / std
        matrix = median_filter(w, median_filter_width).mean(dim=0)  # (rows, frames)
        token_index, frame_index = time_warping_path(-matrix.detach().cpu().double().numpy())
        starts = frame_index[np.searchsorted(token_index, np.arange(rows))]  # first frame of each row
        seconds = torch.from_numpy(audio.seconds(starts))
        times[b] = torch.cat([torch.zeros(prompt_tokens, dtype=torch.float64), seconds, seconds[-1:]])
        matrices.append(matrix)
        paths.append((token_index + prompt_tokens, frame_index))
    return TokenAlignment(times, prompt_tokens, tuple(matrices), tuple(paths), audio)
