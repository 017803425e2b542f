"""Attention between words (or spans: sentences, a prompt's parts) instead of word pieces (issue 26).

Researchers read words. Clark et al. (2019, "What Does BERT Look At?", section 4.1) turn token
attention into word attention so: attention *to* a split word is the **sum** of the weights on its
pieces (keys), attention *from* a split word the **mean** over its pieces (queries). Each row then is
still a distribution over the words. :func:`to_words` does that by default and names other rules.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._map_kinds import kind_of, mark_kind
from .._tensor import as_batched, values_of
from ..errors import AttentionHookerError, AttentionHookerTypeError
from ..values import AttentionValues, format_size
from .word_units import Units, units_per_row

__all__ = ["to_words", "WordValues", "WordAttention", "RULES"]

RULES: Dict[str, Tuple[str, str]] = {
    "clark": ("mean", "sum"),
    "mean": ("mean", "mean"),
    "sum": ("sum", "sum"),
    "max": ("amax", "amax"),
}
"""Each rule's reduction over a unit's pieces: ``(as queries, as keys)``.

- ``"clark"`` (the default): mean over the query pieces, sum over the key pieces; rows stay
  distributions (each word's row sums to what a token row sums to: 1).
- ``"mean"``: mean over both: the average weight between two words' pieces (a block mean); rows
  are not distributions (a word of 3 pieces gets a third of their summed weight).
- ``"sum"``: sum over both: the total weight between the pieces; a word's row sums to its number of pieces.
- ``"max"``: the largest weight between any of their pieces; rows are not distributions.
"""

PADDED_LABEL = ""  # the label of a unit past a row's last one (rows with fewer units than others)


class WordValues(AttentionValues):
    """``{layer_name: [tensor per call]}``, each ``(batch, heads, words, words)``, with the words' labels.

    What :func:`to_words` returns for a capture. The views label their axes by ``tokens`` (the name
    they read: pass it to :func:`~attention_hooker.render_html` and the pictures as they are, or as
    ``tokens=``).

    Attributes:
        tokens: the units' labels: one list per batch row (one list when every row has the same
            units), each as long as the word axis; a row with fewer units than the longest has
            ``""`` past its last (a unit of zero weights).
        spans: per batch row (as ``tokens``), each unit's ``(first token position, last + 1)``.
        rule: the rule the tokens were grouped by (:data:`RULES`).
        positions: the token positions the units cover (the keys of the token-level calls).
    """

    def __init__(self, *args, tokens=None, spans=None, rule: str = "clark", positions: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens: List[List[str]] = tokens or []
        self.spans: List[List[Tuple[int, int]]] = spans or []
        self.rule, self.positions = rule, positions

    def attention(self, layer: str, call: int = 0) -> "WordAttention":
        """Call ``call`` of ``layer`` with its labels: what :func:`~attention_hooker.plot_attention_grid` takes.

        Raises:
            AttentionHookerError: for an unknown layer or a call it does not have.
        """
        if layer not in self:
            raise AttentionHookerError(f"unknown layer {layer!r}; known layers: {list(self)}")
        calls = self[layer]
        if not -len(calls) <= call < len(calls):
            raise AttentionHookerError(f"layer {layer!r} has {len(calls)} calls; call={call} is none of them")
        return WordAttention(calls[call], tokens=self.tokens, spans=self.spans, rule=self.rule,
                             positions=self.positions)

    def copy(self) -> "WordValues":
        return WordValues(self._snapshot(), tokens=self.tokens, spans=self.spans, rule=self.rule,
                          positions=self.positions)

    def __reduce__(self):
        return type(self), (self._snapshot(),), {"tokens": self.tokens, "spans": self.spans, "rule": self.rule,
                                                 "positions": self.positions}

    def __repr__(self) -> str:
        calls = sum(len(v) for v in self.values())
        words = len(self.tokens[0]) if self.tokens else 0
        return (f"WordValues({len(self)} layers, {calls} calls, {words} words of {self.positions} tokens, "
                f"rule {self.rule!r}, {format_size(self.nbytes)})")


class WordAttention:
    """One call's attention between words, ``weights`` ``(batch, heads, words, words)``, with the labels.

    What :func:`to_words` returns for one tensor; :func:`~attention_hooker.plot_attention_grid` and
    :func:`~attention_hooker.render_html` take it as it is (the labels go on the axes).

    Attributes:
        weights: the tensor (``(batch, heads, query rows, words)`` when the query rows were not the
            tokens: a capture that kept some rows keeps them).
        tokens, spans, rule, positions: as in :class:`WordValues`.
    """

    def __init__(self, weights: torch.Tensor, *, tokens, spans, rule: str, positions: int):
        self.weights = weights
        self.tokens, self.spans, self.rule, self.positions = tokens, spans, rule, positions

    @property
    def shape(self) -> torch.Size:
        return self.weights.shape

    @property
    def values(self) -> Dict[str, List[torch.Tensor]]:
        """``{"words": [weights]}``: the page and the overview read a capture's ``values``."""
        return {"words": [self.weights]}

    def __repr__(self) -> str:
        return f"WordAttention({tuple(self.weights.shape)}, {self.positions} tokens, rule {self.rule!r})"


