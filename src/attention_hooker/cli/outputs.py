"""What ``run`` and ``demo`` write and print: the output folder, the pictures and the page, the summary.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence
import torch
from ..errors import CommandError
from .capture_runs import Capture
from .models import LoadedModel


def prepare_out(out) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".attention-hooker-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CommandError(f"cannot write to the output folder {out}: {err.strerror or err}; choose another with --out") from None
    return out


def check_save_path(path) -> str:
    """``--save FILE``: a ``.safetensors`` file whose folder can be written (checked before any work)."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise CommandError(f"--save {path}: captures are saved as safetensors; name the file .safetensors "
                           "(attention_hooker.to_numpy() gives numpy arrays)")
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"--save {path}: cannot create its folder {folder}: {err.strerror or err}") from None
    if Path(path).is_dir() or not os.access(folder, os.W_OK):
        raise CommandError(f"--save {path}: cannot write there; choose another file")
    return path


def _safe_name(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in layer) or "model"


def write_outputs(capture: Capture, out, *, title: str, grids: bool = True, progress_stream=None,
                  color_scale: Optional[str] = None, words=None, page_image=None) -> Dict[str, object]:
    """Writes per-layer head grids (unless ``grids=False``), the overview and the page into
    ``out``, showing progress over the grids on ``progress_stream`` (stderr); returns the paths.
    ``color_scale`` colours the pictures and the page; by default the pictures are linear and the
    page opens in its own default (log where linear would draw most weights as 0).
    With ``words`` (``to_words`` of the capture) the pictures are by words, and the page opens on
    the words (it carries the tokens too). ``page_image`` (``image_page_meta``) puts a vision-language
    run's image on the page, its tokens as a patch grid."""
    from .console import progress

    from ..page_scores import render_html
    from ..views.labels import AxisLabels
    from ..views.plot import plot_attention_grid, plot_attention_overview

    out = prepare_out(out)
    grids_dir = out / "grids"
    if grids_dir.is_dir():  # pictures of an earlier run would pass for this one's
        for stale in grids_dir.glob("*.png"):
            stale.unlink()
    written = []
    pictures_scale = color_scale or "linear"
    shown = capture.values if words is None else words
    labels = AxisLabels(capture.tokens if words is None else words.tokens,  # the page's rule, layer by layer
                        query_tokens=capture.query_tokens)
    layers = list(shown.items()) if grids else []
    for name, calls in progress(layers, desc="pictures", unit=" layers", stream=progress_stream,
                                disable=len(layers) < 2):
        weights = calls[0]
        q_tokens, k_tokens = labels.axes(tuple(weights.shape))
        path = grids_dir / f"{_safe_name(name)}.png"
        # The prompt's end is marked on maps over the generated sequence only (not on a vision tower's).
        over_sequence = capture.prompt_length is not None and weights.shape[-1] == len(capture.tokens[0])
        fig = plot_attention_grid(weights, query_tokens=q_tokens, key_tokens=k_tokens, layer_name=name, save_path=path,
                                  color_scale=pictures_scale,
                                  prompt_length=capture.prompt_length if over_sequence else None)
        fig.clear()
        written.append(path)
    overview = out / "overview.png"
    plot_attention_overview(shown, title=f"{title}: layers x heads" + ("" if words is None else " (words)"),
                            save_path=overview,
                            color_scale=pictures_scale).clear()
    rollout_path = None
    if capture.image is not None:  # vision: what the CLS token attends to, through every layer, on the image
        from ..analysis.rollout import attention_rollout
        from ..views.vit import plot_vit_attention

        image, prefix = capture.image
        rollout_path = out / "rollout.png"
        plot_vit_attention(attention_rollout(capture.values), image, prefix_tokens=prefix, heads=None,
                           title=f"{title}: attention rollout from CLS", save_path=rollout_path).clear()
    page = render_html(capture.values, tokens=capture.tokens, query_tokens=capture.query_tokens,
                       title=title, color_scale=color_scale, words=words, prompt_length=capture.prompt_length,
                       units="tokens" if words is None else "words", image=page_image).save(out / "attention.html")
    return {"grids": written, "overview": overview, "page": Path(page), "grids_skipped": not grids,
            "rollout": rollout_path, "words": words}


