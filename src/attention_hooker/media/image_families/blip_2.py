"""BLIP-2 (``blip-2``) and InstructBLIP (``instructblip``): query tokens, not patches, in the sequence.

The language model's sequence holds ``config.num_query_tokens`` image tokens per image (the processor
expands its image token to that many). Each is the projected output of one learned *query* of the
Q-Former, and a query reads the vision tower's tokens (class token + every patch) only through the
Q-Former's cross-attention: a query token stands for no patch in particular and may depend on all of
them. The table says so: the image's tokens lie on a view named "queries" with no cells (``0 x 0``;
their box is the whole image), token ``j`` of an image is query ``j``, and its ``source`` is every
``pixel_values`` unit of its image. :func:`~attention_hooker.analysis.image_attention.image_attention`
refuses to put them on a grid; the chain through the Q-Former is
:func:`~attention_hooker.analysis.query_image_attention.image_attention_through_queries`.

Images are the rows of ``pixel_values (images, channels, H, W)``; their query tokens fill the image
tokens of the batch in reading order, ``num_query_tokens`` each, as the model scatters them. With an
encoder-decoder language model (the Flan-T5 variant) the positions are the encoder's input: its
self-attention and the decoder's cross-attention both have them on their key axis.
"""

from __future__ import annotations

import torch

from ...errors import AttentionHookerError
from ..image_tokens import NO_TOKENS_HINT, ImageView, register_image_tokens, table, tokens_where

__all__ = ["query_image_tokens"]


def _side(vision) -> int:
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(size) // int(patch)


@register_image_tokens("blip-2", "instructblip")
def query_image_tokens(config, inputs, *, processor=None):
    """Query tokens of BLIP-2 / InstructBLIP: token ``j`` of image ``k`` is query ``j % num_query_tokens``
    of image ``j // num_query_tokens``, on a cell-less "queries" view, sourced from every patch of its
    image. See the module doc."""
    queries = int(config.num_query_tokens)
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        raise AttentionHookerError(f"image_token_map: this {config.model_type} config has no image_token_index, so "
                                   "its query tokens cannot be found in input_ids (the model then prepends them "
                                   "itself; set config.image_token_index as the processor does)")
    side = _side(config.vision_config)
    batch, position = tokens_where(inputs["input_ids"], token_id)
    if len(position) % queries:
        raise AttentionHookerError(
            f"image_token_map: {config.model_type} has {len(position)} image tokens, not a multiple of the "
            f"{queries} query tokens each image takes (num_query_tokens)")
    images = len(position) // queries
    pixels = inputs.get("pixel_values")
    if pixels is not None and not isinstance(pixels, torch.Tensor):
        raise AttentionHookerError(f"image_token_map: {config.model_type} pixel_values must be a tensor (images, "
                                   f"channels, height, width), got {type(pixels).__name__}")
    if pixels is not None and pixels.shape[0] != images:
        raise AttentionHookerError(
            f"image_token_map: {config.model_type} pixel_values hold {pixels.shape[0]} images but input_ids hold "
            f"query tokens for {images}" + (NO_TOKENS_HINT if not images else ""))
    views, rows, sources = [], [], []
    for image in range(images):
        views.append(ImageView(image, 0, "queries", 0, 0))
        every = list(range(image * side * side, (image + 1) * side * side))
        for j in range(queries):
            t = image * queries + j
            rows.append((int(batch[t]), int(position[t]), image, image, 0, 0, 0, 0))
            sources.append(every)
    return table(config.model_type, "sequence", rows, sources, int(config.vision_config.patch_size), views)
