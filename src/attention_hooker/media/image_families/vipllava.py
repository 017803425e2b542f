"""VipLLaVA (``vipllava``): LLaVA's layout, features of several tower layers per patch.

The processor and the CLIP tower are LLaVA's (:mod:`.llava`). The projector concatenates, for every patch,
the hidden states of the layers in ``vision_feature_layer`` (``[-2, -5, -8, -11, 6]`` by default), always
without the class token, so image token ``j`` of an image is its patch ``j`` in raster order, images in
order: LLaVA's table with the ``"default"`` strategy, read here by LLaVA's own reader and relabelled. Layers
mix patches only through the tower's attention, which the reader, like LLaVA's, does not follow: a token's
source is its own patch. VipLLaVA has no select strategy; a config that sets one other than ``"default"`` is
refused rather than read as LLaVA would read it.
"""

from __future__ import annotations

import dataclasses

from ...errors import AttentionHookerError
from ..image_tokens import register_image_tokens
from .llava import llava_image_tokens

__all__ = ["vipllava_image_tokens"]


@register_image_tokens("vipllava")
def vipllava_image_tokens(config, inputs, *, processor=None):
    """Image tokens of VipLLaVA: image ``j // N``, patch ``j % N`` in raster order (``N = side^2``, no class
    token). See the module doc.

    Example:
        >>> from transformers import VipLlavaConfig
        >>> import torch
        >>> from attention_hooker.media import image_token_map
        >>> config = VipLlavaConfig(vision_config=dict(image_size=16, patch_size=8), image_token_index=60)
        >>> tokens = image_token_map(config, dict(input_ids=torch.tensor([[1] + [60] * 8])))
        >>> tokens.family, tokens.image.tolist(), tokens.row.tolist(), tokens.col.tolist()
        ('vipllava', [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1])
    """
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in (None, "default"):
        raise AttentionHookerError(
            f"image_token_map: vipllava always drops the class token, but its config sets "
            f"vision_feature_select_strategy={strategy!r}; remove it")
    return dataclasses.replace(llava_image_tokens(config, inputs, processor=processor), family="vipllava")
