"""Speech pictures: tokens against seconds of audio, with the alignment path drawn over the weights.

The view receives arrays (a token x frame matrix, the path's cells, the frame rate); it computes no
alignment (:func:`attention_hooker.analysis.speech_alignment.align_tokens` does).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from .._checks import non_negative_int, positive_int, positive_number
from .._tensor import to_numpy
from ..errors import AttentionHookerError
from .labels import thinned_positions, tick_label
from .plot import colormap_named, figure_class, save_figure

__all__ = ["plot_token_alignment"]


def _path_array(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise AttentionHookerError(f"{name} is a {array.ndim}-dim array of {array.dtype}; expected 1-D integer indices")
    return array.astype(np.int64)


def _row_labels(tokens, rows: int, first_position: int) -> Optional[list]:
    """The labels of the rows, from labels of the rows, of the generated tokens (``first_position`` on, the
    last one included: what ``generate()`` returns), or of the whole sequence."""
    if tokens is None:
        return None
    labels = [str(t) for t in tokens]
    if len(labels) in (rows, rows + 1):  # one a row; or the generated tokens, the last of which has no row
        return labels[:rows]
    if len(labels) == first_position + rows + 1:  # the whole sequence, prompt included
        return labels[first_position : first_position + rows]
    raise AttentionHookerError(
        f"{len(labels)} token labels for {rows} rows starting at sequence position {first_position}; expected "
        f"{rows} (one a row), {rows + 1} (the generated tokens) or {first_position + rows + 1} (the whole sequence)")


def plot_token_alignment(
    matrix,
    path_positions,
    path_frames,
    *,
    seconds_per_frame: float,
    first_centre: float = 0.0,
    first_position: int = 0,
    tokens: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    max_labels: int = 40,
    cmap: str = "viridis",
    save_path: Union[str, os.PathLike, None] = None,
):
    """Tokens (rows) against time in seconds (columns): the alignment weights, the path over them.

    Args:
        matrix: ``(rows, frames)``: a weight per token row and encoder frame (an alignment's
            ``matrices[b]``; any real values). Row ``r`` is sequence position ``first_position + r``.
        path_positions: the path's sequence positions (1-D ints; an alignment's ``paths[b][0]``).
        path_frames: the path's encoder frames, as many (``paths[b][1]``).
        seconds_per_frame: seconds between encoder frames (``AudioFrames.seconds_per_frame``).
        first_centre: seconds at the centre of frame 0 (``AudioFrames.first_centre``).
        first_position: the sequence position of row 0 (the prompt's length).
        tokens: labels of the rows: one a row, or one per generated token (from ``first_position`` on, as
            ``generate()`` returns them), or one per position of the whole sequence.
        title: shown above (default: rows x frames and the duration).
        max_labels: at most this many token labels; longer sequences are thinned.
        cmap: matplotlib colormap of the weights.
        save_path: file to write (folders are created; format from the extension).

    Returns:
        The ``matplotlib.figure.Figure``: one axes, seconds along x, tokens along y (first at the top).

    Raises:
        AttentionHookerError: on a matrix that is not 2-D, a path off the matrix or not monotonic, or
            labels of the wrong count.

    Example:
        >>> fig = plot_token_alignment(np.eye(3), [0, 1, 2], [0, 1, 2], seconds_per_frame=0.02, tokens=["a", "b", "c"])
        >>> fig.axes[0].get_xlabel()
        'time (s)'
    """
    weights = np.asarray(to_numpy(matrix), dtype=np.float64)
    if weights.ndim != 2 or 0 in weights.shape:
        raise AttentionHookerError(f"matrix is {weights.shape}; expected a non-empty (rows, frames) array")
    rows, frames = weights.shape
    step = positive_number(seconds_per_frame, "seconds_per_frame")
    first_position = non_negative_int(first_position, "first_position")
    max_labels = positive_int(max_labels, "max_labels")
    if not np.isfinite(float(first_centre)):
        raise AttentionHookerError(f"first_centre is {first_centre!r}; expected a finite number of seconds")
    positions = _path_array(path_positions, "path_positions") - first_position
    frame_index = _path_array(path_frames, "path_frames")
    if positions.shape != frame_index.shape or positions.size == 0:
        raise AttentionHookerError(
            f"path_positions has {positions.size} cells and path_frames {frame_index.size}; expected as many, "
            "at least 1")
    if positions.min() < 0 or positions.max() >= rows or frame_index.min() < 0 or frame_index.max() >= frames:
        low, high = positions.min() + first_position, positions.max() + first_position
        raise AttentionHookerError(
            f"the path leaves the matrix: positions {low}..{high}"
            f", frames {frame_index.min()}..{frame_index.max()}; the matrix covers positions {first_position}.."
            f"{first_position + rows - 1} and frames 0..{frames - 1}")
    if (np.diff(positions) < 0).any() or (np.diff(frame_index) < 0).any():
        raise AttentionHookerError("the path goes back in tokens or in time; expected a monotonic alignment path")
    labels = _row_labels(tokens, rows, first_position)

    Figure = figure_class()
    fig = Figure(figsize=(min(12.0, 3.0 + frames * 0.08), min(10.0, 1.6 + rows * 0.25)), layout="constrained")
    ax = fig.subplots()
    left = first_centre - step / 2
    image = ax.imshow(weights, aspect="auto", interpolation="nearest", cmap=colormap_named(cmap),
                      extent=(left, left + frames * step, rows - 0.5, -0.5))
    ax.plot(first_centre + frame_index * step, positions, color="red", linewidth=1.5, label="alignment path")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("token")
    ticks = thinned_positions(rows, max_labels)
    ax.set_yticks(ticks)
    if labels is not None:
        ax.set_yticklabels([tick_label(labels, i, len(ticks) < rows) for i in ticks], fontsize=7)
    else:
        ax.set_yticklabels([str(first_position + i) for i in ticks], fontsize=7)
    ax.legend(loc="upper right", fontsize=7)  # the path runs from top left to bottom right
    fig.colorbar(image, ax=ax, shrink=0.8, label="alignment weight")
    ax.set_title(title if title is not None else
                 f"{rows} tokens x {frames} frames ({frames * step:.2f} s of audio)")
    save_figure(fig, save_path)
    return fig
