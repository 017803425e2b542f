"""Independent checks of an :class:`ImageTokens` table, from the model's own code path.

``sources_by_perturbation``: which ``pixel_values`` units each image token is computed from, found by
running the model: every attention module of the vision tower is made to return zeros (the residual
stream then carries each patch on its own, as the tower's MLPs, norms, poolings, merges and projectors
are what place patches into tokens), one unit of ``pixel_values`` is changed at a time, and the
positions whose language-model input embedding changed are that unit's tokens. For a model whose text
reads the image through cross-attention only (Mllama), the input watched is the cross-attention keys'
input instead (``embeds="cross_attention_states"``: the projected vision states, one row per key).

``centres_of_sources``: where in the image each token's source units are, read from an image whose
pixels encode their own coordinates (red = x, green = y) after the processor's own resizing, cropping
and tiling: the mean coordinate of the token's units, as fractions of the image.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Set, Tuple

import numpy as np
import torch


def _silence_attention(tower: torch.nn.Module):
    handles = []
    for name, module in tower.named_modules():
        if name and type(module).__name__.endswith(("Attention", "SdpaAttention", "FlashAttention2")) \
                and not any(type(c).__name__.endswith("Attention") for c in module.children()):
            def zero(m, args, output):
                if isinstance(output, tuple):
                    return (torch.zeros_like(output[0]),) + tuple(output[1:])
                return torch.zeros_like(output)
            handles.append(module.register_forward_hook(zero))
    if not handles:
        raise AssertionError("no attention module found in the vision tower")
    return handles


def _units(pixel_values: torch.Tensor, patch: int) -> Iterable[Tuple[int, Tuple]]:
    if pixel_values.dim() == 2:  # flattened patches (the Qwen family): a unit is a row
        for r in range(pixel_values.shape[0]):
            yield r, (r,)
        return
    flat = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    rows, cols = flat.shape[-2] // patch, flat.shape[-1] // patch
    for crop in range(flat.shape[0]):
        for r in range(rows):
            for c in range(cols):
                yield crop * rows * cols + r * cols + c, (crop, r, c)


def _perturbed(pixel_values: torch.Tensor, where: Tuple, patch: int) -> torch.Tensor:
    out = pixel_values.clone()
    if pixel_values.dim() == 2:
        out[where[0]] += 1.0
        return out
    flat = out.view(-1, *out.shape[-3:])
    crop, r, c = where
    flat[crop, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 1.0
    return out


def sources_by_perturbation(model, inputs: dict, *, tower: torch.nn.Module, language_model: torch.nn.Module,
                            patch: int, field: str = "pixel_values",
                            units: Optional[Iterable[int]] = None,
                            embeds: str = "inputs_embeds") -> Dict[Tuple[int, int], Set[int]]:
    """``{(batch, position): {unit, ...}}``: the ``pixel_values`` units each language-model input position
    depends on (positions depending on none are left out). ``units``: perturb only these (default all), e.g.
    to leave out padding crops, which some models (Idefics3) tell from real crops by their being all zeros.
    ``embeds`` names the keyword argument of the language model's forward watched, ``(batch, positions,
    features)``: its input embeddings by default, ``"cross_attention_states"`` for the keys of Mllama's
    cross-attention layers."""
    seen = {}
    units = None if units is None else set(units)

    def grab(m, args, kwargs):
        if kwargs.get(embeds) is None:
            raise AssertionError(f"the language model was called without {embeds!r}")
        # read per batch row, as the layers see it (Mllama hands its cross-attention states over as
        # (batch * images * tiles, keys of a tile, features); its layers view them as (batch, keys, features))
        watched = kwargs[embeds]
        seen["embeds"] = watched.detach().reshape(inputs["input_ids"].shape[0], -1, watched.shape[-1]).clone()

    handles = _silence_attention(tower) + [language_model.register_forward_pre_hook(grab, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
            base = seen["embeds"]
            found: Dict[Tuple[int, int], Set[int]] = {}
            for unit, where in _units(inputs[field], patch):
                if units is not None and unit not in units:
                    continue
                model(**dict(inputs, **{field: _perturbed(inputs[field], where, patch)}))
                changed = (seen["embeds"] - base).abs().amax(-1) > 1e-6  # (batch, sequence)
                for b, p in changed.nonzero().tolist():
                    found.setdefault((b, p), set()).add(unit)
    finally:
        for h in handles:
            h.remove()
    return found


def positions_fed_by_parameter(model, inputs: dict, parameter: torch.nn.Parameter, *, tower: torch.nn.Module,
                               language_model: torch.nn.Module,
                               embeds: str = "inputs_embeds") -> Set[Tuple[int, int]]:
    """``{(batch, position)}`` whose watched language-model input changes when ``parameter`` (e.g. the vision
    tower's class embedding) is shifted, with the tower's attention silenced as in
    :func:`sources_by_perturbation`: the tokens computed from that parameter rather than from patches."""
    seen = {}

    def grab(m, args, kwargs):
        watched = kwargs[embeds]
        seen["embeds"] = watched.detach().reshape(inputs["input_ids"].shape[0], -1, watched.shape[-1]).clone()

    handles = _silence_attention(tower) + [language_model.register_forward_pre_hook(grab, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
            base = seen["embeds"]
            # not a constant shift, which a LayerNorm right after would remove
            delta = torch.linspace(-1.0, 1.0, parameter.numel(), dtype=parameter.dtype).reshape(parameter.shape)
            parameter.add_(delta)
            try:
                model(**inputs)
            finally:
                parameter.sub_(delta)
            changed = (seen["embeds"] - base).abs().amax(-1) > 1e-6
    finally:
        for h in handles:
            h.remove()
    return {tuple(bp) for bp in changed.nonzero().tolist()}


def claimed_sources(tokens) -> Dict[Tuple[int, int], Set[int]]:
    """The same dictionary read from an :class:`ImageTokens` table (tokens with no source left out)."""
    out = {}
    for i in range(len(tokens)):
        units = {int(u) for u in tokens.source[i] if u >= 0}
        if units:
            out[(int(tokens.batch[i]), int(tokens.position[i]))] = units
    return out


def coordinate_image(height: int, width: int):
    """A PIL image whose red channel is x and green channel is y, as fractions of 255 across the image."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x + 0.5) / width * 255, (y + 0.5) / height * 255, np.full_like(x, 128.0)], -1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def centres_of_sources(tokens, pixel_values: torch.Tensor, mean, std) -> torch.Tensor:
    """``(n, 2)``: each token's mean ``(y, x)`` as fractions of the image, read from the coordinate image's
    pixels in its source units (NaN for a token with no source). ``pixel_values`` is ``(..., C, H, W)``
    (units are patches, ``tokens.patch`` pixels square) or ``(rows, C * ...)`` (a unit is a row, its
    features channel first, as the Qwen processors flatten ``(C, temporal, patch, patch)``)."""
    pv = pixel_values.double()
    mean = torch.tensor(mean, dtype=torch.float64)
    std = torch.tensor(std, dtype=torch.float64)
    out = torch.full((len(tokens), 2), float("nan"), dtype=torch.float64)
    if pv.dim() == 2:  # flattened patches, one per row (the Qwen family): each row's features channel first
        for i in range(len(tokens)):
            units = [int(u) for u in tokens.source[i] if u >= 0]
            if units:
                rgb = pv[units].reshape(len(units), len(mean), -1) * std[:, None] + mean[:, None]
                out[i, 0], out[i, 1] = rgb[:, 1].mean(), rgb[:, 0].mean()
        return out
    flat = pv.reshape(-1, *pv.shape[-3:])
    patch = tokens.patch
    rows, cols = flat.shape[-2] // patch, flat.shape[-1] // patch
    for i in range(len(tokens)):
        units = [int(u) for u in tokens.source[i] if u >= 0]
        if not units:
            continue
        xs, ys = [], []
        for u in units:
            crop, rest = divmod(u, rows * cols)
            r, c = divmod(rest, cols)
            block = flat[crop, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            rgb = block * std[:, None, None] + mean[:, None, None]
            xs.append(rgb[0].mean())
            ys.append(rgb[1].mean())
        out[i, 0] = torch.stack(ys).mean()
        out[i, 1] = torch.stack(xs).mean()
    return out
