"""LLaVA (``llava``): one image token per patch of the vision tower, in raster order.

CLIP-like towers (``vision_config.model_type`` ``clip_vision_model``): the processor resizes (and, for
CLIP's processor, center-crops; LLaVA's may pad to a square first) each image to the tower's square
``image_size``; the tower cuts it into ``(image_size / patch_size)^2`` patches after a class token. With
``vision_feature_select_strategy="default"`` the class token is dropped and every patch feature, projected,
fills one image token, images in order, row after row. With ``"full"`` the class token is kept first: it
is placed on its own 1 x 1 view named "class token" over the whole image, computed from no patch of its
own (its ``source`` is empty).

SigLIP towers (``siglip_vision_model``) have no class token: ``"full"`` gives the ``side^2`` patches,
and ``"default"`` drops the first *patch* (the model removes the first position whatever it is), so an
image's tokens are patches ``1 .. side^2 - 1`` and grid cell (0, 0) holds no token.

Pixtral towers (``pixtral``, e.g. pixtral-12b) take each image at its own size, with ``[IMG_BREAK]`` /
``[IMG_END]`` tokens between the lines of image tokens: see :mod:`.pixtral`. Any other tower is refused
by name.

Boxes. Given the original ``image_sizes`` (``(height, width)`` per image, in the order of their tokens; the
processor does not write them for LLaVA, and the CLIP/SigLIP LLaVA model must not be called with them) and
the ``processor`` (its resize, center-crop and pad-to-square settings), each view's box is the window of the
original image the tower's square saw: inside ``[0, 1]`` when the processor cropped, reaching outside it
where the processor padded (the padding lies outside the image, as the module doc asks). Without them, the
box is the square as the processor handed it over, ``(0, 0, 1, 1)``, which is the original image only for
square images.
"""

from __future__ import annotations

import dataclasses

from typing import Optional, Tuple

from ...errors import AttentionHookerError
from ..image_tokens import (NO_TOKENS_HINT, ImageView, image_sizes_of, register_image_tokens, table,
                            tokens_where)
from .pixtral import pixtral_layout

__all__ = ["llava_image_tokens", "llava_crop_window"]

_CLASS_TOKEN_TOWERS = ("clip_vision_model",)
_NO_CLASS_TOKEN_TOWERS = ("siglip_vision_model",)


