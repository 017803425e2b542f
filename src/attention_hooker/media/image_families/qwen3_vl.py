"""Qwen3-VL and Qwen3-VL-MoE (``qwen3_vl``, ``qwen3_vl_moe``): Qwen2-VL's merge-block layout, with
timestamped video frames and deepstack features.

The image processor and the tower's merger are Qwen2-VL's (:mod:`.qwen_vl`): each image is a
``(t, grid_h, grid_w)`` grid of patch rows in merge-block order, every ``merge^2`` consecutive rows merged
into one language-model token. What differs does not move a token:

- videos: the processor writes each temporal step of a video as its own group, a timestamp in text
  (``<0.5 seconds>``) then ``<|vision_start|>``, that step's ``grid_h * grid_w / merge^2`` video tokens,
  ``<|vision_end|>``. The reader finds video tokens by their id, so the text between steps only shifts
  positions; each step is still the view ``"frame t"`` and its tokens still come from that step's rows.
- deepstack: features merged from earlier tower blocks are added to the hidden states of the first language
  layers at the same image positions, from the same rows, so a token's sources are unchanged.
- the tower's learned position embedding (interpolated to each grid) depends on the grid, not on pixels.

Sources, views and boxes are as in :mod:`.qwen_vl`: video rows are numbered after the image rows.
"""

from __future__ import annotations

from ..image_tokens import register_image_tokens
from .qwen_vl import qwen_vl_image_tokens

__all__ = ["qwen3_vl_image_tokens"]


@register_image_tokens("qwen3_vl", "qwen3_vl_moe")
def qwen3_vl_image_tokens(config, inputs, *, processor=None):
    """Image (and video) tokens of Qwen3-VL / Qwen3-VL-MoE: Qwen2-VL's merge blocks, video steps found by
    their tokens wherever the timestamps put them. See the module doc.

    Example:
        >>> from transformers import Qwen3VLConfig
        >>> import torch
        >>> from attention_hooker.media import image_token_map
        >>> config = Qwen3VLConfig(vision_config=dict(spatial_merge_size=2), image_token_id=60, video_token_id=61)
        >>> ids = torch.tensor([[1, 9, 61, 8, 9, 61, 8]])  # a 2-step video of 2 x 2 patches, one token a step
        >>> tokens = image_token_map(config, dict(input_ids=ids, video_grid_thw=torch.tensor([[2, 2, 2]])))
        >>> tokens.position.tolist(), [v.name for v in tokens.views], tokens.source.tolist()
        ([2, 5], ['frame 0', 'frame 1'], [[0, 1, 2, 3], [4, 5, 6, 7]])
    """
    return qwen_vl_image_tokens(config, inputs, processor=processor)
