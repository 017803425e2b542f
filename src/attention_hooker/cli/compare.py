"""``attention-hooker compare``: one text through two models (two checkpoints, base and fine-tuned),
their attention compared head by head: the pictures, the page and the most different heads.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import List, Sequence, Tuple

from ..errors import CommandError
from .models import LoadedModel, token_labels, token_limit, with_article
from .outputs import prepare_out

__all__ = ["command", "model_names", "compared_length", "same_tokens", "write_comparison", "comparison_summary"]

PICTURED_HEADS = 3  # the most different heads drawn as A, B and A - B
PAGE_TOKENS = 512  # the compare page carries whole maps: up to render_html's pool_above an axis


def model_names(paths: Sequence[str]) -> Tuple[str, str]:
    """Labels of the two models: their folder names, or their paths where the names are the same."""
    names = [Path(p).name or str(p) for p in paths]
    if names[0] == names[1]:
        names = [str(p) for p in paths]
    if names[0] == names[1]:
        raise CommandError(f"--model {paths[0]} is given twice; compare needs two different models")
    return names[0], names[1]


def compared_length(loaded: Sequence[LoadedModel], max_tokens=None) -> int:
    """How many tokens of the text are compared: ``max_tokens`` (checked against both models'
    positions), else the shorter tokenizer limit, and at most the 512 the compare page shows whole."""
    if max_tokens is not None and max_tokens > PAGE_TOKENS:
        raise CommandError(f"--max-tokens {max_tokens}: the compare page shows whole maps, up to {PAGE_TOKENS} "
                           f"tokens; give at most {PAGE_TOKENS}")
    return min(min(token_limit(model, max_tokens) for model in loaded), PAGE_TOKENS)


def same_tokens(loaded: Sequence[LoadedModel], text: str, names: Tuple[str, str], limit: int) -> List[str]:
    """The token labels of ``text``, when both models' tokenizers make the same tokens of it
    (the same ids, read the same way, cut at ``limit`` tokens); else the one line saying how they differ."""
    ids, labels = [], []
    for model in loaded:
        encoded = model.tokenizer(text, truncation=True, max_length=limit)["input_ids"]
        ids.append(list(encoded))
        labels.append(token_labels(model.tokenizer, encoded))
    if ids[0] == ids[1] and labels[0] == labels[1]:
        return labels[0]
    a, b = labels
    if len(ids[0]) != len(ids[1]):
        raise CommandError(f"the two models tokenize the text differently: {names[0]} makes {len(ids[0])} tokens and "
                           f"{names[1]} makes {len(ids[1])}; compare needs models that share a tokenizer")
    i = next(i for i, (x, y) in enumerate(zip(ids[0], ids[1])) if x != y or a[i] != b[i])
    raise CommandError(f"the two models tokenize the text differently: token {i} is {a[i]!r} (id {ids[0][i]}) for "
                       f"{names[0]} and {b[i]!r} (id {ids[1][i]}) for {names[1]}; compare needs models that share "
                       "a tokenizer")


def write_comparison(comparison, out, *, color_scale=None) -> dict:
    """Writes into ``out``: ``distances.png`` (layers x heads), ``heads/`` (A, B and A - B of the most
    different heads), ``distances.csv`` (every head's distance) and ``compare.html`` (the page)."""
    from ..page_scores import render_html
    from ..views.compare import plot_distance_grid, plot_head_comparison

    out = prepare_out(out)
    heads_dir = out / "heads"
    if heads_dir.is_dir():  # pictures of an earlier run would pass for this one's
        for stale in heads_dir.glob("*.png"):
            stale.unlink()
    grid = out / "distances.png"
    plot_distance_grid(comparison, save_path=grid).clear()
    pictures = []
    for rank, head in enumerate(comparison.ranked_heads(PICTURED_HEADS), start=1):
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in head.layer)
        path = heads_dir / f"{rank}_{safe}_head{head.head}.png"
        plot_head_comparison(comparison, head.layer, head.head, color_scale=color_scale or "linear",
                             save_path=path).clear()
        pictures.append(path)
    table = out / "distances.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "layer", "layer_in_b", "head", "js_distance"])
        for rank, head in enumerate(comparison.ranked_heads(), start=1):
            writer.writerow([rank, head.layer, comparison[head.layer].name_b, head.head, f"{head.distance:.6f}"])
    page = render_html(comparison, color_scale=color_scale).save(out / "compare.html")
    return {"grid": grid, "heads": pictures, "csv": table, "page": Path(page)}


