"""Shared checks of a vision-language model's capture (issue 23, parts 2-3), against the model's own eager
attentions: the language model's layers (``output_attentions`` of the whole model, and per step under
``generate``), the vision tower's layers (the tower's own ``output_attentions`` on the same pixel values),
and text-to-image attention read on the reader's grid against a slice of the eager map."""

from __future__ import annotations

import re
from functools import partial
from typing import Callable, Dict, List

import torch

from attention_hooker import TransformerAttentionHooker
from attention_hooker.analysis.image_attention import image_attention


def _by_layer(values: Dict[str, List[torch.Tensor]]) -> Dict[int, List[torch.Tensor]]:
    out = {}
    for name, calls in values.items():
        index = int(re.search(r"layers?\.(\d+)\.", name).group(1))
        assert index not in out, f"two captured modules for layer {index}: {sorted(values)}"
        out[index] = calls
    return out


def capture(model, regex: str, run: Callable[[], object]) -> Dict[int, List[torch.Tensor]]:
    with TransformerAttentionHooker(model, layer_regex=regex) as hooker:
        with torch.no_grad():
            run()
    return _by_layer(hooker.values)


def assert_language_model_exact(make_model, inputs: dict, *, regex: str, layers: int, atol=1e-5):
    """The capture of every language-model layer, on sdpa and on eager, equals the eager model's
    ``output_attentions``; returns the eager attentions."""
    eager = make_model("eager")
    with torch.no_grad():
        output = eager(**inputs, output_attentions=True)
        sdpa_logits = make_model("sdpa")(**inputs).logits
    # the comparison means something only if Hugging Face's sdpa and eager paths compute the same model
    torch.testing.assert_close(sdpa_logits, output.logits, atol=1e-4, rtol=0)
    reference = output.attentions
    assert len(reference) == layers
    for implementation in ("sdpa", "eager"):
        model = make_model(implementation)
        got = capture(model, regex, partial(model, **inputs))
        assert sorted(got) == list(range(layers)), f"{implementation}: captured layers {sorted(got)}"
        for i in range(layers):
            assert len(got[i]) == 1
            torch.testing.assert_close(got[i][0], reference[i], atol=atol, rtol=0,
                                       msg=lambda m, where=f"{implementation}, layer {i}": f"{where}: {m}")
    return reference


def assert_tower_exact(make_model, inputs: dict, *, regex: str, tower: Callable, tower_inputs: dict, layers: int,
                       atol=1e-5):
    """The capture of every vision-tower layer in the whole model's forward (sdpa and eager) equals the eager
    tower's own ``output_attentions`` on ``tower_inputs``."""
    eager = make_model("eager")
    with torch.no_grad():
        reference = tower(eager)(**tower_inputs, output_attentions=True).attentions
    assert len(reference) == layers
    for implementation in ("sdpa", "eager"):
        model = make_model(implementation)
        got = capture(model, regex, partial(model, **inputs))
        assert sorted(got) == list(range(layers)), f"{implementation}: captured layers {sorted(got)}"
        for i in range(layers):
            torch.testing.assert_close(torch.cat(got[i]), reference[i], atol=atol, rtol=0,
                                       msg=lambda m, where=f"tower on {implementation}, layer {i}": f"{where}: {m}")


def assert_generate_exact(make_model, inputs: dict, *, regex: str, layers: int, steps: int = 3, atol=1e-5):
    """Under ``generate``, each captured step call of each language-model layer (sdpa) equals the eager
    model's per-step attentions."""
    kwargs = dict(inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    eager, sdpa = make_model("eager"), make_model("sdpa")
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
    got = capture(sdpa, regex, lambda: sdpa.generate(**kwargs))
    assert len(reference.attentions) == steps
    for i in range(layers):
        assert len(got[i]) == steps, f"layer {i}: {len(got[i])} calls for {steps} steps"
        for step in range(steps):
            torch.testing.assert_close(got[i][step], reference.attentions[step][i], atol=atol, rtol=0,
                                       msg=lambda m, where=f"generate step {step}, layer {i}": f"{where}: {m}")
    return got


def assert_image_attention_is_the_eager_slice(attention: torch.Tensor, reference: torch.Tensor, tokens,
                                              queries=(-1,)):
    """``image_attention`` of a captured map equals the eager map sliced at the reader's positions, and each
    token's weight sits evenly on the cells of its view it covers (nothing elsewhere)."""
    for b in sorted(set(tokens.batch.tolist())):
        got = image_attention(attention, tokens, batch=b, queries=list(queries))
        row = tokens.in_row(b)
        expected = reference[b][:, list(queries)][..., row.position].double()  # (H, q, n)
        torch.testing.assert_close(got.weights, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.share, expected.sum(-1), atol=1e-6, rtol=0)
        assert sorted(got.grids) == sorted(set(row.view.tolist()))
        for k, grid in got.grids.items():
            view = tokens.views[k]
            assert grid.shape[-2:] == (view.rows, view.cols)
            covered = torch.zeros(view.rows, view.cols, dtype=torch.bool)
            for i in (row.view == k).nonzero().flatten().tolist():
                r, c, h, w = (int(t[i]) for t in (row.row, row.col, row.height, row.width))
                block = grid[..., r:r + h, c:c + w]
                torch.testing.assert_close(block, (expected[..., i] / (h * w))[..., None, None].expand_as(block),
                                           atol=1e-7, rtol=0)
                covered[r:r + h, c:c + w] = True
            assert bool((grid[..., ~covered] == 0).all())
