"""``attention-hooker stats``: per-head statistics over the lines of a file, and their CSV and pictures.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import csv
import io
import sys
import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence
import torch
from ..views.labels import short_layer_names
from ..errors import CommandError
from .text_file import read_lines
from .console import progress_bar
from .models import LoadedModel, more_tokens_hint, no_logits, to_model_device, token_limit
from .outputs import prepare_out


def collect_statistics(loaded: LoadedModel, lines: Sequence[str], *, layers: Optional[str] = None,
                       batch_size: int = 16, progress_stream=None, max_tokens: Optional[int] = None,
                       sink_positions: Optional[Sequence[int]] = None, allow_empty: bool = False,
                       progress_label: str = "lines"):
    """Streams per-head statistics over ``lines``; no attention matrix is kept (on the sdpa
    route none of a whole layer is even held: each call is reduced a tile of rows at a time).

    Args:
        max_tokens: lines longer than this many tokens are cut there (``None``: the
            tokenizer's limit); at most the model's positions.
        sink_positions: key positions whose summed share is also reported (``sink_share``).
        allow_empty: no line is no error (a rank whose share of a small file is empty).
        progress_label: what the progress bar says it counts (``"rank 0 of 2"``).

    Returns:
        ``(accumulator, seconds, (lines cut, token limit))``.
    """
    from ..analysis.stats import HeadStatsAccumulator
    from ..hooker import TransformerAttentionHooker

    lines = [line for line in lines if line.strip()]
    if not lines and not allow_empty:
        raise CommandError("the text file has no non-empty line: put one text per line")
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    accumulator = HeadStatsAccumulator(sink_positions=sink_positions)  # a bad position: AttentionHookerError
    limit = token_limit(loaded, max_tokens)
    cut = 0
    progress = progress_bar(len(lines), progress_stream, progress_label)
    start = time.perf_counter()
    with progress, torch.no_grad(), TransformerAttentionHooker(model, layers, device="cpu") as hooker:
        for i in range(0, len(lines), batch_size):
            batch = lines[i : i + batch_size]
            lengths = [len(ids) for ids in tokenizer(batch)["input_ids"]]
            cut += sum(n > limit for n in lengths)
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=limit)
            enc = to_model_device(loaded, enc)  # a model on a GPU (--device, or a rank's own)
            hooker.reduce_into(accumulator, padding_mask=enc["attention_mask"])  # reduced tile by tile, none kept
            if loaded.kind == "encoder-decoder":  # the line is both the source and the target
                model(**enc, decoder_input_ids=enc["input_ids"], decoder_attention_mask=enc["attention_mask"])
            else:
                model(**enc, **no_logits(loaded))
            accumulator.add_input(len(batch))
            progress.update(len(batch))
    return accumulator, time.perf_counter() - start, (cut, limit)


_STATISTIC_UNITS = {
    "entropy": "entropy (nats)",
    "distance": "mean distance (tokens)",
    "first_token_share": "share of attention (0-1)",
    "last_token_share": "share of attention (0-1)",
    "sink_share": "share of attention (0-1)",
}


def write_statistics(accumulator, out) -> Dict[str, object]:
    """``head_stats.csv`` (one row per layer and head) and one layers x heads heatmap per statistic."""
    from ..views.plot import figure_class, save_figure

    out = prepare_out(out)
    table = accumulator.result()
    csv_path = out / "head_stats.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "head", *accumulator.STATISTICS])
        for li, layer in enumerate(accumulator.layers):
            for head in range(table["entropy"].shape[1]):
                writer.writerow([layer, head, *(f"{table[k][li, head]:.9g}" for k in accumulator.STATISTICS)])
    Figure = figure_class()
    pictures = []
    n_layers, n_heads = len(accumulator.layers), table["entropy"].shape[1]
    for key in accumulator.STATISTICS:
        # Wide enough for the title and the colour bar even with few heads (4 heads used to cut the title).
        fig = Figure(figsize=(max(5.5, 2.5 + 0.45 * n_heads), 1.6 + 0.4 * n_layers), layout="constrained")
        ax = fig.subplots()
        image = ax.imshow(table[key], cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        step = max(1, math.ceil(n_heads / 32))  # whole-number head ticks, thinned when there are many
        ax.set_xticks(range(0, n_heads, step))
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels(short_layer_names(accumulator.layers), fontsize=7)
        ax.set_title(f"{key.replace('_', ' ')}, mean over {accumulator.sequences} inputs", fontsize=10)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(_STATISTIC_UNITS.get(key, key))
        bar.formatter.set_useOffset(False)  # no "+1e-3" offset written over the title
        bar.update_ticks()
        path = out / f"{key}.png"
        save_figure(fig, path)
        pictures.append(path)
    return {"csv": csv_path, "pictures": pictures}


def command(args) -> None:
    from .. import distributed
    from . import workflows

    launch = distributed.launch_from_environment()  # under torchrun: this process's rank
    lines = read_lines(args.text_file)
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
        print(f"cut:     {cut} line(s) longer than {limit} tokens were cut there ({more_tokens_hint(loaded, limit)})")
    table = accumulator.result()["entropy"]
    print(f"csv:     {files['csv']}  ({table.size} rows: {table.shape[0]} layers x {table.shape[1]} heads)")
    print(f"heatmaps: {', '.join(str(p) for p in files['pictures'])}")
