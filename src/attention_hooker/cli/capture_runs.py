"""Capturing what the command line is given: a text (short, long, or generated from) or an image.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional
import torch
from ..errors import CommandError
from .console import generation_progress
from .models import (LoadedModel, more_tokens_hint, no_logits, position_limit, to_model_device, token_labels,
                     token_limit, with_article)


DEFAULT_DEMO_TEXT = "The cat sat on the mat because it was tired, and then the cat fell asleep."


def capture_image(loaded: LoadedModel, image_path, *, layers: Optional[str] = None) -> Capture:
    """Runs one image through a vision model with its attention layers hooked; the tokens
    are the prefix tokens (``CLS``, ...) and the patches by row and column."""
    from ..hooker import TransformerAttentionHooker

    if loaded.kind != "vision":
        raise CommandError(f"--image is for vision models; {loaded.name} is {with_article(loaded.kind)}: pass --text "
                           "(a vision-language model takes --image and --text together)")
    try:
        from PIL import Image

        image = Image.open(image_path).convert("RGB")
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read the image {image_path}: {err}") from None
    pixels = to_model_device(loaded, loaded.processor(images=image, return_tensors="pt"))
    hooker = TransformerAttentionHooker(loaded.model, layers, device="cpu")
    with torch.no_grad(), hooker:
        loaded.model(**pixels)
    values = dict(hooker.values)
    first = next(iter(values.values()))[0]
    n_tokens = first.shape[-1]
    config = loaded.model.config
    side = getattr(config, "image_size", 0) // max(getattr(config, "patch_size", 1), 1)
    prefix = n_tokens - side * side if 0 < side * side <= n_tokens else 0
    grid = side if prefix or side * side == n_tokens else 0
    tokens = ([f"prefix{i}" if i else "CLS" for i in range(prefix)]
              + ([f"r{i // grid}c{i % grid}" for i in range(n_tokens - prefix)] if grid else
                 [f"p{i}" for i in range(n_tokens - prefix)]))
    shown = pixels["pixel_values"][0].float().cpu()
    shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-12)  # (3, H, W) in 0..1
    return Capture(values, [tokens], hooker, image=(shown.permute(1, 2, 0).numpy(), prefix))


@dataclass
class Capture:
    """One captured run: the values to show and the labels of their axes."""

    values: Dict[str, List[torch.Tensor]]
    tokens: List[List[str]]  # one list per distinct axis: source tokens, then target tokens
    hooker: object
    generated_text: Optional[str] = None
    raw_values: Optional[Dict[str, List[torch.Tensor]]] = None
    query_tokens: Optional[List[str]] = None  # the kept rows' tokens (--rows)
    notes: Optional[List[str]] = None  # lines for the summary: what was cut, pooled, streamed
    stream: object = None  # the StreamedCapture written with --stream
    pooled_from: Optional[int] = None  # with --pool/--stream: the tokens the pooled maps cover
    image: object = None  # vision models: (the image as the model saw it (H, W, 3), prefix tokens)
    encoding: object = None  # the tokenizer's encoding of the text (its word ids, for --words)
    prompt_length: Optional[int] = None  # --generate: the prompt's tokens (the rest were generated)
    generated: Optional[int] = None  # --generate: the new tokens (the last one is read by no forward)


def check_words_options(*, image=None, generate: int = 0, long_context=None) -> None:
    """``--words`` needs a text's own tokens, captured whole or by rows (checked before any work)."""
    long_context = long_context or {}
    if image is not None:
        raise CommandError("--words groups a text's word pieces into words; an image has none: drop --words")
    if generate:
        raise CommandError("--words groups the pieces of the text given; generated tokens have no word ids: "
                           "drop --generate or --words")
    if long_context.get("pool") is not None or long_context.get("stream") is not None:
        raise CommandError("--words groups tokens; a pooled map's blocks are not tokens: drop --pool/--stream or --words")


def check_words_model(loaded: LoadedModel) -> None:
    """``--words`` needs a text model with a fast tokenizer (its word ids); checked before the capture."""
    if loaded.kind not in ("encoder", "decoder"):
        raise CommandError(f"--words works with encoders and decoders; {loaded.name} is {with_article(loaded.kind)}")
    if not getattr(loaded.tokenizer, "is_fast", False):
        raise CommandError(f"--words needs the word ids of a fast tokenizer; {loaded.name}'s tokenizer "
                           f"({type(loaded.tokenizer).__name__}) gives none")


