"""Cohere2-Vision (``cohere2_vision``): Aya Vision's layout of tiles, with its own processor's markers and canvas.

The image processor (``Cohere2VisionImageProcessor``) tiles an image like InternVL's and Aya Vision's (the tiles
of a ``rows x cols`` canvas in raster order, then the whole image resized to one tile when there is more than
one), but picks the canvas by its own rule (its ``get_optimal_tiled_canvas``, ``min_patches`` /
``max_patches``). The SigLIP tower's last hidden state (no class token, no select strategy) goes through
Aya Vision's pixel shuffle (``downsample_factor``), one token per ``k x k`` block of patches. The processor
writes each image as ``<|START_OF_IMG|>``, per crop its tokens followed by a line-break token,
``<|END_OF_IMG|>`` (the tokenizer's ``boi_token`` / ``eoi_token``).

So the table is Aya Vision's (:func:`.aya_vision.marked_tile_tokens`): views ``"image"`` for a one-crop image,
``"tiles"`` and ``"global"`` for a tiled one; it needs the ``processor`` (a ``Cohere2VisionProcessor``: its
markers tell images apart) and, for a tiled image, ``image_sizes`` (each image's original ``(height, width)``).
"""

from __future__ import annotations

from ...errors import AttentionHookerError
from ..image_tokens import register_image_tokens
from .aya_vision import marked_tile_tokens

__all__ = ["cohere2_vision_image_tokens"]


def _canvas(processor):
    from transformers.models.cohere2_vision.image_processing_cohere2_vision import get_optimal_tiled_canvas

    images = processor.image_processor

    def rows_cols(size, tile):
        cols, rows = get_optimal_tiled_canvas(tuple(size), (tile, tile), int(images.min_patches),
                                              int(images.max_patches))
        return int(rows), int(cols)
    return rows_cols


@register_image_tokens("cohere2_vision")
def cohere2_vision_image_tokens(config, inputs, *, processor=None):
    """Image tokens of Cohere2-Vision: per image (between its begin and end markers), its tiles' pixel-shuffled
    blocks tile by tile, then the global thumbnail's (or the one crop's). See the module doc."""
    if processor is None or not hasattr(processor, "boi_token"):
        raise AttentionHookerError(
            "image_token_map: cohere2_vision needs its processor (a Cohere2VisionProcessor) to tell images apart: "
            "only its begin / end of image markers show where an image's crops begin and end")
    if config.vision_config.model_type != "siglip_vision_model":
        raise AttentionHookerError(f"image_token_map: cohere2_vision is read with a SigLIP tower only (no class "
                                   f"token), got {config.vision_config.model_type!r}")
    ids = processor.tokenizer.convert_tokens_to_ids([processor.boi_token, processor.eoi_token])
    return marked_tile_tokens("cohere2_vision", config, inputs, (int(ids[0]), int(ids[1])), _canvas(processor))
