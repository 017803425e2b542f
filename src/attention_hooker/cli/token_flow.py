"""``attention-hooker flow``: attention flow and rollout from every token into chosen tokens.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional, Sequence
import torch
from ..errors import CommandError
from .models import LoadedModel, no_logits, to_model_device, token_labels
from .outputs import prepare_out


FLOW_MAX_TOKENS = 512  # one maximum flow per input token and output: beyond this it takes minutes


def token_flow(loaded: LoadedModel, text: str, *, into: Sequence[int] = (0, -1), layers: Optional[str] = None) -> dict:
    """Attention flow and rollout from every token of ``text`` into the ``into`` tokens of the last
    layer, through the model's self-attention layers (an encoder-decoder's encoder).

    Returns:
        ``{"tokens", "into" (non-negative positions), "layers", "flow" (outputs, tokens),
        "rollout" (outputs, tokens)}``, each row summing to 1.
    """
    from ..analysis.rollout import attention_rollout
    from ..analysis.flow import attention_flow
    from ..hooker import TransformerAttentionHooker

    if loaded.kind == "vision":
        raise CommandError(f"flow reads text; {loaded.name} is a vision model")
    if not text or not text.strip():
        raise CommandError("the text is empty: pass --text with some words")
    enc = to_model_device(loaded, loaded.tokenizer(text, return_tensors="pt", truncation=True))
    ids = enc["input_ids"]
    if ids.shape[1] > FLOW_MAX_TOKENS:
        raise CommandError(f"the text is {ids.shape[1]} tokens; attention flow takes one maximum flow per token and "
                           f"is offered up to {FLOW_MAX_TOKENS}: pass a shorter --text")
    n = ids.shape[1]
    bad = [p for p in into if not -n <= p < n]
    if bad:
        raise CommandError(f"--into {' '.join(map(str, bad))}: the text has {n} tokens (positions 0..{n - 1}, "
                           f"or -{n}..-1 from the end)")
    positions = [p % n for p in into]
    extra = {"decoder_input_ids": ids} if loaded.kind == "encoder-decoder" else {}
    with torch.no_grad(), TransformerAttentionHooker(loaded.model, layers, device="cpu") as hooker:
        loaded.model(input_ids=ids, attention_mask=enc.get("attention_mask"), **extra, **no_logits(loaded))
    square = {name: calls[0] for name, calls in hooker.values.items()
              if calls[0].shape[-1] == calls[0].shape[-2] == n}
    if loaded.kind == "encoder-decoder":  # the encoder's layers: those before the first decoder layer
        square = {name: w for name, w in square.items() if "decoder" not in name}
    if not square:
        raise CommandError(f"{loaded.name} has no self-attention layer over the {n} tokens of the text")
    stacked = list(square.values())
    return {"tokens": token_labels(loaded.tokenizer, ids[0].tolist()), "into": positions, "layers": list(square),
            "flow": attention_flow(stacked, output_positions=positions)[0],
            "rollout": attention_rollout(stacked)[0, positions].double()}


def write_token_flow(result: dict, out) -> Path:
    """``flow.csv``: one row per input token; flow and rollout into each chosen token."""
    out = prepare_out(out)
    path = out / "flow.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        names = [f"{kind}_into_{p}" for kind in ("flow", "rollout") for p in result["into"]]
        writer.writerow(["position", "token", *names])
        for j, token in enumerate(result["tokens"]):
            cells = [float(result[kind][o, j]) for kind in ("flow", "rollout") for o in range(len(result["into"]))]
            writer.writerow([j, token, *(f"{c:.9g}" for c in cells)])
    return path


def command(args) -> None:
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