def _check_rule(rule) -> str:
    if not isinstance(rule, str) or rule not in RULES:
        raise AttentionHookerError(f"rule={rule!r} is not one of {', '.join(map(repr, RULES))}: 'clark' sums the "
                                   "keys' pieces and averages the queries' (rows stay distributions)")
    return rule


def _index(units: Sequence[Units], batch: int, width: int, device) -> torch.Tensor:
    """``(batch, positions)`` int64: each position's unit, ``width`` for positions in none (padding)."""
    rows = [[u if u >= 0 else width for u in row.index] for row in units]
    index = torch.tensor(rows, dtype=torch.int64, device=device)  # (1 or B, T)
    return index.expand(batch, -1)


def group_call(weights, units: Sequence[Units], rule: str, where: str = "the attention") -> torch.Tensor:
    """One call ``(batch, heads, query, key)`` grouped into units: ``(batch, heads, units, units)``.

    The keys are grouped by each row's units; the queries too when there are as many as keys
    (else, a capture that kept some rows or cross-attention's other side, they stay as they are).
    Weights are reduced in float32 (float64 stays float64) and returned in the call's dtype.

    Raises:
        AttentionHookerError: when the keys are not the units' token positions, or the units are
            neither one row nor one per batch row.
    """
    w = as_batched(weights, where)  # (B, H, Q, K)
    batch, heads, n_query, n_key = w.shape
    positions = len(units[0].index)
    if n_key != positions:
        raise AttentionHookerError(f"{where} has {n_key} keys, while the word ids cover {positions} token positions: "
                                   "the words must come from the text the attention was captured on (layers= "
                                   "leaves out the layers of another text)")
    if len(units) not in (1, batch):
        raise AttentionHookerError(f"the word ids hold {len(units)} rows, while {where} has batch {batch}; give one "
                                   "row per batch row, or one for all")
    dtype = w.dtype
    work = w if dtype == torch.float64 else w.to(torch.float32)
    width = max(u.count for u in units)
    index = _index(units, batch, width, w.device)  # (B, T)
    by_query, by_key = RULES[rule]
    out = work.new_zeros(batch, heads, n_query, width + 1)  # the last column collects padding, then goes
    out = out.scatter_reduce(-1, index[:, None, None, :].expand(batch, heads, n_query, n_key), work, by_key,
                             include_self=False)[..., :width]  # (B, H, Q, W)
    if n_query == n_key:
        rows = work.new_zeros(batch, heads, width + 1, width)
        out = rows.scatter_reduce(-2, index[:, None, :, None].expand(batch, heads, n_query, width), out, by_query,
                                  include_self=False)[..., :width, :]  # (B, H, W, W)
    return out.to(dtype) if dtype.is_floating_point else out