def _int(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _setting(processor, name):
    value = getattr(processor, name, None)
    return dict(value) if hasattr(value, "keys") else value


def _resized(h: int, w: int, size) -> Tuple[int, int]:
    if size.get("shortest_edge") and not size.get("longest_edge"):
        s = int(size["shortest_edge"])
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (new_long, s) if w <= h else (s, new_long)
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    raise AttentionHookerError(f"image_token_map: llava boxes: the processor's resize size {size} is not one this "
                               "reader can follow ('shortest_edge', or 'height' and 'width')")


def llava_crop_window(height: int, width: int, processor) -> Tuple[float, float, float, float]:
    """``(top, left, bottom, right)``: the window of a ``height x width`` image the processor's output square
    shows, as fractions of the image (outside ``[0, 1]`` where the processor padded).

    Follows the processor's ``do_pad`` (pad to a square, centred), ``do_resize`` / ``size`` and
    ``do_center_crop`` / ``crop_size`` (centred; padded with zeros where the crop is larger).

    Example:
        >>> from transformers import CLIPImageProcessor
        >>> p = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> llava_crop_window(40, 80, p)
        (0.0, 0.25, 1.0, 0.75)
    """
    processor = getattr(processor, "image_processor", processor)
    top, left, h, w = 0.0, 0.0, float(height), float(width)  # the current picture's window, original pixels
    ph, pw = height, width  # the current picture's size in its own pixels
    if _setting(processor, "do_pad"):
        m = max(height, width)
        top, left, h, w = -float((m - height) // 2), -float((m - width) // 2), float(m), float(m)
        ph = pw = m
    if _setting(processor, "do_resize") is not False and _setting(processor, "size"):
        ph, pw = _resized(ph, pw, _setting(processor, "size"))
    if _setting(processor, "do_center_crop"):
        crop = _setting(processor, "crop_size") or {}
        ch, cw = int(crop["height"]), int(crop["width"])
        dy = -((ch - ph) // 2) if ch > ph else int((ph - ch) / 2.0)
        dx = -((cw - pw) // 2) if cw > pw else int((pw - cw) / 2.0)
        sy, sx = h / ph, w / pw  # original pixels per current pixel
        top, left, h, w = top + dy * sy, left + dx * sx, ch * sy, cw * sx
    return (top / height, left / width, (top + h) / height, (left + w) / width)


@register_image_tokens("llava")
def llava_image_tokens(config, inputs, *, processor=None):
    """Image tokens of LLaVA: image ``j // N``, patch ``j % N`` in raster order (``N = side^2``, plus the
    class token first with the "full" strategy on a CLIP tower). See the module doc."""
    vision = config.vision_config
    tower = getattr(vision, "model_type", None)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if tower == "pixtral":
        if strategy != "full":
            raise AttentionHookerError(
                f"image_token_map: llava with a Pixtral tower and vision_feature_select_strategy={strategy!r} drops "
                "the first patch of the batch's joined patch sequence, which leaves the images' token counts "
                "unequal to their sizes; only 'full' (as pixtral checkpoints use) has a layout here")
        rows, sources, views = pixtral_layout("llava", inputs, config.image_token_id, _int(vision.patch_size))
        return table("llava", "sequence", rows, sources, _int(vision.patch_size), views)  # each image whole
    if tower not in _CLASS_TOKEN_TOWERS + _NO_CLASS_TOKEN_TOWERS:
        raise AttentionHookerError(
            f"image_token_map: llava with a {tower!r} vision tower has no reader here (its class token and grid "
            f"are unknown); known towers: {', '.join(_CLASS_TOKEN_TOWERS + _NO_CLASS_TOKEN_TOWERS + ('pixtral',))}")
    cls = tower in _CLASS_TOKEN_TOWERS
    side = _int(vision.image_size) // _int(vision.patch_size)
    # positions of the tower's output the model keeps: the class token (0 when cls) then the patches
    kept = list(range(side * side + int(cls)))
    if strategy == "default":
        kept = kept[1:]
    per_image = len(kept)
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    if not len(position):
        raise AttentionHookerError(f"image_token_map: the inputs hold no image token of llava{NO_TOKENS_HINT}")
    if len(position) % per_image:
        what = f"{side} x {side} patches" + (" + the class token" if cls else "")
        if strategy == "default":
            what += f", less the {'class token' if cls else 'first patch'} ('default' strategy)"
        raise AttentionHookerError(
            f"image_token_map: llava ({tower} tower) has {len(position)} image tokens, not a multiple of the "
            f"{per_image} each image takes ({what})")
    count = len(position) // per_image
    boxes = _boxes(inputs, processor, count)
    views, rows, sources = [], [], []
    for image in range(count):
        main = len(views)
        views.append(ImageView(image, 0, "image", side, side, boxes[image]))
        if cls and not strategy == "default":
            views.append(ImageView(image, 1, "class token", 1, 1, boxes[image]))
        for j, out in enumerate(kept):
            t = image * per_image + j
            b, p = int(batch[t]), int(position[t])
            if cls and out == 0:
                rows.append((b, p, image, main + 1, 0, 0, 1, 1))
                sources.append([])
                continue
            patch = out - int(cls)
            r, c = divmod(patch, side)
            rows.append((b, p, image, main, r, c, 1, 1))
            sources.append([image * side * side + patch])
    tokens = table("llava", "sequence", rows, sources, _int(vision.patch_size), views)
    # without the original sizes, the boxes are fractions of the square the processor handed over
    return tokens if inputs.get("image_sizes") is not None else dataclasses.replace(tokens, frame="processed")


def _boxes(inputs, processor: Optional[object], count: int):
    sizes = inputs.get("image_sizes")
    if sizes is None:
        return [(0.0, 0.0, 1.0, 1.0)] * count
    if processor is None:
        raise AttentionHookerError(
            "image_token_map: llava was given image_sizes (the original images' sizes) but no processor: pass the "
            "processor (or its image processor), whose resize, crop and pad settings decide which window of each "
            "image the tower saw")
    return [llava_crop_window(h, w, processor) for h, w in image_sizes_of(sizes, "llava", count=count)]
