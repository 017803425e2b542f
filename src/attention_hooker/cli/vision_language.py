"""``attention-hooker run --model VLM --image FILE --text "..." [--generate N]``: a vision-language model
folder (its processor beside it), one image and a text, every attention layer captured.

Besides the usual grids, overview and page, it writes one overlay per language-model layer
(``image-overlays/<layer>.png``): the last prompt token's attention (and, with ``--generate``, each
step's) on the image tokens, drawn over the original image, the share that went to the image said
(:mod:`attention_hooker.views.image_overlay`). Image tokens are read with
:func:`~attention_hooker.media.image_token_map`, so any family with a reader works.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import AttentionHookerError, CommandError
from .capture_runs import Capture
from .models import LoadedModel, load_vision_language, to_model_device, token_labels

__all__ = ["check_image_text_options", "capture_image_text", "image_region", "write_image_overlays",
           "run_image_text", "ImageTextRun"]


@dataclass
class ImageTextRun:
    """One captured image-and-text run: the capture, the image tokens and what the overlays need."""

    capture: Capture
    tokens: object  # ImageTokens of batch row 0
    picture: object  # the original image (PIL)
    language_layers: List[str]  # the captured layers of the language model (keys = the sequence)
    queries: List[int]  # the query positions drawn: the last prompt token, then each generation step's
    query_labels: List[str]
    notes: List[str] = field(default_factory=list)


def check_image_text_options(args) -> None:
    """The options that do not go with an image and a text (checked before any work)."""
    given = [option for option, value in (("--target", args.target), ("--rows", args.rows), ("--pool", args.pool),
                                          ("--stream", args.stream), ("--text-file", args.text_file),
                                          ("--batching", args.batching)) if value is not None]
    if args.words:
        given.append("--words")
    if given:
        raise CommandError(f"--image with --text runs a vision-language model on one image and one text; "
                           f"{'/'.join(given)} do not go with it")


def _open_image(image_path):
    try:
        from PIL import Image

        with Image.open(image_path) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read the image {image_path}: {err}") from None


def _with_image_token(processor, text: str, notes: List[str]) -> str:
    """The text, with the processor's image placeholder put first if it names one and the text has none."""
    token = getattr(processor, "image_token", None)
    if isinstance(token, str) and token and token not in text:
        notes.append(f"the text had no {token}; it was put first (write {token} where the image goes)")
        return f"{token} {text}"
    return text


