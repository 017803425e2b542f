"""``attention-hooker heads``: every head's role scores on a text, as a CSV and a page coloured by them.

Every user mistake raises :class:`CommandError` with one readable sentence.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path
from typing import Dict, Optional
import torch
from ..errors import AttentionHookerError, CommandError
from .models import LoadedModel, to_model_device, token_labels, with_article
from .outputs import prepare_out


ROLE_COLUMNS = ("previous_token", "duplicate_token", "induction", "first_token_share", "first_token_norm_share",
                "sink_head", "confidence", "importance", "retrieval", "knockout")


SINK_THRESHOLD = 0.3  # Gu et al. (2024)'s epsilon

BOUNDED_ROLES = ("previous_token", "duplicate_token", "induction", "first_token_share", "first_token_norm_share",
                 "sink_head", "confidence", "retrieval")
"""The role scores bounded in [0, 1] (shares of attention, fractions of positions): the page colours
them on [0, 1]; importance has no fixed bound and is coloured on the heads' own range."""

ROLE_FLOOR = 0.1
"""A bounded role's summary names its strongest head only when it scores at least this: an
encoder's best induction score of 0.01 is no induction head."""

KNOCKOUT_METRICS = {"decoder": "the language-model loss on the text, knocked out minus plain",
                    "encoder": "1 - cosine between the mean-pooled last hidden states, knocked out and plain"}
"""What ``--ablate`` measures per model kind (the ``knockout`` column): a head's measured effect."""

WHY_NOT = {"importance": "needs a language-model loss (an encoder without its head has none)",
           "knockout": "measured with --ablate (each head knocked out, its effect on the output)",
           "retrieval": "measured while a decoder generates",
           "first_token_norm_share": "needs the value vectors and the output projection (found in no layer)"}
"""Why a score is NaN (does not apply), said by the summary and on the page."""


