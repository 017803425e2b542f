"""VipLLaVA (``vipllava``): LLaVA's layout, features of several tower layers per patch.

The processor and the CLIP tower are LLaVA's (:mod:`.llava`). The projector concatenates, for every patch,
the hidden states of the layers in ``vision_feature_layer`` (``[-2, -5, -8, -11, 6]`` by default), always
without the class token, so image token ``j`` of an image is its patch ``j`` in raster order, images in
order. Layers mix patches only through the tower's attention, which the reader, like LLaVA's, does not
follow: a token's source is its own patch. There is no select strategy; the class token never reaches
the language model.
"""

from __future__ import annotations

from ..image_tokens import register_image_tokens
from .llava import square_patch_tokens

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
        >>> tokens.image.tolist(), tokens.row.tolist(), tokens.col.tolist()
        ([0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1])
    """
    return square_patch_tokens(config, inputs, "vipllava", full=False)
