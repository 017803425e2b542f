"""Mistral 3 (``mistral3``): a Pixtral tower with a 2 x 2 patch merger.

Images go in at their own sizes as for LLaVA with a Pixtral tower (:mod:`.pixtral`); the projector's patch
merger turns each ``spatial_merge_size x spatial_merge_size`` block of an image's patches into one token, blocks
in raster order, each line of tokens closed by ``[IMG_BREAK]`` (the last by ``[IMG_END]``). The table is the
shared Pixtral layout with ``merge = spatial_merge_size``: cells are patches, a token covers ``merge x merge``.
"""

from __future__ import annotations

from ..image_tokens import register_image_tokens, table
from .pixtral import pixtral_layout

__all__ = ["mistral3_image_tokens"]


@register_image_tokens("mistral3")
def mistral3_image_tokens(config, inputs, *, processor=None):
    """Image tokens of Mistral 3: merged blocks of each image's own Pixtral patch grid. See the module doc."""
    patch = config.vision_config.patch_size
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    merge = int(config.spatial_merge_size)
    rows, sources, views = pixtral_layout("mistral3", inputs, config.image_token_id, patch, merge)
    return table("mistral3", "sequence", rows, sources, patch, views)
