"""Which image, view and patches each image token of a vision-language model stands for.

A vision-language model puts an image into its language model as a run of *image tokens*: positions of
the sequence whose embeddings are the vision tower's (projected, merged or pooled) patch features. How
many there are, in which order, and which patches each one is made of differs per model — one token per
CLIP patch (LLaVA), pooled blocks (Gemma 3), 2 x 2 merges in merge-block order (Qwen2-VL), tiles plus a
global view (Idefics3, LLaVA-NeXT)... :func:`image_token_map` reads it from the model's config and the
processor's outputs, one small function per family (registered with :func:`register_image_tokens`), and
returns one :class:`ImageTokens` table.

Coordinates. Each image token lies on a *view* of its image (:class:`ImageView`): a grid of
``rows x cols`` cells that covers the fraction ``box = (top, left, bottom, right)`` of the image as the
processor handed it to the model (resized, and center-cropped where the processor crops; the tiles of a
tiled image are placed back where they came from, padding added by the processor is outside every box).
A token covers ``height x width`` cells from ``(row, col)``; a view may hold fewer tokens than cells
(never more). A *marker* token the model puts into an image's run that stands for no part of the
image (LLaVA-NeXT's row-end ``image_newline``) covers no cell: ``height = width = 0``, no source, placed
just past the cells it follows. A view may have no cells at all (``0 x 0``): its tokens stand for no part
of the image in particular (BLIP-2's query tokens, each read from every patch through the Q-Former); they
cover no cell and their box is the view's box. Views of one image: the image itself (or its tiles put
back), and, where the model adds one, a second, coarser look at the whole image ("global" / "base" view)
— a token is on exactly one view.

Sources. ``source[i]`` lists the *units* of ``pixel_values`` token ``i`` is computed from (a unit is one
patch of one crop for ``(crops, channels, H, W)`` pixel values, ``patch`` pixels square — flat index
``crop * (H/patch) * (W/patch) + patch_row * (W/patch) + patch_col``; one row for the flattened
``(patches, features)`` pixel values of the Qwen family), padded with -1. This is what the tests check
against the model's own code path: perturb a unit, see which image tokens change.

Axis. ``position`` is where the token is on the axis attention is read along: the language model's
sequence (``axis="sequence"``: keys of self-attention) or, for models that attend to the image through
cross-attention only (Mllama), the key axis of those layers (``axis="cross"``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import AttentionHookerError

__all__ = ["ImageView", "ImageTokens", "image_token_map", "register_image_tokens", "image_token_families",
           "tokens_where"]


@dataclass(frozen=True)
class ImageView:
    """One view of one image: a grid of ``rows x cols`` cells over ``box`` (fractions of the image).

    Attributes:
        image: the image's index in the batch's images (in the order their tokens appear).
        index: the view's index among the image's views (0 = the image itself, or its tiles put back).
        name: what the view is ("image", "tiles", "global", "frame 2", ...).
        rows, cols: the grid's size in cells (a cell = the smallest patch block a token covers).
        box: ``(top, left, bottom, right)``, fractions of the image the whole grid covers.
    """

    image: int
    index: int
    name: str
    rows: int
    cols: int
    box: Tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class ImageTokens:
    """Where each image token of a batch came from. Every tensor is ``(n,)`` (``source``: ``(n, k)``), one
    entry per image token, sorted by ``(batch, position)``.

    Attributes:
        family: the model type the table was read for.
        axis: ``"sequence"`` (positions of the language model's sequence) or ``"cross"`` (keys of the
            cross-attention layers).
        batch: the batch row the token is in.
        position: its position on ``axis``.
        image: the index of its image (counted over the batch; see :class:`ImageView`).
        view: the index into :attr:`views` of the view it lies on.
        row, col: its first cell on that view's grid.
        height, width: how many cells it covers (2 x 2 for a merge of four patches, 1 x 1 for one patch).
        source: the ``pixel_values`` units it is computed from (flat indices, see the module doc), -1 padded.
        patch: the size in pixels of a unit of ``pixel_values`` (0 for flattened pixel values).
        views: every view, indexed by :attr:`view` (a row's table from :meth:`in_row` keeps every view of
            the batch, so that view indices mean the same in both; its tokens lie on the row's views only).
        keys: how many keys the attention read along ``axis`` has for the inputs the table was read from
            (the prompt's length for ``"sequence"``; the cross-attention key count for ``"cross"``), or
            ``None`` where unknown; :func:`~attention_hooker.analysis.image_attention.image_attention` checks
            maps against it.
        frame: what the boxes are fractions of: ``"image"``, the original image (every family whose processor
            only resizes, or whose reader puts tiles back and crops padding away), or ``"processed"``, the
            square the processor made and handed over, where the reader was not told how that square sits
            in the original (LLaVA's center crop or pad without ``image_sizes``): place those boxes with
            :func:`~attention_hooker.views.image_overlay.processed_region`.
    """

    family: str
    axis: str
    batch: torch.Tensor
    position: torch.Tensor
    image: torch.Tensor
    view: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    source: torch.Tensor
    patch: int
    views: Tuple[ImageView, ...]
    keys: Optional[int] = None
    frame: str = "image"

    def __len__(self) -> int:
        return int(self.position.numel())

    def __repr__(self) -> str:
        images = len(set(self.image.tolist()))
        return (f"ImageTokens({self.family}: {len(self)} image tokens of {images} image(s), "
                f"{len(set(self.view.tolist()))} view(s), axis={self.axis!r})")

    def boxes(self) -> torch.Tensor:
        """``(n, 4)`` float64: each token's ``(top, left, bottom, right)``, fractions of its image."""
        out = torch.empty(len(self), 4, dtype=torch.float64)
        for k, v in enumerate(self.views):
            on = self.view == k
            if not bool(on.any()):
                continue
            top, left, bottom, right = v.box
            if v.rows == 0 or v.cols == 0:  # a view with no cells: its tokens stand for all of its box
                out[on] = torch.tensor(v.box, dtype=torch.float64)
                continue
            dy, dx = (bottom - top) / v.rows, (right - left) / v.cols
            out[on, 0] = top + self.row[on].double() * dy
            out[on, 1] = left + self.col[on].double() * dx
            out[on, 2] = top + (self.row[on] + self.height[on]).double() * dy
            out[on, 3] = left + (self.col[on] + self.width[on]).double() * dx
        return out

    def select(self, keep: torch.Tensor) -> "ImageTokens":
        """The tokens where the boolean ``keep`` (n,) is true (views kept as they are)."""
        return ImageTokens(self.family, self.axis, *(t[keep] for t in (
            self.batch, self.position, self.image, self.view, self.row, self.col, self.height, self.width,
            self.source)), self.patch, self.views, self.keys, self.frame)

    def in_row(self, batch: int) -> "ImageTokens":
        """The image tokens of batch row ``batch`` (``views`` kept whole: see :attr:`views`)."""
        return self.select(self.batch == batch)


Reader = Callable[..., ImageTokens]
_FAMILIES: Dict[str, Reader] = {}


def register_image_tokens(*model_types: str) -> Callable[[Reader], Reader]:
    """Registers ``reader(config, inputs, *, processor=None) -> ImageTokens`` for ``model_types``."""
    def add(reader: Reader) -> Reader:
        for t in model_types:
            _FAMILIES[t] = reader
        return reader
    return add


def image_token_families() -> Tuple[str, ...]:
    """The model types :func:`image_token_map` can read, sorted."""
    _load_families()
    return tuple(sorted(_FAMILIES))


def image_token_map(model_or_config, inputs: Mapping[str, torch.Tensor], *, processor=None) -> ImageTokens:
    """Which image, view and patches each image token stands for.

    Args:
        model_or_config: the vision-language model, or its config (``model.config``).
        inputs: what the model is called with (the processor's outputs): ``input_ids`` always, and the
            family's own image fields (``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``...).
        processor: the model's processor, for families whose token layout its settings decide.

    Returns:
        An :class:`ImageTokens` table, one entry per image token of the batch.

    Raises:
        AttentionHookerError: the model type has no reader here (the message lists those that do), or
            the inputs do not hold what the family needs (named), or they disagree with the config.

    Example:
        >>> from transformers import LlavaConfig
        >>> import torch
        >>> config = LlavaConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=16,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        ...     text_config=dict(model_type="llama", hidden_size=16, num_attention_heads=2,
        ...     num_key_value_heads=2, vocab_size=64), image_token_id=50)
        >>> ids = torch.tensor([[1, 5] + [50] * 16 + [7]])
        >>> image_token_map(config, dict(input_ids=ids))
        ImageTokens(llava: 16 image tokens of 1 image(s), 1 view(s), axis='sequence')
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    _load_families()
    reader = _FAMILIES.get(model_type)
    if reader is None:
        raise AttentionHookerError(
            f"image_token_map: no reader of image tokens for model type {model_type!r}; known: "
            f"{', '.join(sorted(_FAMILIES))}")
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), torch.Tensor):
        raise AttentionHookerError("image_token_map: expected the model's inputs as a mapping with 'input_ids' "
                                   f"(batch, sequence), got {type(inputs).__name__}"
                                   f"{' without input_ids' if isinstance(inputs, Mapping) else ''}")
    ids = inputs["input_ids"]
    if ids.dim() == 1:
        inputs = dict(inputs, input_ids=ids[None])
    elif ids.dim() != 2:
        raise AttentionHookerError(f"image_token_map: input_ids must be (batch, sequence), got {tuple(ids.shape)}")
    tokens = reader(config, inputs, processor=processor)
    if tokens.keys is None and tokens.axis == "sequence":
        tokens = replace(tokens, keys=int(inputs["input_ids"].shape[1]))
    return tokens


def tokens_where(ids: torch.Tensor, token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(batch, position)`` of every ``token_id`` in ``ids (batch, sequence)``, in reading order."""
    batch, position = (ids == int(token_id)).nonzero(as_tuple=True)
    return batch, position


NO_TOKENS_HINT = (" (if these are one decoding step's inputs, which hold only the new tokens, build the table from "
                  "the prompt's input_ids, or generate's output sequences: decode-step maps index the same positions)")


def require(inputs: Mapping, name: str, family: str, why: str) -> torch.Tensor:
    """``inputs[name]``, or an error naming the field, the family and why it is needed."""
    value = inputs.get(name)
    if value is None:
        raise AttentionHookerError(f"image_token_map: {family} needs {name!r} in the inputs ({why}); pass the "
                                   f"processor's outputs as they are")
    return value


def image_sizes_of(value, family: str, name: str = "image_sizes",
                   count: Optional[int] = None) -> List[Tuple[int, int]]:
    """``[(height, width), ...]`` from ``value``: a ``(n, 2)`` tensor or array, a flat list of pairs, or per-row
    lists of pairs (flattened in order), or an :class:`AttentionHookerError` saying which format was expected.
    ``count``: how many images there must be (checked when given)."""
    def pairs(v):
        if isinstance(v, torch.Tensor) or hasattr(v, "tolist") and not isinstance(v, (list, tuple)):
            v = v.tolist()
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            return [v]
        if isinstance(v, (list, tuple)):
            return [p for item in v for p in pairs(item)]
        raise TypeError
    try:
        out = [(int(h), int(w)) for h, w in pairs(value)]
    except (TypeError, ValueError):
        out = None
    if out is None or any(h <= 0 or w <= 0 for h, w in out):
        raise AttentionHookerError(
            f"image_token_map: {family}'s {name!r} must be (height, width) pairs of positive sizes, one per image: a "
            f"(images, 2) tensor, a list of pairs, or per-row lists of pairs; got "
            f"{value.tolist() if isinstance(value, torch.Tensor) else value!r:.160}")
    if count is not None and len(out) != count:
        raise AttentionHookerError(f"image_token_map: {family}'s {name!r} gives {len(out)} image size(s), but the "
                                   f"inputs hold {count} image(s)")
    return out


def table(family: str, axis: str, rows: Sequence[Tuple[int, ...]], sources: Sequence[Sequence[int]], patch: int,
          views: Sequence[ImageView], keys: Optional[int] = None) -> ImageTokens:
    """An :class:`ImageTokens` from per-token tuples ``(batch, position, image, view, row, col, height, width)``
    and per-token source lists (sorted here by batch and position); ``keys``: see :attr:`ImageTokens.keys`
    (:func:`image_token_map` fills it in for ``"sequence"`` tables)."""
    if not rows:
        raise AttentionHookerError(f"image_token_map: the inputs hold no image token of {family}{NO_TOKENS_HINT}")
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1]))
    cols = torch.tensor([rows[i] for i in order], dtype=torch.long).T
    k = max(len(s) for s in sources)
    source = torch.full((len(rows), k), -1, dtype=torch.long)
    for j, i in enumerate(order):
        source[j, :len(sources[i])] = torch.as_tensor(list(sources[i]), dtype=torch.long)
    return ImageTokens(family, axis, *cols, source, patch, tuple(views), keys)


def _load_families() -> None:
    from . import image_families  # noqa: F401  (registers the readers)
