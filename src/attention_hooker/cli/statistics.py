"""``attention-hooker stats``: per-head statistics over the lines of a file, and their CSV and pictures.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import csv
import math
import time
from typing import Dict, Optional, Sequence
import torch
from ..views.labels import short_layer_names
from ..errors import CommandError
from .console import progress_bar
from .models import LoadedModel, to_model_device, token_limit
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
    with progress, torch.no_grad(), TransformerAttentionHooker(model, layers) as hooker:
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
                model(**enc)
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