def head_roles(loaded: LoadedModel, text: str, *, layers: Optional[str] = None, repeat_length: int = 50,
               seed: int = 0, ablate: bool = False, on_plan=None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Each self-attention head's role scores: previous-token, duplicate-token, first-token
    share, the first token's share of the value-weighted norms (Kobayashi et al. 2020), sink head
    (share above 0.3) and confidence on ``text``; induction on a random
    sequence of ``repeat_length`` tokens seen twice (where every second-half token has one
    induction target); importance (Michel et al. 2019) from the gradients of the language-model
    loss on ``text`` (models with a language-model head); retrieval (Wu et al. 2024) while a
    decoder, prompted with the random sequence and the first half of its repeat, writes the rest.
    With ``ablate``, each head's measured knock-out effect on the text (:data:`KNOCKOUT_METRICS`;
    ``on_plan`` is told the cost before the knock-outs run).

    Returns:
        ``{layer: {column: (heads,) float64}}`` in model order (columns: :data:`ROLE_COLUMNS`);
        NaN where a score does not apply to the model (importance without a language-model
        loss, retrieval outside decoders, norms where the value vectors or the output projection
        are out of reach).
    """
    from ..analysis.stats import sink_share
    from ..hooker import TransformerAttentionHooker
    from ..analysis.roles import duplicate_token_score, head_confidence, induction_score, previous_token_score

    if loaded.kind == "vision":
        raise CommandError(f"heads reads text; {loaded.name} is a vision model")
    if not text or not text.strip():
        raise CommandError("the text is empty: pass --text with some words")
    tokenizer, model = loaded.tokenizer, loaded.model
    enc = to_model_device(loaded, tokenizer(text, return_tensors="pt", truncation=True))
    generator = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(min(len(tokenizer), 30000)) if i not in special]
    pick = torch.randint(0, len(vocab), (repeat_length,), generator=generator)
    half = torch.tensor([vocab[i] for i in pick.tolist()])[None]
    repeated = to_model_device(loaded, {"input_ids": torch.cat([half, half], dim=1)})
    forward = ((lambda ids, **kw: model(input_ids=ids, decoder_input_ids=ids, **kw))
               if loaded.kind == "encoder-decoder" else (lambda ids, **kw: model(input_ids=ids, **kw)))
    with torch.no_grad(), TransformerAttentionHooker(model, layers, keep_values=True, device="cpu") as on_text:
        forward(enc["input_ids"], attention_mask=enc.get("attention_mask"))
    with torch.no_grad(), TransformerAttentionHooker(model, layers, device="cpu") as on_repeat:
        forward(repeated["input_ids"])
    importance = _head_importance(loaded, enc, layers, forward)
    knockout = _knockout(loaded, enc, layers, on_plan) if ablate else {}
    retrieval = _retrieval(loaded, repeated["input_ids"], repeat_length, layers)
    roles = {}
    for name, calls in on_text.values.items():
        w = calls[0]
        if w.shape[-1] != w.shape[-2] or name not in on_repeat.values:
            continue  # cross-attention: no token-to-token roles
        ids = enc["input_ids"]
        share = sink_share(w, [0])[0].double()
        missing = torch.full((w.shape[1],), float("nan"), dtype=torch.float64)
        roles[name] = {
            "previous_token": previous_token_score(w)[0],
            "duplicate_token": duplicate_token_score(w, ids)[0],
            "induction": induction_score(on_repeat.values[name][0], repeated["input_ids"])[0],
            "first_token_share": share,
            "first_token_norm_share": _first_token_norm_share(model, name, w, on_text.value_vectors.get(name)),
            "sink_head": (share > SINK_THRESHOLD).double(),
            "confidence": head_confidence(w)[0],
            "importance": importance.get(name, missing).cpu(),
            "retrieval": retrieval.get(name, missing).cpu(),
            "knockout": knockout.get(name, missing).cpu(),
        }
    if not roles:
        raise CommandError(f"{loaded.name} has no self-attention layer to score (query == key)")
    return roles


def _first_token_norm_share(model, name: str, weights: torch.Tensor, values) -> torch.Tensor:
    """Per head, the first key's share of each query's value-weighted norms (Kobayashi et al.
    2020), averaged over the queries; NaN where the value vectors or the output projection are
    out of reach (eager attention code; a projection found nowhere or twice)."""
    from ..analysis.attribution import find_output_projection, value_weighted_norms

    missing = torch.full((weights.shape[1],), float("nan"), dtype=torch.float64)
    value = values[0] if values else None
    if value is None:
        return missing
    try:
        out_weight = find_output_projection(model, name, weights.shape[1] * value.shape[-1])
    except AttentionHookerError:
        return missing
    norms = value_weighted_norms(weights, value, out_weight)[0]  # (H, Q, K)
    return (norms[..., 0] / norms.sum(-1).clamp(min=1e-30)).mean(-1).cpu()


def _head_importance(loaded: LoadedModel, enc, layers, forward) -> Dict[str, torch.Tensor]:
    """Michel et al.'s importance of each head on the language-model loss of the text, from the
    weights and their gradients (the model's own kernel); ``{}`` without a language-model loss."""
    from ..analysis.attribution import head_importance
    from ..hooker import TransformerAttentionHooker

    if loaded.kind == "encoder":
        return {}  # no language-model head: no loss to differentiate
    model, ids = loaded.model, enc["input_ids"]
    try:
        with torch.enable_grad(), TransformerAttentionHooker(model, layers, keep_grad=True, device="cpu") as hooker:
            out = forward(ids, attention_mask=enc.get("attention_mask"), labels=ids)
            if getattr(out, "loss", None) is None:
                return {}
            out.loss.backward()
        return {name: head_importance(calls[0], hooker.gradients[name][0])[0]
                for name, calls in hooker.values.items()
                if calls[0].shape[-1] == calls[0].shape[-2] and hooker.gradients.get(name)}
    finally:
        model.zero_grad(set_to_none=True)  # the model's parameters keep no gradient of ours


def _knockout(loaded: LoadedModel, enc, layers: Optional[str], on_plan) -> Dict[str, torch.Tensor]:
    """Each head's measured effect on the text when it is knocked out (:data:`KNOCKOUT_METRICS`), batched."""
    from ..capture.discovery import find_attention_modules
    from ..intervene.effects import knockout_effects, language_model_loss, mean_pooled_output

    if loaded.kind not in KNOCKOUT_METRICS:
        raise CommandError(f"--ablate measures encoders and decoders; {loaded.name} is {with_article(loaded.kind)}")
    names = [name for name, _ in find_attention_modules(loaded.model) if layers is None or re.search(layers, name)]
    inputs = {"input_ids": enc["input_ids"], **({"attention_mask": enc["attention_mask"]} if "attention_mask" in enc
                                                 else {})}
    metric = language_model_loss if loaded.kind == "decoder" else mean_pooled_output
    return dict(knockout_effects(loaded.model, inputs, metric, layers=names, on_plan=on_plan))


def _retrieval(loaded: LoadedModel, repeated: torch.Tensor, length: int, layers) -> Dict[str, torch.Tensor]:
    """Wu et al.'s retrieval score of each decoder head: prompted with a random sequence and the
    first half of its repeat, the model writes the rest (greedy); the needle is the first copy."""
    from ..analysis.core import stitch_steps
    from ..hooker import TransformerAttentionHooker
    from ..analysis.roles import retrieval_score

    if loaded.kind != "decoder" or not hasattr(loaded.model, "generate"):
        return {}
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = repeated[:, : length + length // 2]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    with torch.no_grad(), TransformerAttentionHooker(model, layers, device="cpu") as hooker:
        ids = model.generate(prompt, max_new_tokens=length - length // 2, do_sample=False, pad_token_id=pad)
    scores = {}
    for name, calls in hooker.values.items():
        attn = stitch_steps(calls)  # (1, H, T, T): the last generated token's query never ran
        scores[name] = retrieval_score(attn, ids[:, : attn.shape[-1] + 1], needle=(0, length),
                                       generated_from=prompt.shape[1])[0]
    return scores


def write_head_roles_page(loaded: LoadedModel, text: str, roles: Dict[str, Dict[str, torch.Tensor]], out, *,
                          layers: Optional[str] = None) -> Path:
    """``head_roles.html``: the page of ``text``'s attention, its overview coloured by any role score."""
    from ..hooker import TransformerAttentionHooker
    from ..page_scores import render_html

    out = prepare_out(out)
    enc = to_model_device(loaded, loaded.tokenizer(text, return_tensors="pt", truncation=True))
    extra = {"decoder_input_ids": enc["input_ids"]} if loaded.kind == "encoder-decoder" else {}
    with torch.no_grad(), TransformerAttentionHooker(loaded.model, layers, device="cpu") as hooker:
        loaded.model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"), **extra)
    values = {name: calls for name, calls in hooker.values.items() if name in roles}
    columns = [c for c in ROLE_COLUMNS if c not in ("first_token_share", "confidence")]  # the page has those
    scores = {column.replace("_", " "): {name: roles[name][column].tolist() for name in values} for column in columns}
    applies = [column for column in columns if any(not torch.isnan(roles[name][column]).all() for name in values)]
    page = render_html(values, tokens=token_labels(loaded.tokenizer, enc["input_ids"][0].tolist()),
                       title=f"{loaded.title or loaded.name}: head roles", head_scores=scores,
                       score_ranges={c.replace("_", " "): (0.0, 1.0) for c in columns if c in BOUNDED_ROLES},
                       not_applicable={c.replace("_", " "): WHY_NOT[c] for c in columns if c in WHY_NOT},
                       color_by=applies[0].replace("_", " ") if applies else None)  # it opens on a role
    return Path(page.save(out / "head_roles.html"))


def _cell(value: float) -> str:
    """A CSV cell: 9 significant digits, empty where the score does not apply (NaN)."""
    return "" if math.isnan(value) else f"{value:.9g}"


def write_head_roles(roles: Dict[str, Dict[str, torch.Tensor]], out) -> Path:
    """``head_roles.csv``: one row per layer and head, one column per role score."""
    out = prepare_out(out)
    path = out / "head_roles.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "head", *ROLE_COLUMNS])
        for layer, scores in roles.items():
            for head in range(len(scores["confidence"])):
                writer.writerow([layer, head, *(_cell(float(scores[c][head])) for c in ROLE_COLUMNS)])
    return path


def command(args) -> None:
    import math

    import torch

    from . import workflows

    workflows.prepare_out(args.out)
    loaded = workflows.load_hf_model(args.model)
    text = args.text if args.text is not None else workflows.DEFAULT_DEMO_TEXT
    def say_cost(plan) -> None:
        print(f"knock-outs: {plan} ...", file=sys.stderr, flush=True)

    roles = workflows.head_roles(loaded, text, layers=args.layers, repeat_length=args.repeat_length,
                                 ablate=args.ablate, on_plan=say_cost)
    path = workflows.write_head_roles(roles, args.out)
    page = workflows.write_head_roles_page(loaded, text, roles, args.out, layers=args.layers)
    names = list(roles)
    print(f"model:   {loaded.name} ({loaded.kind}), {len(names)} self-attention layers")
    for column in workflows.ROLE_COLUMNS:
        table = torch.stack([roles[name][column] for name in names])  # (layers, heads)
        if column == "sink_head":
            print(f"{'sink heads:':<24}{int(table.sum())} of {table.numel()} "
                  f"(first-token share above {workflows.SINK_THRESHOLD})")
            continue
        if torch.isnan(table).all():
            print(f"{column + ':':<24}n/a: {WHY_NOT.get(column, 'does not apply')}")
            continue
        table = torch.nan_to_num(table, nan=-math.inf)
        if column in BOUNDED_ROLES and float(table.max()) < ROLE_FLOOR:  # no head has the role: name none
            print(f"{column + ':':<24}no head reaches {ROLE_FLOOR} (largest {float(table.max()):.3f})")
            continue
        layer, head = divmod(int(table.argmax()), table.shape[1])
        measured = f"; {KNOCKOUT_METRICS[loaded.kind]}" if column == "knockout" else ""
        value = f"{float(table.max()):.4g}" if measured else f"{float(table.max()):.2f}"
        print(f"{column + ':':<24}{names[layer]} head {head} ({value}{measured})")
    print(f"csv:     {path}")
    print(f"page:    {page}  (its overview coloured by any of these scores: 'colour by'; shares on [0, 1])")
