"""What the page carries of an image: a small PNG of the original image (inlined, base64) and, for each
image token, where it is on the language model's key axis and which box of the image it covers.

The page (``view.js``) draws the image tokens as a patch grid over the picture, one panel per group of
non-overlapping views (:func:`~attention_hooker.views.image_overlay.image_panels`: a global view apart
from the tiles); hovering a query token fills each patch with that query's weight on its token, split
over the cells it covers (as the overlay draws it), and says the share of the query's attention that
went to the image. Nothing is fetched: the picture travels in the page.
"""

from __future__ import annotations

import base64
import io
from typing import Optional, Tuple

from ...errors import AttentionHookerError
from ...media.image_tokens import ImageTokens
from ..image_overlay import check_region, image_panels

__all__ = ["image_page_meta"]

Box = Tuple[float, float, float, float]


def _thumbnail(picture, max_side: int) -> Tuple[str, int, int]:
    """``(data URI of a PNG, width, height)`` of ``picture`` (a PIL image or an ``(H, W, 3)`` array in
    [0, 1] or 0..255), shrunk so its longer side is at most ``max_side``."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("the page's image needs Pillow: pip install pillow") from None
    if not hasattr(picture, "convert"):
        from ..vit import image_array

        picture = Image.fromarray((image_array(picture) * 255).round().clip(0, 255).astype("uint8"))
    picture = picture.convert("RGB")
    scale = min(1.0, max_side / max(picture.size))
    shown = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                           Image.BILINEAR) if scale < 1 else picture
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), shown.width, shown.height


def image_page_meta(picture, tokens: ImageTokens, *, keys: int, image: int = 0, batch: int = 0,
                    region: Optional[Box] = None, max_side: int = 280) -> dict:
    """The page's ``image`` entry: ``render_html(..., image=image_page_meta(...))``.

    Args:
        picture: the original image (PIL, or an ``(H, W, 3)`` array).
        tokens: the image tokens of the batch (or of row ``batch``).
        keys: the length of the key axis the tokens' positions are on (the language model's sequence):
            the page lights patches only for calls with that many keys.
        image: which image of the row ``picture`` is.
        batch: the batch row.
        region: the fractions of ``picture`` the processor handed the model
            (:func:`~attention_hooker.views.image_overlay.processed_region`); default the whole image.
        max_side: the longest side of the picture on the page, in pixels.

    Returns:
        A JSON-ready dict: ``src`` (a PNG data URI, its longer side at most ``max_side``), ``width`` and
        ``height`` (the size it is shown at: longer side ``max_side``), ``batch``, ``image``, ``keys``,
        ``positions`` (each token's key), ``boxes`` (each token's ``[top, left, bottom, right]``,
        fractions of the original image), ``cells`` (the cells each covers), ``panels`` (``[{"name",
        "tokens": [token indices]}]``).

    Raises:
        AttentionHookerError: the row has no token of that image, or a token lies past ``keys``.

    Example:
        >>> from attention_hooker.media.image_tokens import ImageView, table
        >>> tokens = table("demo", "sequence", [(0, 1 + k, 0, 0, k // 2, k % 2, 1, 1) for k in range(4)],
        ...                [[k] for k in range(4)], 8, [ImageView(0, 0, "image", 2, 2)])
        >>> meta = image_page_meta(__import__("numpy").zeros((8, 8, 3)), tokens, keys=6)
        >>> meta["positions"], meta["boxes"][1], meta["panels"]
        ([1, 2, 3, 4], [0.0, 0.5, 0.5, 1.0], [{'name': 'image', 'tokens': [0, 1, 2, 3]}])
    """
    row = tokens.in_row(batch)
    row = row.select(row.image == image)
    if len(row) == 0:
        raise AttentionHookerError(f"image_page_meta: batch row {batch} holds no token of image {image}")
    if int(row.position.max()) >= keys:
        raise AttentionHookerError(f"image_page_meta: image tokens reach position {int(row.position.max())}, past "
                                   f"the {keys} keys given")
    top0, left0, bottom0, right0 = check_region(tokens, region, "image_page_meta")
    covered = row.height * row.width > 0  # row-end markers and cell-less query tokens are on no patch
    if not bool(covered.any()):
        raise AttentionHookerError(f"image_page_meta: no token of image {image} covers a patch (its tokens stand for "
                                   "no part of the image: BLIP-2's query tokens; use image_attention_through_queries)")
    row = row.select(covered)
    h, w = bottom0 - top0, right0 - left0
    boxes = [[round(top0 + t * h, 6), round(left0 + l * w, 6), round(top0 + b * h, 6), round(left0 + r * w, 6)]
             for t, l, b, r in row.boxes().tolist()]
    src, width, height = _thumbnail(picture, max_side)
    grow = max_side / max(width, height)  # a small picture is shown larger (the grid's lines stay one pixel)
    width, height = round(width * grow), round(height * grow)
    panels = []
    for views in image_panels(row, image):
        names = ", ".join(dict.fromkeys(row.views[k].name for k in views))
        members = [i for i in range(len(row)) if int(row.view[i]) in views]
        panels.append({"name": names, "tokens": members})
    return {"src": src, "width": width, "height": height, "batch": batch, "image": image, "keys": int(keys),
            "positions": row.position.tolist(), "boxes": boxes, "cells": (row.height * row.width).tolist(),
            "panels": panels}
