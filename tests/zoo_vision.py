"""The zoo's vision and vision-language families (issue 23): sizes, inputs and oracles that the
generic harness (tests/zoo_harness.py) has no form for, hooked into it by one line each.

- :func:`adapt`: sizes a family needs after :func:`zoo_harness.shrink` (M-RoPE sections that add up to
  the shrunk head's rotary half, windows that fit the shrunk image);
- :func:`inputs_for`: inputs built from the config where the generic image batch does not fit (a packed
  vision tower's patches with the ``grid_thw`` that matches them);
- :func:`references`: the oracle where transformers' ``output_attentions`` is not attention (a packed
  tower records each attention module's *output* ``(S, C)``): every per-segment softmax the model's own
  ``eager_attention_forward`` returned, placed block-diagonally at the segment's positions by this
  file's loop.
"""

from __future__ import annotations

import contextlib
import sys
from typing import List, Optional, Tuple

import torch

# The packed vision towers' attention modules (transformers modeling module, class name): one eager
# or sdpa call per segment of cu_seqlens, in order, no mask; their map is assembled block-diagonally
# by attention_hooker.capture.segments.
PACKED_ATTENTION = {
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionAttention"),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionAttention"),
    ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeVisionAttention"),
    ("transformers.models.qwen4_exp.modeling_qwen4_exp", "Qwen4ExpVisionAttention"),
    ("transformers.models.glm4v.modeling_glm4v", "Glm4vVisionAttention"),
    ("transformers.models.glm4v_moe.modeling_glm4v_moe", "Glm4vMoeVisionAttention"),
    ("transformers.models.glm_ocr.modeling_glm_ocr", "GlmOcrVisionAttention"),
    ("transformers.models.glm_image.modeling_glm_image", "GlmImageVisionAttention"),
    ("transformers.models.glm5_next.modeling_glm5_next", "Glm5NextVisionAttention"),
    ("transformers.models.llava_onevision1_5.modeling_llava_onevision1_5", "LlavaOnevision15VisionAttention"),
    ("transformers.models.cohere_compass.modeling_cohere_compass", "CohereCompassVisionAttention"),
}

# Two images of different sizes, in patches (frames, rows, columns): rows and columns are multiples of the
# tower's spatial merge size (2 in every shrunk config here) and scaled by it where it is larger. With
# Qwen2.5-VL's windows of 2 x 2 merged cells (:func:`_fit_vision_windows`) the first spans two windows.
TWO_IMAGES = ((1, 4, 8), (1, 2, 4))


def _is_packed(module) -> bool:
    kind = type(module)
    return (kind.__module__, kind.__name__) in PACKED_ATTENTION


