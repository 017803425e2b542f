"""ColPali (``colpali``): a PaliGemma inside a retrieval head; PaliGemma's image tokens.

``ColPaliForRetrieval`` runs its ``vlm`` (a PaliGemma, ``config.vlm_config``) on the same ``input_ids`` and
``pixel_values`` and projects every position's last hidden state to a retrieval embedding, so the image tokens
are PaliGemma's (:mod:`.paligemma`): one per SigLIP patch, images in order, raster order inside each. The table
is read by PaliGemma's reader from ``vlm_config`` and labelled ``colpali``.
"""

from __future__ import annotations

import dataclasses

from ...errors import AttentionHookerError
from ..image_tokens import register_image_tokens
from .paligemma import paligemma_image_tokens

__all__ = ["colpali_image_tokens"]


@register_image_tokens("colpali")
def colpali_image_tokens(config, inputs, *, processor=None):
    """Image tokens of ColPali: its PaliGemma's (``config.vlm_config``). See the module doc."""
    vlm = getattr(config, "vlm_config", None)
    if vlm is None or getattr(vlm, "model_type", None) != "paligemma":
        raise AttentionHookerError(f"image_token_map: colpali is read through its PaliGemma vlm_config, got "
                                   f"{getattr(vlm, 'model_type', None)!r}")
    return dataclasses.replace(paligemma_image_tokens(vlm, inputs, processor=processor), family="colpali")