def comparison_summary(comparison, loaded: Sequence[LoadedModel], files: dict, seconds: float, top: int) -> str:
    """What ``compare`` prints: the two models, the tokens, the most different heads and each layer's distance."""
    A, B = comparison.names
    heads = sorted({layer.a.shape[1] for layer in comparison.values()})
    lines = [
        f"A:       {A} ({loaded[0].name})",
        f"B:       {B} ({loaded[1].name})",
        f"tokens:  {len(comparison.tokens)}, the same for both",
        f"layers:  {len(comparison)} paired by {comparison.pairing}, {'/'.join(map(str, heads))} heads each",
        "distance: Jensen-Shannon between each query's attention in A and in B (base 2: 0 the same, 1 disjoint), "
        "averaged over queries",
        "most different heads:",
    ]
    ranked = comparison.ranked_heads(top)
    width = max(len(h.layer) for h in ranked)
    lines += [f"  {rank:>2}. {h.layer:<{width}}  head {h.head:<3} {h.distance:.3f}" for rank, h in enumerate(ranked, 1)]
    lines.append("layers (mean over heads):")
    lines += [f"  {name}  {distance:.3f}" for name, distance in comparison.layer_distances.items()]
    lines += [
        f"grid:    {files['grid']}",
        f"heads:   {len(files['heads'])} PNGs (A, B and A - B) in {Path(files['heads'][0]).parent}" if files["heads"]
        else "heads:   none",
        f"csv:     {files['csv']}",
        f"page:    {files['page']}  (open it in a browser; works offline)",
        f"done in {seconds:.1f} s",
    ]
    return "\n".join(lines)


def command(args) -> None:
    from ..analysis.compare import compare
    from . import workflows

    models = args.model or []
    if len(models) != 2:
        raise CommandError(f"compare needs two models, --model A --model B; got {len(models)}")
    if args.text is None or not args.text.strip():
        raise CommandError("compare needs some text: pass --text with some words")
    names = model_names(models)
    workflows.prepare_out(args.out)  # mistakes in where things go are found before any work
    start = time.perf_counter()
    loaded = [workflows.load_hf_model(path, device=args.device, dtype=args.dtype) for path in models]
    for model in loaded:
        if model.kind not in ("encoder", "decoder"):
            raise CommandError(f"compare reads one text through encoders and decoders; {model.name} is "
                               f"{with_article(model.kind)}")
    names = _titled(names, tuple(model.title for model in loaded))
    limit = compared_length(loaded, args.max_tokens)
    tokens = same_tokens(loaded, args.text, names, limit)  # before any forward: the same tokens, cut alike
    captures = [workflows.capture_text(model, args.text, layers=args.layers, max_tokens=limit) for model in loaded]
    comparison = compare(captures[0].values, captures[1].values, tokens_a=tokens, names=names)
    files = write_comparison(comparison, args.out, color_scale=args.color_scale)
    summary = comparison_summary(comparison, loaded, files, time.perf_counter() - start, args.top)
    whole = len(loaded[0].tokenizer(args.text)["input_ids"])
    if whole > limit:  # cut alike for both, and said
        why = (f"--max-tokens {args.max_tokens}" if args.max_tokens is not None and args.max_tokens == limit
               else f"the compare page shows at most {PAGE_TOKENS}" if limit == PAGE_TOKENS
               else "the shorter of the two models' limits")
        summary += f"\nnote:    the text is {whole} tokens; only the first {limit} were compared ({why})"
    print(summary)


def _titled(names: Tuple[str, str], titles: Tuple[str, str]) -> Tuple[str, str]:
    """The two models' labels: their titles (the model cards' names) where these tell them apart;
    where both have the same title, the title with each folder's label after it."""
    if not all(titles):
        return names
    if titles[0] != titles[1]:
        return titles
    return f"{titles[0]} ({names[0]})", f"{titles[1]} ({names[1]})"