# Families whose shrunk image (32 px, patches of 8: 4 x 4 tokens) is smaller than their window or their
# stride: patches of 4 and windows of 4 tokens over two stages (Swin: 8 x 8 tokens, shifted windows in the
# first stage, one window in the second), set on the config and on its backbone / vision config.
_SWIN = dict(patch_size=4, window_size=4, depths=[2, 2], num_heads=[4, 4], num_layers=2)
FAMILY_SIZES = {
    "swin": _SWIN, "donut-swin": _SWIN, "maskformer-swin": _SWIN,
    "swinv2": dict(_SWIN, pretrained_window_sizes=[0, 0]),
    "swin2sr": dict(patch_size=1, window_size=4, depths=[2], num_heads=[4], image_size=16),
    # LeViT's stem is four stride-2 convolutions: a patch of 16, so a 64 px image of 4 x 4 tokens.
    "levit": dict(patch_size=16, image_size=64),
    # RT-DETR and its kin pick num_queries of the encoder's tokens: fewer than the shrunk image has.
    **{family: dict(num_queries=8) for family in ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")},
    # CvT reads its stage's drop-path rates at the stage's index (transformers), so stage s needs over s layers.
    "cvt": dict(depth=[1, 2, 3]),
}
IMAGE_TOKEN = 127  # the shrunk vocabulary's last id; the harness's text ids are 3 .. 99
# Qwen2-VL's special tokens, moved inside the shrunk vocabulary (above the harness's text ids 3 .. 99).
QWEN_VL_TOKENS = dict(image_token_id=124, video_token_id=125, vision_start_token_id=126, vision_end_token_id=127)

# The same for sub-configs: (model type, sub-config) -> sizes. SigLIP's text head projects to its own width;
# SAM's prompt encoder must match the 4 x 4 image embedding, whose windowed block gets windows of 2 x 2.
SUB_SIZES = {
    ("siglip", "text_config"): dict(projection_size=32),
    ("siglip2", "text_config"): dict(projection_size=32),
    ("vision-text-dual-encoder", "vision_config"): dict(pooler_output_size=32),
    ("sam", "vision_config"): dict(window_size=2, global_attn_indexes=[1], mlp_dim=64, output_channels=32,
                                       num_pos_feats=16),
    ("sam", "prompt_encoder_config"): dict(image_embedding_size=4),
    ("sam", "mask_decoder_config"): dict(mlp_dim=64, iou_head_hidden_dim=32),
    ("sam_hq", "vision_config"): dict(window_size=2, global_attn_indexes=[1], mlp_dim=64, output_channels=32,
                                       num_pos_feats=16),
    ("sam_hq", "prompt_encoder_config"): dict(image_embedding_size=4),
    ("sam_hq", "mask_decoder_config"): dict(mlp_dim=64, iou_head_hidden_dim=32, vit_dim=32),
    ("siglip2", "vision_config"): dict(num_patches=16),
    ("kosmos-2", None): dict(latent_query_num=4),
    ("qwen2_vl", None): QWEN_VL_TOKENS,
    ("qwen2_5_vl", None): QWEN_VL_TOKENS,
    ("qwen2_5_vl", "vision_config"): dict(out_hidden_size=32),  # the merger's width: the text model's
    ("blip-2", "qformer_config"): dict(encoder_hidden_size=32),
    ("blip-2", "text_config"): dict(word_embed_proj_dim=32),  # OPT's embeddings: the shrunk width
    ("instructblip", "qformer_config"): dict(encoder_hidden_size=32),
    ("instructblipvideo", "qformer_config"): dict(encoder_hidden_size=32),
    ("blip_2_qformer", None): dict(encoder_hidden_size=32),
    ("blip-2", None): dict(num_query_tokens=4, image_token_index=IMAGE_TOKEN, image_token_id=IMAGE_TOKEN),
    ("instructblip", None): dict(num_query_tokens=4, image_token_index=IMAGE_TOKEN, image_token_id=IMAGE_TOKEN),
    ("instructblipvideo", None): dict(num_query_tokens=4, video_token_index=IMAGE_TOKEN),
    ("instructblip", "text_config"): dict(word_embed_proj_dim=32),
    ("instructblipvideo", "text_config"): dict(word_embed_proj_dim=32),
    ("siglip2_vision_model", None): dict(num_patches=16),
}


def adapt(model_type: str, config) -> None:
    """Sizes ``model_type`` needs on top of the harness's shrink, set on ``config`` in place."""
    for key, value in FAMILY_SIZES.get(model_type, {}).items():
        setattr(config, key, value)
    for (family, part), sizes in SUB_SIZES.items():
        if family == model_type:
            for key, value in sizes.items():
                setattr(getattr(config, part) if part else config, key, value)
    for sub in [config] + [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]:
        _fit_mrope_sections(sub)
        if getattr(sub, "model_type", "").endswith("_vision") or "vision" in type(sub).__name__.lower():
            _fit_vision_windows(sub)


def _fit_mrope_sections(config) -> None:
    """M-RoPE (Qwen2-VL, GLM-4V and their kin) splits each head's rotary frequencies into (time, height,
    width) sections that must add up to half the rotary width; the shrunk head (8) has 4 (or, with a
    partial rotary factor of 1/2, 2, which is widened to a head of 16 so that each axis keeps one)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not hasattr(config, "num_attention_heads") or "vision" in config.model_type:
        return
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    if "mrope_section" not in rope and not _declares_mrope(config):
        return
    current = rope.get("mrope_section")
    if current and sum(current) == int(head * factor) // 2:
        return  # already fits (a family the shrink left right)
    if int(head * factor) // 2 < 3:
        head = 16
        config.head_dim = head
    half = int(head * factor) // 2
    third = half // 3
    rope["mrope_section"] = [half - 2 * third, third, third]


def _declares_mrope(config) -> bool:
    """Whether ``config``'s text model reads ``mrope_section`` (its modeling module names it)."""
    name = type(config).__module__.replace("configuration_", "modeling_")
    try:
        source = open(sys.modules[name].__file__).read() if name in sys.modules else _source_of(name)
    except (OSError, ImportError, AttributeError):
        return False
    return "mrope_section" in source


def _source_of(module_name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module_name)
    return open(spec.origin).read() if spec and spec.origin else ""


def _fit_vision_windows(config) -> None:
    """Qwen2.5-VL's windowed tower: windows of 2 x 2 merged cells (so that the larger test image spans
    two), with the second block attending globally."""
    if hasattr(config, "fullatt_block_indexes") and hasattr(config, "window_size"):
        merge = getattr(config, "spatial_merge_size", 2)
        config.window_size = config.patch_size * merge * 2
        config.fullatt_block_indexes = [1]


def inputs_for(model, config) -> Optional[Tuple[dict, None]]:
    """``(inputs, None)`` for a packed vision tower (``hidden_states`` or ``pixel_values`` ``(S, C)`` of
    flattened patches, channels x frames x patch x patch, and the ``grid_thw`` of two images, ``S`` = the
    grid's patches), or ``None`` where the harness's own form fits."""
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    builder = INPUTS.get(getattr(config, "model_type", None))
    if builder is not None:
        return builder(config)
    if "spatial_shapes" in params and "pixel_attention_mask" in params:
        return _patchified_images(model, config, params)
    if params[1:2] != ["grid_thw"] or params[0] not in ("hidden_states", "pixel_values") \
            or not any(_is_packed(m) for m in model.modules()):
        return None
    merge = int(getattr(config, "spatial_merge_size", 2) or 2)
    grid = torch.tensor([[t, h * merge // 2, w * merge // 2] for t, h, w in TWO_IMAGES])
    features = (int(getattr(config, "in_channels", 3)) * int(getattr(config, "temporal_patch_size", 1) or 1)
                * int(config.patch_size) ** 2)
    torch.manual_seed(1)
    return {params[0]: torch.randn(int(grid.prod(-1).sum()), features), "grid_thw": grid}, None


# Attentions transformers returns under their own names: SAM's tower's (its mask decoder's are each
# SamAttention call's own weights: OWN_WEIGHTS), Kosmos-2's image-to-text projection's.
EXTRA_FIELDS = {"sam": ("vision_attentions",), "sam_hq": ("vision_attentions",),
                "kosmos-2": ("projection_attentions",)}


def _image(config, frames: int = 0) -> torch.Tensor:
    """Two random images ``(2, C, S, S)`` (or ``frames`` of each, ``(2, frames, C, S, S)``) of the vision
    config's size."""
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    shape = (2, frames) if frames else (2,)
    torch.manual_seed(1)
    return torch.randn(*shape, getattr(vision, "num_channels", 3), size, size)


def _text(config):
    import zoo_harness

    return zoo_harness._text_inputs(config)


def _blip2(config, frames: int = 0, qformer: bool = False):
    """BLIP-2 / InstructBLIP: one image (or ``frames`` of it) per row, whose ``num_query_tokens`` Q-Former
    outputs replace as many image tokens (``image_token_index``) put before the harness's text batch (the
    second row padded by two tokens at the end); InstructBLIP's Q-Former reads the text too."""
    text, mask = _text(config)
    queries = config.num_query_tokens * max(frames, 1)
    ids = torch.cat([torch.full((2, queries), IMAGE_TOKEN), text["input_ids"]], 1)
    mask = torch.cat([torch.ones(2, queries, dtype=mask.dtype), mask], 1)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_image(config, frames))
    if qformer:
        inputs.update(qformer_input_ids=text["input_ids"], qformer_attention_mask=text["attention_mask"])
    return inputs, mask


def _kosmos2(config):
    """Kosmos-2: ``latent_query_num`` image-embedding positions after the first token, marked by
    ``image_embeds_position_mask``, then text; the second row padded by two tokens at the end."""
    text, mask = _text(config)
    positions = torch.zeros_like(text["input_ids"])
    positions[:, 1:1 + config.latent_query_num] = 1
    return dict(text, pixel_values=_image(config), image_embeds_position_mask=positions), mask


def _qformer(config):
    """BLIP-2's Q-Former alone: ``num_query_tokens``-like query embeddings (4) over 5 image features."""
    torch.manual_seed(1)
    return dict(query_embeds=torch.randn(2, 4, config.hidden_size),
                encoder_hidden_states=torch.randn(2, 5, config.encoder_hidden_size)), None


def _qwen_vl(config):
    """Qwen2-VL / Qwen2.5-VL with their images: row ``r`` holds image ``r`` of :data:`TWO_IMAGES` as
    ``vision_start`` then one image token per merged cell (``h * w / merge**2``) then ``vision_end``,
    between text tokens; the row with the smaller image is padded at the end to the same length. The tower
    gets both images' flattened patches (``pixel_values (S, C * t * p * p)``) and their ``image_grid_thw``;
    ``mm_token_type_ids`` marks the image tokens."""
    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    grid = torch.tensor([[t, h * merge // 2, w * merge // 2] for t, h, w in TWO_IMAGES])
    cells = (grid.prod(-1) // merge ** 2).tolist()
    torch.manual_seed(1)
    rows = []
    for n in cells:
        rows.append([int(x) for x in torch.randint(3, 100, (2,))] + [config.vision_start_token_id]
                    + [config.image_token_id] * n + [config.vision_end_token_id]
                    + [int(x) for x in torch.randint(3, 100, (2,))])
    length = max(len(r) for r in rows)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    features = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), features)
    kinds = (ids == config.image_token_id).long()  # mm_token_type_ids: text 0, image 1 (M-RoPE's positions)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=kinds, pixel_values=pixels,
                image_grid_thw=grid), mask


INPUTS = {
    "qwen2_vl": _qwen_vl,
    "qwen2_5_vl": _qwen_vl,
    "blip-2": _blip2,
    "instructblip": lambda config: _blip2(config, qformer=True),
    "instructblipvideo": lambda config: _blip2(config, frames=2, qformer=True),
    "kosmos-2": _kosmos2,
    "blip_2_qformer": _qformer,
}


def _patchified_images(model, config, params):
    """SigLIP 2's inputs: two images already cut into patches, ``pixel_values (2, N, C * p * p)``, of 4 x 4 and
    2 x 4 patches (``spatial_shapes``), the second padded to ``N`` (``pixel_attention_mask``, also the rows the
    harness compares of the vision model); with the harness's text batch where the model reads text too."""
    import zoo_harness

    vision = getattr(config, "vision_config", None) or config
    shapes = torch.tensor([[4, 4], [2, 4]])
    patches = int(vision.num_patches)
    torch.manual_seed(1)
    pixels = torch.randn(2, patches, int(vision.num_channels) * int(vision.patch_size) ** 2)
    mask = torch.zeros(2, patches, dtype=torch.long)
    for row, (h, w) in enumerate(shapes.tolist()):
        mask[row, :h * w] = 1
    inputs = dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    if "input_ids" not in params:
        return inputs, mask
    text, text_mask = zoo_harness._text_inputs(config)
    return dict(text, **inputs), text_mask


# transformers' BLIP-2 Q-Former records its cross-attentions among `attentions` (every multi-head attention
# module) and again as `cross_attentions`, the same tensor: each is kept once (equal maps of different layers
# are all kept: in the shrunk towers, layers 0 and 1 can attend uniformly alike).
QFORMER_TWICE = {"blip-2", "blip_2_qformer", "instructblip", "instructblipvideo"}


def references(model, inputs: dict, found: List[torch.Tensor], forward) -> List[torch.Tensor]:
    """``found`` (transformers' attentions) with each packed vision attention call's output ``(S, C)``,
    which transformers records as its 'attention', replaced by the call's map ``(1, heads, S, S)``: the
    softmaxes its own ``eager_attention_forward`` returned, one per segment, placed block-diagonally
    (segment ``i`` at rows and keys ``o_i .. o_i + L_i``, zeros elsewhere) by :func:`block_diagonal`.
    ``forward(model, inputs)`` runs the (eager) model. Models without such a module: ``found`` as it is."""
    if getattr(model.config, "model_type", None) in EXTRA_FIELDS:  # attentions returned under their own name
        output = forward(model, inputs, output_attentions=True)
        for name in EXTRA_FIELDS[model.config.model_type]:
            value = getattr(output, name, None)
            found = found + ([value] if isinstance(value, torch.Tensor) else
                             [a for a in (value or ()) if isinstance(a, torch.Tensor)])
    if getattr(model.config, "model_type", None) in QFORMER_TWICE:  # the Q-Former's cross-attentions, twice
        once: List[torch.Tensor] = []
        for ref in found:
            if not any(r is ref or (r.shape == ref.shape and r.data_ptr() == ref.data_ptr()) for r in once):
                once.append(ref)
        found = once
    found = every_window_call(model, inputs, found, forward) + own_weights(model, inputs, forward)
    calls = packed_calls(model, lambda: forward(model, inputs))
    if not calls:
        return found
    outputs = [out for _, out, _ in calls]
    kept = [r for r in found if not any(r.shape == o.shape and torch.equal(r, o) for o in outputs)]
    return kept + [block_diagonal(pieces) for _, _, pieces in calls]


def packed_calls(model, run) -> List[Tuple[str, torch.Tensor, List[torch.Tensor]]]:
    """Every call of a packed vision attention module of ``model`` during ``run()``: ``(layer name, output,
    pieces)``, ``pieces`` the weights ``(1, heads, L_i, L_i)`` its modeling module's ``eager_attention_forward``
    returned, in call order. Only an eager model returns them (sdpa calls are not recorded)."""
    layers = [(name, m) for name, m in model.named_modules() if _is_packed(m)]
    if not layers:
        return []
    calls, current, handles = [], [], []
    for name, module in layers:
        handles.append(module.register_forward_pre_hook(lambda m, a, k, name=name: current.append((name, [])),
                                                        with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda m, a, out: calls.append((current[-1][0], out, current.pop()[1]))))
    with contextlib.ExitStack() as stack:
        for modeling in {type(m).__module__ for _, m in layers}:
            stack.enter_context(_recording(sys.modules[modeling], current))
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
    return calls


@contextlib.contextmanager
def _recording(modeling, current: list):
    original = modeling.eager_attention_forward

    def recorded(*args, **kwargs):
        output, weights = original(*args, **kwargs)
        if current:
            current[-1][1].append(weights.detach().clone())
        return output, weights

    modeling.eager_attention_forward = recorded
    try:
        yield
    finally:
        modeling.eager_attention_forward = original


def block_diagonal(pieces: List[torch.Tensor]) -> torch.Tensor:
    """``(1, heads, S, S)`` with piece ``i`` ``(1, heads, L_i, L_i)`` at ``[o_i : o_i + L_i]`` on both axes.

    Example:
        >>> block_diagonal([torch.ones(1, 1, 1, 1), torch.full((1, 1, 2, 2), 0.5)])[0, 0]
        tensor([[1.0000, 0.0000, 0.0000],
                [0.0000, 0.5000, 0.5000],
                [0.0000, 0.5000, 0.5000]])
    """
    total = sum(p.shape[-1] for p in pieces)
    out = pieces[0].new_zeros(1, pieces[0].shape[1], total, total)
    start = 0
    for piece in pieces:
        length = piece.shape[-1]
        out[:, :, start:start + length, start:start + length] = piece
        start += length
    return out



# Swin-style window attention modules, which return their per-window weights ``(batch * windows, heads, N, N)``
# (with output_attentions, or always) while transformers records only each stage's last block's.
WINDOW_ATTENTION = {"SwinAttention", "DonutSwinSelfAttention", "Swinv2SelfAttention", "Swin2SRSelfAttention",
                    "MaskFormerSwinSelfAttention"}
# Attention modules that return their weights ``(batch * point batch, heads, query, key)`` while transformers
# returns none of them (SAM's two-way mask decoder): each call's own weights are the oracle, appended.
OWN_WEIGHTS = {"SamAttention", "SamHQAttention"}


def every_window_call(model, inputs: dict, found: List[torch.Tensor], forward) -> List[torch.Tensor]:
    """``found`` with transformers' Swin-style attentions (each stage's last block only) replaced by every
    window attention call's own weights, in call order (the harness places them at the image's tokens).
    Each of transformers' is checked to be one of them first. Models without such modules: ``found``."""
    layers = [m for m in model.modules() if type(m).__module__.startswith("transformers.")
              and type(m).__name__ in WINDOW_ATTENTION]
    if not layers:
        return found
    recorded: List[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, out: recorded.append(out[1]) if isinstance(out, tuple)
                                       and len(out) > 1 and getattr(out[1], "dim", lambda: 0)() == 4 else None)
               for m in layers]
    try:
        forward(model, inputs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    if not recorded:  # weights not returned (MaskFormer's backbone: see the harness's SWIN_RECOMPUTED)
        return found
    kept = []
    for ref in found:
        if ref.dim() == 4 and ref.shape[-1] == ref.shape[-2] and any(
                r.shape == ref.shape and torch.equal(r, ref) for r in recorded):
            continue  # one of the calls below
        if ref.dim() == 4 and ref.shape[-1] == ref.shape[-2] and ref.shape[-1] in {r.shape[-1] for r in recorded}:
            raise AssertionError(f"transformers' window attention {tuple(ref.shape)} is none of the window calls")
        kept.append(ref)
    return kept + recorded


def own_weights(model, inputs: dict, forward) -> List[torch.Tensor]:
    """Every call's own returned weights of the :data:`OWN_WEIGHTS` modules of ``model``, in call order."""
    layers = [m for m in model.modules() if type(m).__module__.startswith("transformers.")
              and type(m).__name__ in OWN_WEIGHTS]
    recorded: List[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, out: recorded.append(out[1])) for m in layers]
    try:
        if layers:
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


# The oracles adapted here, merged into the harness's ORACLE_NOTES.
ORACLE_NOTES = {
    "packed vision towers (qwen2_5_vl_vision, qwen3_vl_vision, glm4v_vision, ...)": (
        "transformers records each attention module's output (S, C) as 'attentions': replaced by the module's own "
        "per-image softmaxes (its modeling module's eager_attention_forward, on the eager tower), placed "
        "block-diagonally by tests/zoo_vision.py"),
    "swin, swinv2, donut-swin, swin2sr": (
        "transformers returns each stage's last block's window attentions only: every window attention module's "
        "own returned weights, in call order (transformers' checked to be among them), placed at the image's "
        "tokens as for MaskFormer's backbone"),
    "blip-2, blip_2_qformer": (
        "transformers returns each Q-Former cross-attention twice (in attentions, which records every multi-head "
        "attention module, and in cross_attentions), the same tensor: compared once"),
    "sam, sam_hq": (
        "transformers returns the tower's attentions as vision_attentions (compared as for sam_vision_model) and "
        "not the two-way mask decoder's: each SamAttention call's own returned weights (batch * point batch, "
        "heads, query, key) are the decoder's oracle"),
}

# Families whose refused layers have no (batch, heads, query, key) map over keys, merged into the harness's
# EXPECTED_REFUSALS and NO_ATTENTION_MAP: RT-DETR's decoders read the encoder's multi-scale features by
# deformable attention (a softmax over sampled points); their self-attention and the encoder's are judged.
EXPECTED_REFUSALS = {
    family: (r"decoder\.layers\.\d+\.encoder_attn(\.attn)?$",
             "multi-scale deformable attention: a softmax over sampled points, not keys")
    for family in ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")
}
NO_ATTENTION_MAP = set(EXPECTED_REFUSALS)