def notable_heads(values, tokens: Sequence[str]) -> List[str]:
    """A few sentences about heads that stand out: most on the first token, on the last one (not
    under a causal mask, where only the last query sees it), and on the previous token."""
    from ..analysis.stats import sink_share

    square = {name: calls[0] for name, calls in values.items() if calls[0].shape[-1] == calls[0].shape[-2]}
    if not square:
        return []
    names = list(square)
    lines = []
    first = torch.stack([sink_share(w, [0])[0] for w in square.values()])  # (layers, heads)
    last = torch.stack([sink_share(w, [-1])[0] for w in square.values()])
    prev = torch.stack([w[0].diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1).double() for w in square.values()])
    # Under a causal mask only the last query sees the last token: its share says nothing of a head.
    causal = all(bool((w.float().triu(1) == 0).all()) for w in square.values())
    sinks = [("first token", first, tokens[0] if tokens else "0")]
    if not causal:
        sinks.append(("last token", last, tokens[-1] if tokens else "-1"))
    for label, table, token in sinks:
        layer, head = divmod(int(table.argmax()), table.shape[1])
        lines.append(f"most on the {label} ({token}): {names[layer]} head {head}, {float(table.max()):.0%} of its attention")
    layer, head = divmod(int(prev.argmax()), prev.shape[1])
    lines.append(f"most on the previous token: {names[layer]} head {head}, {float(prev.max()):.0%} on average")
    return lines


def _key_labels(capture: Capture, weights) -> List[str]:
    """The labels of the keys of ``weights`` ``(batch, heads, query, key)`` (the page's rule), else
    the first list of tokens."""
    from ..views.labels import AxisLabels

    return AxisLabels(capture.tokens).axes(tuple(weights.shape))[1] or capture.tokens[0]


def summary(loaded: LoadedModel, capture: Capture, files: Dict[str, object], seconds: float) -> str:
    first = next(iter(capture.values.values()))[0]
    heads = sorted({calls[0].shape[1] for calls in capture.values.values()})
    lines = [
        f"model:   {loaded.name} ({loaded.kind})",
        f"layers:  {len(capture.values)} captured, {'/'.join(map(str, heads))} heads each",
        f"tokens:  {capture.pooled_from or len(capture.tokens[0])}"
        + (f" source, {len(capture.tokens[1])} target" if len(capture.tokens) > 1 else "")
        + (f"; {first.shape[-2]} query row(s) kept" if capture.query_tokens else ""),
    ]
    if capture.generated_text is not None:
        lines.append(f"text:    {capture.generated_text!r}")
    if files.get("words") is not None:
        words = files["words"]
        lines.append(f"words:   {len(words.tokens[0])} of the {words.positions} tokens (a word's pieces summed as keys, "
                     "averaged as queries: Clark et al. 2019); pictures and page by words (the page switches to tokens)")
    lines += [
        (f"grids:   {len(files['grids'])} PNGs in {Path(files['grids'][0]).parent}" if files["grids"]
         else "grids:   skipped (--no-grids)" if files.get("grids_skipped") else "grids:   none"),
        f"overview: {files['overview']}",
        f"page:    {files['page']}  (open it in a browser; works offline)",
    ]
    if files.get("rollout"):
        lines.append(f"rollout: {files['rollout']}  (attention rollout from CLS over the image)")
    if files.get("saved"):
        lines.append(f"saved:   {files['saved']}")
    lines += [f"note:    {note}" for note in capture.notes or []]
    notes = [] if capture.pooled_from else notable_heads(  # a pooled block is not a token
        capture.values, _key_labels(capture, first))
    if notes:
        lines.append("notable heads:")
        lines += [f"  - {n}" for n in notes]
    lines.append(f"done in {seconds:.1f} s")
    return "\n".join(lines)