def capture_words(loaded: LoadedModel, capture: Capture):
    """The capture between words (:func:`~attention_hooker.to_words`, Clark et al.'s rule), by the
    tokenizer's word ids; the words joined by the tokenizer."""
    from ..analysis.words import to_words

    return to_words(capture.values, capture.encoding, tokenizer=loaded.tokenizer)


def check_generation_length(loaded: LoadedModel, prompt: int, new_tokens: int) -> None:
    """``--generate N`` must fit the model's positions with the prompt (checked before any work)."""
    positions = position_limit(loaded)
    if positions is not None and prompt + new_tokens > positions:
        raise CommandError(
            f"--generate {new_tokens}: the prompt is {prompt} tokens and {loaded.name} has {positions} positions, "
            f"so at most {max(positions - prompt, 0)} new tokens fit")


def capture_text(
    loaded: LoadedModel,
    text: str,
    *,
    layers: Optional[str] = None,
    target: Optional[str] = None,
    generate: int = 0,
    max_tokens: Optional[int] = None,
    rows=None,
    pool: Optional[int] = None,
    stream=None,
    overwrite: bool = False,
) -> Capture:
    """Runs ``text`` through the model with every attention layer (or ``layers``) hooked.

    Args:
        max_tokens: a longer text is cut there (``None``: the tokenizer's limit), and
            the summary says so; at most the model's positions.
        rows: keep only these query rows (``"last"``, an index, a list, a slice).
        pool: keep each map pooled to at most ``pool x pool`` blocks (block means),
            computed tile by tile: pictures of long inputs without their memory.
        stream: write the whole capture to this folder as it is computed
            (pictures then come from pooled maps, ``pool`` or 256).
        overwrite: with ``stream``, replace a capture already in that folder.
    """
    from ..hooker import TransformerAttentionHooker

    if not text or not text.strip():
        raise CommandError("the text is empty: pass --text with some words")
    long_context = _check_text_options(loaded, rows=rows, pool=pool, stream=stream, generate=generate)
    enc, source, notes = _encode(loaded, text, max_tokens, generate)
    hooker = TransformerAttentionHooker(loaded.model, layers, rows=rows, device="cpu")
    if long_context:
        return _capture_long(loaded, hooker, enc, source, rows=rows, pool=pool, stream=stream, overwrite=overwrite,
                             notes=notes)
    if loaded.kind == "encoder-decoder":
        return _capture_encoder_decoder(loaded, hooker, enc, source, target, generate)
    if target is not None:
        raise CommandError(f"--target is for encoder-decoder models; {loaded.name} is {with_article(loaded.kind)}")
    if generate:
        return _capture_generation(loaded, hooker, enc, generate)
    with torch.no_grad(), hooker:
        loaded.model(**enc, **no_logits(loaded))
    return Capture(dict(hooker.values), [source], hooker, notes=notes, encoding=enc)


def _check_text_options(loaded: LoadedModel, *, rows, pool, stream, generate: int) -> List[str]:
    """The options of a text capture that do not go together; returns the long-context ones given."""
    long_context = [option for option, value in (("--rows", rows), ("--pool", pool), ("--stream", stream))
                    if value is not None]
    if long_context and loaded.kind == "encoder-decoder":
        raise CommandError(f"{'/'.join(long_context)} work with encoders and decoders; {loaded.name} is an "
                           "encoder-decoder")
    if long_context and generate:
        raise CommandError(f"--generate keeps every step to stitch them; drop {'/'.join(long_context)}")
    if rows is not None and pool is not None:
        raise CommandError("--rows and --pool do not combine: a pooled map covers every row")
    return long_context


def _encode(loaded: LoadedModel, text: str, max_tokens: Optional[int], generate: int):
    """``(encoding on the model's device, token labels, notes)``: the text cut at the token limit."""
    tokenizer = loaded.tokenizer
    limit = token_limit(loaded, max_tokens)
    length = len(tokenizer(text)["input_ids"])
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
    if enc["input_ids"].shape[-1] == 0:
        raise CommandError(f"the text {text[:40]!r} tokenizes to no token with {loaded.name}'s tokenizer; "
                           "pass some words it knows")
    if generate:
        check_generation_length(loaded, enc["input_ids"].shape[-1], generate)
    source = token_labels(tokenizer, enc["input_ids"][0])
    notes = []
    if length > limit:
        notes.append(f"the text is {length} tokens; only the first {limit} were run ({more_tokens_hint(loaded, limit)})")
    return to_model_device(loaded, enc), source, notes