def to_words(
    capture,
    word_ids=None,
    *,
    spans=None,
    rule: str = "clark",
    tokens: Optional[Sequence] = None,
    tokenizer=None,
    attention_mask=None,
    layers: Optional[Sequence[str]] = None,
):
    """Attention between words (or spans) instead of tokens: Clark et al.'s rule by default.

    A word is a run of consecutive positions with the same word id (``encoding.word_ids()``); a
    position whose id is ``None`` (``[CLS]``, ``[SEP]``, ``<s>``) is a unit of its own, labelled
    by its token. With ``spans`` each span is a unit and every position in no span one of its own
    (so rows still sum to 1). Positions an attention mask marks 0 (padding) are in no unit: their
    weight as keys is left out (the model gives them none), their rows too. Per batch row the units
    may differ; rows with fewer units than the longest are padded with units of zero weight.

    Rules (:data:`RULES`; queries, keys): ``"clark"`` mean, sum (rows stay distributions);
    ``"mean"`` mean, mean; ``"sum"`` sum, sum; ``"max"`` the largest weight between two units'
    pieces (these three: rows are not distributions).

    Args:
        capture: a hooker, a loaded capture or ``{layer_name: [tensor per call]}``, each tensor
            ``(batch, heads, query, key)``; or one such tensor (``(heads, query, key)`` gets batch 1).
            Keys must be the tokens the word ids describe; queries are grouped when there are as
            many (a capture that kept some rows, ``rows=``, keeps them). The rule reads shapes only:
            cross-attention whose other side happens to have as many tokens has its queries
            grouped by these words too, so pass such layers apart (``layers=``) or not at all.
        word_ids: ``encoding.word_ids()`` of a fast tokenizer (one list, or one per batch row), or
            the encoding itself (``tokenizer(texts, ...)``): its word ids, tokens and attention mask
            for every row.
        spans: instead of ``word_ids``: ``[(start, end)]``, ``[(start, end, name)]`` or ``{name:
            (start, end)}`` in token positions, ``end`` not included (sentences, a prompt's parts);
            or one such list per batch row. Spans may not overlap nor leave the positions.
        rule: ``"clark"`` (default), ``"mean"``, ``"sum"`` or ``"max"``.
        tokens: the tokens' strings (one list, or one per batch row) for the labels: a word's pieces
            joined (WordPiece ``##``, SentencePiece ``▁`` and byte-level ``Ġ`` understood), a span's
            name or its pieces joined. Without tokens a unit is labelled by its positions (``t3-5``).
        tokenizer: joins a word's pieces by its ``convert_tokens_to_string`` (any scheme).
        attention_mask: ``(batch, positions)`` or ``(positions,)``: 0 marks padding.
        layers: only these layers of a capture.

    Returns:
        For a capture, :class:`WordValues`: ``{layer_name: [tensor (batch, heads, words, words)]}``
        with ``tokens`` (the words' labels), ``spans`` and ``rule``. For a tensor, a
        :class:`WordAttention` (``weights``, ``tokens``, ...). The views take both as they are.
        A call marked as not probabilities (DiffLlama's differential map) gives words marked
        the same, which the analyses refuse as they refuse the call; a map over channels
        (XCiT) has no words and is refused.

    Raises:
        AttentionHookerError: an unknown rule; word ids below 0; spans that overlap, are empty or
            leave the positions; word ids, tokens or a mask whose length is not the keys' count, or
            whose rows are neither one nor one per batch row; an unknown layer.
        AttentionHookerTypeError: neither or both of ``word_ids`` and ``spans``, or inputs of the
            wrong type (a slow tokenizer's encoding, which has no word ids).

    Example:
        >>> import torch
        >>> attn = torch.rand(1, 2, 5, 5).softmax(-1)  # [CLS] un ##believ ##able [SEP]
        >>> words = to_words(attn, [None, 0, 0, 0, None], tokens=["[CLS]", "un", "##believ", "##able", "[SEP]"])
        >>> words.tokens, tuple(words.weights.shape)
        ([['[CLS]', 'unbelievable', '[SEP]']], (1, 2, 3, 3))
        >>> bool(torch.allclose(words.weights.sum(-1), torch.ones(1, 2, 3)))  # rows stay distributions
        True
    """
    rule = _check_rule(rule)
    single = isinstance(capture, torch.Tensor) or hasattr(capture, "__array__") and not hasattr(capture, "values")
    if single:
        weights = as_batched(capture)
        units = _units(word_ids, spans, tokens, tokenizer, attention_mask, weights.shape[-1])
        grouped = _group_marked(weights, units, rule, "the attention")
        return WordAttention(grouped, **_labels(units, rule))
    values = values_of(capture, layers=layers)
    keys = {as_batched(t, f"layer {name!r}").shape[-1] for name, calls in values.items() for t in calls}
    # One key count: the positions; layers of other lengths (another text) are named by group_call.
    units = _units(word_ids, spans, tokens, tokenizer, attention_mask, keys.pop() if len(keys) == 1 else None)
    grouped = {name: [_group_marked(t, units, rule, f"layer {name!r} call {i}") for i, t in enumerate(calls)]
               for name, calls in values.items()}
    return WordValues(grouped, **_labels(units, rule))


def _group_marked(weights, units: Sequence[Units], rule: str, where: str) -> torch.Tensor:
    """:func:`group_call`, refusing a map over channels and marking the result with a kind its input has."""
    kind = kind_of(weights)
    if kind is not None and kind.name == "channels":
        raise AttentionHookerError(f"{where} is {kind}: its query and key axes are channels of each head, not "
                                   "tokens, so it has no words")
    grouped = group_call(weights, units, rule, where)
    mark_kind(grouped, kind)  # a map that is not probabilities stays so, grouped
    return grouped


def _units(word_ids, spans, tokens, tokenizer, attention_mask, positions: Optional[int]) -> List[Units]:
    if tokens is not None and isinstance(tokens, (str, bytes)):
        raise AttentionHookerTypeError(f"tokens must be a list of token strings (or one per batch row), got a string "
                                       f"{tokens[:20]!r}")
    return units_per_row(word_ids=word_ids, spans=spans, tokens=tokens, tokenizer=tokenizer,
                         attention_mask=attention_mask, positions=positions)


def _labels(units: Sequence[Units], rule: str) -> dict:
    width = max(u.count for u in units)
    return {"tokens": [list(u.names) + [PADDED_LABEL] * (width - u.count) for u in units],
            "spans": [list(u.spans) for u in units], "rule": rule, "positions": len(units[0].index)}
