"""The ``attention-hooker demo`` and ``run`` commands: one capture of a text (or an image), its
pictures, page and summary."""

from __future__ import annotations

import time

from ..errors import CommandError
from . import serving

__all__ = ["demo", "run"]


def _run_capture(model_path, text, *, out, layers=None, target=None, generate=0, save=None, title=None,
                 long_context=None, device=None, dtype=None, grids=True, color_scale=None, image=None,
                 words=False) -> None:
    from . import workflows

    long_context = long_context or {}
    if words:
        workflows.check_words_options(image=image, generate=generate, long_context=long_context)
    if save and (long_context.get("pool") or long_context.get("stream")):
        raise CommandError("--save keeps a capture held in memory; with --pool or --stream there is none "
                                     "(--stream FOLDER already writes the whole capture)")
    workflows.prepare_out(out)  # mistakes in where things go are found before any work
    if save:
        workflows.check_save_path(save)
    start = time.perf_counter()
    loaded = workflows.load_hf_model(model_path, device=device, dtype=dtype)
    if words:
        workflows.check_words_model(loaded)
    if image is not None:
        capture = workflows.capture_image(loaded, image, layers=layers)
    elif loaded.kind == "vision":
        raise CommandError(f"{loaded.name} is a vision model: pass an image with --image FILE")
    else:
        capture = workflows.capture_text(loaded, text, layers=layers, target=target, generate=generate,
                                         **long_context)
    by_words = workflows.capture_words(loaded, capture) if words else None
    files = workflows.write_outputs(capture, out, title=title or loaded.title, grids=grids, color_scale=color_scale,
                                    words=by_words)
    if save:
        raw = capture.raw_values or capture.values
        from ..io.saved import save_values

        # Every list (an encoder-decoder's source and target): the page of the saved capture labels every axis.
        save_values(raw, save, tokens=capture.tokens, model_class=loaded.name, selection=capture.hooker.selection)
        files["saved"] = save
    print(workflows.summary(loaded, capture, files, time.perf_counter() - start))


def demo(args) -> None:
    from . import workflows

    path = workflows.demo_model_path()
    _run_capture(path, args.text if args.text is not None else workflows.DEFAULT_DEMO_TEXT, out=args.out,
                 device=args.device, dtype=args.dtype, grids=not args.no_grids,
                 color_scale=args.color_scale, words=args.words)


def _serve(args) -> None:
    """``--batching continuous``: the lines of ``--text-file`` served together, one page per request."""
    from . import workflows
    from .text_file import read_lines

    prompts = read_lines(args.text_file)
    if args.title is not None and not args.title.strip():
        raise CommandError("--title is empty; give the name the pictures and the page should show, or leave it out")
    workflows.prepare_out(args.out)
    start = time.perf_counter()
    loaded = workflows.load_hf_model(args.model, device=args.device, dtype=args.dtype)
    captures = serving.capture_requests(loaded, prompts, args.generate, layers=args.layers, max_tokens=args.max_tokens)
    files = serving.write_request_outputs(captures, args.out, title=args.title or loaded.title,
                                          grids=not args.no_grids, color_scale=args.color_scale)
    print(serving.requests_summary(loaded, captures, files, time.perf_counter() - start))


def run(args) -> None:
    if args.title is not None and not args.title.strip():
        raise CommandError("--title is empty; give the name the pictures and the page should show, or leave it out")
    if args.overwrite and args.stream is None:
        raise CommandError("--overwrite goes with --stream FOLDER")
    serving.check_batching_options(args)
    if args.batching is not None:
        _serve(args)
        return
    if args.text is None and args.image is None:
        raise CommandError("run needs --text (or --image for a vision model)")
    if args.text is not None and args.image is not None:  # a vision-language model: the image and the text
        from .vision_language import run_image_text

        run_image_text(args)
        return
    _run_capture(args.model, args.text, out=args.out, layers=args.layers, target=args.target, image=args.image,
                 generate=args.generate, save=args.save, title=args.title,
                 device=args.device, dtype=args.dtype, grids=not args.no_grids, color_scale=args.color_scale,
                 words=args.words, long_context=dict(max_tokens=args.max_tokens, rows=args.rows, pool=args.pool, stream=args.stream,
                                   overwrite=args.overwrite))