def _capture_encoder_decoder(loaded: LoadedModel, hooker, enc, source: List[str], target: Optional[str],
                             generate: int) -> Capture:
    """One forward of an encoder-decoder on the text and the decoder's ``target``."""
    if target is None or not target.strip():
        raise CommandError(f"{loaded.name} is an encoder-decoder: pass the decoder's text with --target")
    if generate:
        raise CommandError("--generate works with decoder-only (causal) models; drop it for encoder-decoders")
    decoder_ids = to_model_device(loaded, loaded.tokenizer(text_target=target, return_tensors="pt"))["input_ids"]
    with torch.no_grad(), hooker:
        loaded.model(**enc, decoder_input_ids=decoder_ids)
    return Capture(dict(hooker.values), [source, token_labels(loaded.tokenizer, decoder_ids[0])], hooker)


def _capture_generation(loaded: LoadedModel, hooker, enc, generate: int) -> Capture:
    """``generate`` new tokens, each step captured; the steps stitched into one causal map per layer."""
    from ..analysis.core import stitch_steps

    tokenizer, model = loaded.tokenizer, loaded.model
    if loaded.kind != "decoder" or not hasattr(model, "generate"):
        raise CommandError(f"--generate needs a causal language model; {loaded.name} is {with_article(loaded.kind)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), hooker:
        with generation_progress(generate) as streamer:
            out = model.generate(**enc, max_new_tokens=generate, do_sample=False, pad_token_id=pad, streamer=streamer)
    stitched = {name: [stitch_steps(calls)] for name, calls in hooker.values.items()}
    length = next(iter(stitched.values()))[0].shape[-1]
    tokens = token_labels(tokenizer, out[0][:length])
    text_out = tokenizer.decode(out[0], skip_special_tokens=True)
    return Capture(stitched, [tokens], hooker, generated_text=text_out, raw_values=dict(hooker.values),
                   prompt_length=enc["input_ids"].shape[-1])


def _capture_long(loaded: LoadedModel, hooker, enc, source: List[str], *, rows, pool, stream, overwrite,
                  notes: List[str]) -> Capture:
    """One forward kept as selected rows, pooled maps, or streamed to disk (with pooled maps to draw)."""
    from ..selection import selected_rows
    from ..keep.pooling import PooledAttention, block_labels
    from ..keep.stream import format_bytes
    from ..views.labels import kept_labels

    length = len(source)
    query_tokens = None if rows is None else kept_labels(source, selected_rows(hooker), "the text")
    pooled = None
    if pool is not None or stream is not None:
        pooled = PooledAttention(size=pool or 256)
        hooker.reduce_into(pooled, padding_mask=enc["attention_mask"])
    written = None
    with torch.no_grad(), hooker:
        if stream is not None:
            rows_kept = length if query_tokens is None else len(query_tokens)
            written = hooker.stream_to(stream, overwrite=overwrite,
                                       expected_bytes=_planned_bytes(loaded, hooker, rows_kept, length))
            print(written.plan().describe(), file=sys.stderr, flush=True)  # before the model runs
        loaded.model(**enc, **no_logits(loaded))
    if written is not None:
        written.close(tokens=source)
        notes.append(f"the whole capture ({format_bytes(written.written)}) went to {written.folder}: "
                     "attention_hooker.load() opens it lazily")
    if pooled is not None:
        size = pooled.size
        labels = block_labels(source, size)
        if length > size:
            notes.append(f"pictures show each map pooled to {len(labels)} x {len(labels)} blocks (block means)")
        return Capture(dict(pooled.values), [labels], hooker, notes=notes, stream=written, pooled_from=length)
    return Capture(dict(hooker.values), [source], hooker, query_tokens=query_tokens, notes=notes, encoding=enc)


def _planned_bytes(loaded: LoadedModel, hooker, rows: int, keys: int) -> Optional[int]:
    """What a streamed capture of one forward will write, from the model's configuration
    (hooked layers x heads x rows x keys); ``None`` when the configuration does not say."""
    from ..capture.heads import head_count

    heads = head_count(getattr(loaded.model, "config", None))
    if heads is None:
        return None
    itemsize = next(loaded.model.parameters()).element_size() if any(True for _ in loaded.model.parameters()) else 4
    return len(hooker.hooked_layers) * heads * rows * keys * itemsize