def _language_layers(model, values: Dict[str, list], length: int) -> List[str]:
    """The captured layers of the language model: under ``model.get_decoder()``, with maps over the sequence."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((name for name, module in model.named_modules() if module is decoder), None)
    if prefix is None:
        raise CommandError(f"{type(model).__name__} names no language model (get_decoder()); the image overlays "
                           "need its layers")
    return [name for name, calls in values.items()
            if (name.startswith(prefix + ".") or name == prefix) and calls[0].shape[-1] == length]


def _sequence_labels(tokenizer, ids, tokens) -> List[str]:
    """Token labels, each image token named by its image, view and cell (``img0 r1c2``)."""
    labels = token_labels(tokenizer, ids)
    for i in range(len(tokens)):
        view = tokens.views[int(tokens.view[i])]
        where = "" if view.index == 0 else f" {view.name}"
        labels[int(tokens.position[i])] = f"img{view.image}{where} r{int(tokens.row[i])}c{int(tokens.col[i])}"
    return labels


def capture_image_text(loaded: LoadedModel, image_path, text: str, *, layers: Optional[str] = None,
                       generate: int = 0) -> ImageTextRun:
    """Runs the image and the text through the model (and generates ``generate`` tokens, each step
    captured and stitched into one causal map per layer)."""
    from ..analysis.core import stitch_steps
    from ..hooker import TransformerAttentionHooker
    from ..media.image_tokens import image_token_map

    if not text or not text.strip():
        raise CommandError("the text is empty: pass --text with some words")
    picture = _open_image(image_path)
    notes: List[str] = []
    processor = loaded.processor
    try:
        enc = processor(images=picture, text=_with_image_token(processor, text, notes), return_tensors="pt")
    except Exception as err:
        raise CommandError(f"{type(processor).__name__} could not take the image and the text: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    tokens = image_token_map(loaded.model, enc, processor=processor).in_row(0)  # before any forward: refusals first
    enc = to_model_device(loaded, enc)
    hooker = TransformerAttentionHooker(loaded.model, layers, device="cpu")
    prompt = int(enc["input_ids"].shape[-1])
    tokenizer = loaded.tokenizer
    if generate:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad(), hooker:
            out = loaded.model.generate(**enc, max_new_tokens=generate, do_sample=False, pad_token_id=pad)
        values = {name: [stitch_steps(calls)] for name, calls in hooker.values.items()}
        ids = out[0]
        length = int(out.shape[-1]) - 1  # the language model read every token but the last one generated
        generated_text = tokenizer.decode(out[0][prompt:], skip_special_tokens=True)
    else:
        with torch.no_grad(), hooker:
            loaded.model(**enc)
        values, ids, length, generated_text = dict(hooker.values), enc["input_ids"][0], prompt, None
    if not values:
        raise CommandError(f"no attention layer of {loaded.name} was captured"
                           + (" (check --layers)" if layers else ""))
    every = _sequence_labels(tokenizer, ids.cpu(), tokens)  # with --generate: the last token too, read by none
    labels = every[:length]
    language = _language_layers(loaded.model, values, length)
    if not language:
        raise CommandError(f"no layer of {loaded.name}'s language model was captured"
                           + (f" (--layers {layers!r} finds none)" if layers else "")
                           + "; --image with --text shows the text's attention over the image: let --layers take one")
    others = [name for name in values if name not in language]
    if any(values[name][0].shape[-1] == length or values[name][0].shape[-2] == length for name in others):
        notes.append("some layers outside the language model have the sequence's length; their axes are labelled "
                     "by position only where they are not the sequence")
    queries = list(range(prompt - 1, length))  # the prompt's last token, then each step's: each chose a next token
    query_labels = [f"{every[q]!r}" + (f" -> {every[q + 1]!r}" if q + 1 < len(every) else "") for q in queries]
    capture = Capture(values, [labels], hooker, generated_text=generated_text,
                      raw_values=dict(hooker.values) if generate else None,
                      prompt_length=prompt if generate else None, notes=notes)
    return ImageTextRun(capture, tokens, picture, language, queries, query_labels, notes)


def image_region(run: ImageTextRun, processor):
    """Where the processor took the model's image from in the original (fractions): the whole image where the
    reader's boxes are already fractions of the original image (``tokens.frame == "image"``: every family
    whose processor only resizes, or whose reader puts tiles back); else (a square the processor cropped or
    padded) from its settings, or ``None`` with a note when its resizing is not modelled (then no overlay and
    no image on the page)."""
    from ..views.image_overlay import processed_region

    if run.tokens.frame == "image":
        return (0.0, 0.0, 1.0, 1.0)
    try:
        return processed_region(processor, (run.picture.height, run.picture.width))
    except AttentionHookerError as err:
        run.notes.append(f"no image overlay and no image on the page: {err}")
        return None


def write_image_overlays(run: ImageTextRun, out, *, title: str, region) -> List[Path]:
    """One overlay per language-model layer in ``out/image-overlays`` (mean of heads); returns the paths
    (none where ``region`` is ``None``: see :func:`image_region`)."""
    from ..analysis.image_attention import image_attention
    from ..views.image_overlay import plot_image_attention

    if region is None:
        return []
    folder = Path(out) / "image-overlays"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    written = []
    for name in run.language_layers:
        result = image_attention(run.capture.values[name][0], run.tokens, batch=0, queries=run.queries)
        path = folder / f"{''.join(c if c.isalnum() or c in '._-' else '_' for c in name)}.png"
        plot_image_attention(run.picture, result, query_labels=run.query_labels, region=region,
                             title=f"{title}\n{name}, mean of heads", save_path=path).clear()
        written.append(path)
    return written


def run_image_text(args) -> None:
    """The ``run`` command given both ``--image`` and ``--text``."""
    from . import workflows
    from .outputs import summary

    check_image_text_options(args)
    workflows.prepare_out(args.out)
    if args.save:
        workflows.check_save_path(args.save)
    start = time.perf_counter()
    loaded = load_vision_language(args.model, device=args.device, dtype=args.dtype)
    run = capture_image_text(loaded, args.image, args.text, layers=args.layers, generate=args.generate)
    title = args.title or loaded.title
    region = image_region(run, loaded.processor)
    page_image = None
    if region is not None and run.language_layers:
        from ..views.page.image_meta import image_page_meta

        page_image = image_page_meta(run.picture, run.tokens, keys=len(run.capture.tokens[0]), region=region)
    files = workflows.write_outputs(run.capture, args.out, title=title, grids=not args.no_grids,
                                    color_scale=args.color_scale, page_image=page_image)
    overlays = write_image_overlays(run, args.out, title=title, region=region)
    if args.save:
        from ..io.saved import save_values

        save_values(run.capture.raw_values or run.capture.values, args.save, tokens=run.capture.tokens,
                    model_class=loaded.name, selection=run.capture.hooker.selection)
        files["saved"] = args.save
    lines = summary(loaded, run.capture, files, time.perf_counter() - start).splitlines()
    lines = _language_notables(lines, run)
    shares = _image_shares(run)
    extra = [f"image:   {len(run.tokens)} image tokens on {len(run.tokens.views)} view(s) ({run.tokens.family})"]
    if shares:
        extra.append(f"on the image: {shares}")
    if overlays:
        extra.append(f"overlays: {len(overlays)} PNGs in {overlays[0].parent} (attention on the image, per "
                     "language-model layer)")
    print("\n".join(lines[:3] + extra + lines[3:]))


def _language_notables(lines: List[str], run: ImageTextRun) -> List[str]:
    """The summary's "notable heads" from the language model's layers only: a vision tower's axis is its
    patches, which the sequence's labels would misname."""
    from .outputs import notable_heads

    if "notable heads:" not in lines:
        return lines
    start = lines.index("notable heads:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  - "))
    notes = notable_heads({name: run.capture.values[name] for name in run.language_layers},
                          run.capture.tokens[0]) if run.language_layers else []
    return lines[:start] + (["notable heads (language model):"] + [f"  - {n}" for n in notes] if notes else []) \
        + lines[end:]


def _image_shares(run: ImageTextRun) -> str:
    """The share of the last drawn query's attention on the image, first and last language-model layer."""
    from ..analysis.image_attention import image_attention

    if not run.language_layers:
        return ""
    parts = []
    for name in dict.fromkeys([run.language_layers[0], run.language_layers[-1]]):
        result = image_attention(run.capture.values[name][0], run.tokens, batch=0, queries=run.queries[-1:])
        parts.append(f"{float(result.share.mean()):.1%} ({name}, mean of heads)")
    return f"{run.query_labels[-1]} gave " + ", ".join(parts)
