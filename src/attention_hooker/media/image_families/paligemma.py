"""PaliGemma (``paligemma``): one image token per SigLIP patch, in raster order.

The image processor (``SiglipImageProcessor``) resizes each image to the tower's square ``image_size``
(no crop, no padding, aspect ratio not kept); the SigLIP tower has no class token and cuts the image
into ``(image_size / patch_size)^2`` patches; the projector maps each patch feature to one image token.
The processor writes that many image tokens before the text of each image, images in order, so image
``j // N``'s patch ``j % N`` (``N = side^2``, raster order) fills the ``j``-th image token of the batch.
"""

from __future__ import annotations

from ...errors import AttentionHookerError
from ..image_tokens import ImageView, register_image_tokens, table, tokens_where

__all__ = ["paligemma_image_tokens", "square_side"]


def square_side(vision) -> int:
    """Patches along one side of the square image the tower takes (``image_size // patch_size``)."""
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(size) // int(patch)


@register_image_tokens("paligemma")
def paligemma_image_tokens(config, inputs, *, processor=None):
    """Image tokens of PaliGemma: the ``j``-th is image ``j // N``, patch ``j % N`` (``N = side^2``).

    Example:
        >>> import torch
        >>> from transformers import PaliGemmaConfig
        >>> from attention_hooker.media import image_token_map
        >>> config = PaliGemmaConfig(vision_config=dict(image_size=32, patch_size=8, hidden_size=16,
        ...     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        ...     text_config=dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        ...     head_dim=8, vocab_size=64), image_token_index=50)
        >>> tokens = image_token_map(config, dict(input_ids=torch.tensor([[50] * 16 + [2, 9]])))
        >>> tokens.source[:3, 0].tolist(), tokens.row[5].item(), tokens.col[5].item()
        ([0, 1, 2], 1, 1)
    """
    side = square_side(config.vision_config)
    per_image = side * side
    batch, position = tokens_where(inputs["input_ids"], config.image_token_id)
    if len(position) % per_image:
        raise AttentionHookerError(
            f"image_token_map: paligemma has {len(position)} image tokens, not a multiple of the {per_image} "
            f"each image takes ({side} x {side} SigLIP patches)")
    views, rows, sources = [], [], []
    for image in range(len(position) // per_image):
        views.append(ImageView(image, 0, "image", side, side))
        for patch in range(per_image):
            t = image * per_image + patch
            r, c = divmod(patch, side)
            rows.append((int(batch[t]), int(position[t]), image, image, r, c, 1, 1))
            sources.append([t])
    return table("paligemma", "sequence", rows, sources, int(config.vision_config.patch_size), views)
