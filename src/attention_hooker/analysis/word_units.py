"""Which token positions make each word (or span) of a text: the units :func:`~attention_hooker.analysis.words.to_words`
groups attention into, one list per batch row, with their labels.

Units come from a fast tokenizer's ``word_ids`` (a word is a run of consecutive positions with the
same word index; a position whose index is ``None``, a special token, is a unit of its own) or from
spans ``(start, end)`` of token positions (``end`` not included; a position in no span is a unit of its
own). Positions that an attention mask marks 0 (padding) belong to no unit. Units are in the order of
their first position.

A unit's label is, in this order: the name given to its span; its pieces joined (``tokenizer.convert_tokens_to_string``
when a tokenizer is given, else :func:`join_pieces`); ``"t5"`` / ``"t3-7"`` (its token positions) when no tokens are known.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

from ..errors import AttentionHookerError, AttentionHookerTypeError

__all__ = ["Units", "join_pieces", "units_per_row"]


@dataclass(frozen=True)
class Units:
    """The units of one batch row of ``positions`` tokens.

    Attributes:
        index: per token position, its unit (``-1``: padding, in no unit).
        spans: per unit, ``(first position, last position + 1)``.
        names: per unit, its label.
    """

    index: Tuple[int, ...]
    spans: Tuple[Tuple[int, int], ...]
    names: Tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.spans)


def join_pieces(pieces: Sequence[str], *, one_word: bool = True) -> str:
    """A word (or, ``one_word=False``, a span of words) from its tokens, without a tokenizer:
    SentencePiece's ``▁`` and byte-level BPE's ``Ġ`` become spaces; WordPiece's ``##`` is dropped from
    a continuing piece, and, in a span of pieces without those markers, every other piece starts a
    new word (a space before it). The ends are stripped. (Pass ``tokenizer=`` to
    :func:`~attention_hooker.analysis.words.to_words` for any other scheme: its
    ``convert_tokens_to_string`` joins them.)

    Example:
        >>> join_pieces(["un", "##bel", "##ie", "##va", "##bly"]), join_pieces(["▁New", "▁York"], one_word=False)
        ('unbelievably', 'New York')
        >>> join_pieces(["the", "un", "##bel", "##ievably"], one_word=False), join_pieces(["Ġthe", "Ġcat"], one_word=False)
        ('the unbelievably', 'the cat')
    """
    marked = any("▁" in p or "Ġ" in p for p in pieces)
    text = ""
    for i, piece in enumerate(pieces):
        if i and piece.startswith("##") and len(piece) > 2:
            piece = piece[2:]
        elif i and not one_word and not marked:
            piece = " " + piece
        text += piece
    return text.replace("▁", " ").replace("Ġ", " ").strip()


def _rows_of(value, name: str, nested) -> Optional[list]:
    """``value`` as a list of rows (one per batch row, or a single row): ``None`` passes."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise AttentionHookerTypeError(f"{name} must be a list (or one list per batch row), got {type(value).__name__}")
    value = list(value)
    return [list(row) for row in value] if nested(value) else [value]


def _is_row_list(items) -> bool:
    """Whether ``items`` is a list of rows (each a list) rather than one row of scalars."""
    return bool(items) and all(isinstance(x, Sequence) and not isinstance(x, (str, bytes)) for x in items)


def _is_span_rows(items) -> bool:
    """Whether ``items`` is one list of spans per batch row rather than one list of spans."""
    def span_list(x):
        return isinstance(x, Mapping) or (isinstance(x, Sequence) and not isinstance(x, (str, bytes))
                                          and all(isinstance(s, Sequence) and not isinstance(s, (str, bytes)) for s in x))
    return bool(items) and all(span_list(x) for x in items)


def _word_ids_rows(word_ids) -> Tuple[list, Optional[list], Optional[list]]:
    """``(word_ids rows, token rows or None, mask rows or None)``; an encoding gives all three."""
    if callable(getattr(word_ids, "word_ids", None)):  # a fast tokenizer's BatchEncoding
        encodings = getattr(word_ids, "encodings", None)
        if not encodings:
            raise AttentionHookerTypeError(
                "word_ids is an encoding without word ids: a slow (Python) tokenizer made it; use the model's fast "
                "tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True)) or pass spans=")
        rows = len(encodings)
        ids = [word_ids.word_ids(b) for b in range(rows)]
        tokens = [list(word_ids.tokens(b)) for b in range(rows)]
        mask = word_ids.get("attention_mask") if isinstance(word_ids, Mapping) else None
        return ids, tokens, _rows_of(mask, "the encoding's attention_mask", _is_row_list)
    return _rows_of(word_ids, "word_ids", _is_row_list), None, None


def _check_word_ids(ids: list, where: str) -> None:
    for p, wid in enumerate(ids):
        if wid is None:
            continue
        if isinstance(wid, bool) or not isinstance(wid, numbers.Integral):
            raise AttentionHookerTypeError(
                f"{where}[{p}] is {wid!r}; expected a word index (an int from 0) or None (a special token)")
        if wid < 0:
            raise AttentionHookerError(
                f"{where}[{p}] is {wid}; expected a word index (an int from 0) or None (a special token)")


def _spans_of(spans, positions: int, where: str) -> List[Tuple[int, int, Optional[str]]]:
    """``[(start, end, name or None)]`` in position order, checked: in ``0..positions``, not empty, not overlapping."""
    if isinstance(spans, Mapping):
        items = [(*_pair(value, f"{where}[{name!r}]"), str(name)) for name, value in spans.items()]
    elif isinstance(spans, Sequence) and not isinstance(spans, (str, bytes)):
        items = []
        for i, span in enumerate(spans):
            if not isinstance(span, Sequence) or isinstance(span, (str, bytes)) or len(span) not in (2, 3):
                raise AttentionHookerTypeError(
                    f"{where}[{i}] is {span!r}; expected (start, end) or (start, end, name) in token positions")
            items.append((*_pair(span[:2], f"{where}[{i}]"), None if len(span) == 2 else str(span[2])))
    else:
        raise AttentionHookerTypeError(
            f"spans must be a list of (start, end) or (start, end, name), or {{name: (start, end)}}, "
            f"got {type(spans).__name__}")
    for start, end, name in items:
        what = f"span {name!r}" if name is not None else f"span ({start}, {end})"
        if not 0 <= start < end <= positions:
            raise AttentionHookerError(
                f"{where}: {what} = ({start}, {end}) is outside the {positions} token positions or empty; expected "
                f"0 <= start < end <= {positions} (end not included)")
    items.sort(key=lambda s: s[0])
    for (s0, e0, n0), (s1, e1, n1) in zip(items, items[1:]):
        if s1 < e0:
            first = n0 if n0 is not None else f"({s0}, {e0})"
            second = n1 if n1 is not None else f"({s1}, {e1})"
            raise AttentionHookerError(f"{where}: spans {first} and {second} overlap (positions {s1}..{min(e0, e1) - 1}); "
                                       "each token position belongs to at most one span")
    return items


def _pair(value, where: str) -> Tuple[int, int]:
    if (not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise AttentionHookerTypeError(f"{where} is {value!r}; expected (start, end): two ints, token positions")
    return int(value[0]), int(value[1])


def _label(positions: List[int], tokens: Optional[list], tokenizer, single: bool, one_word: bool = True) -> str:
    """A unit's label from its token positions: its token (a unit of its own), its pieces joined, or its positions."""
    if tokens is None:
        return f"t{positions[0]}" if len(positions) == 1 else f"t{positions[0]}-{positions[-1]}"
    pieces = [str(tokens[p]) for p in positions]
    if single:
        return pieces[0]
    if tokenizer is not None:
        return str(tokenizer.convert_tokens_to_string(pieces)).strip()
    return join_pieces(pieces, one_word=one_word)


def _row_units(groups: List[Tuple[List[int], Optional[str], bool]], positions: int) -> Units:
    """Units from ``[(positions, label, special)]`` in position order."""
    index = [-1] * positions
    for u, (members, _, _) in enumerate(groups):
        for p in members:
            index[p] = u
    return Units(tuple(index), tuple((m[0], m[-1] + 1) for m, _, _ in groups), tuple(label for _, label, _ in groups))


def _word_groups(ids: list, keep: list, tokens, tokenizer) -> list:
    runs: List[Tuple[List[int], Optional[int]]] = []
    for p, wid in enumerate(ids):
        if not keep[p]:
            continue
        if wid is not None and runs and runs[-1][1] == wid and runs[-1][0][-1] == p - 1:
            runs[-1][0].append(p)
        else:
            runs.append(([p], wid))
    return [(members, _label(members, tokens, tokenizer, wid is None), wid is None) for members, wid in runs]


def _span_groups(spans: list, keep: list, tokens, tokenizer, where: str) -> list:
    positions = len(keep)
    owner = [None] * positions
    for i, (start, end, _) in enumerate(spans):
        for p in range(start, end):
            owner[p] = i
    groups, seen = [], set()
    for p in range(positions):
        if not keep[p]:
            continue
        i = owner[p]
        if i is None:
            groups.append(([p], _label([p], tokens, tokenizer, True), True))
        elif i not in seen:
            seen.add(i)
            start, end, name = spans[i]
            members = [q for q in range(start, end) if keep[q]]
            groups.append((members, name if name is not None else _label(members, tokens, tokenizer, False, False),
                           False))
    for i, (start, end, name) in enumerate(spans):
        if i not in seen:
            raise AttentionHookerError(f"{where}: span {name if name is not None else (start, end)!r} covers only "
                                       "positions the attention mask marks as padding")
    return groups


def units_per_row(*, word_ids=None, spans=None, tokens=None, tokenizer=None, attention_mask=None,
                  positions: Optional[int] = None) -> List[Units]:
    """The units of each batch row (one list for every row when one row is given).

    Args:
        word_ids: a fast tokenizer's ``word_ids`` (``encoding.word_ids(b)``: one list, or one per
            batch row), or the encoding itself (its word ids, tokens and attention mask, every row).
        spans: instead of ``word_ids``: ``[(start, end)]``, ``[(start, end, name)]`` or
            ``{name: (start, end)}`` in token positions (``end`` not included), or one such per batch row.
        tokens: the token strings (one list, or one per batch row), for labels.
        tokenizer: joins a word's pieces for its label (``convert_tokens_to_string``).
        attention_mask: ``(batch, positions)`` or ``(positions,)``, 0 for padding: those positions belong to no unit.
        positions: the token positions of a row (the attention's keys); by default the length of
            the word ids, else of the tokens or the mask.

    Returns:
        One :class:`Units` per batch row given (a single row stands for every row).

    Raises:
        AttentionHookerError: word ids below 0 or not ``positions`` long, spans that overlap, are empty or leave
            the positions, or rows of tokens or mask whose count or length does not match.
        AttentionHookerTypeError: neither or both of ``word_ids`` and ``spans``, or inputs of the wrong type.

    Example:
        >>> [u.names for u in units_per_row(word_ids=[None, 0, 1, 1, None], tokens=["[CLS]", "a", "bc", "##d", "[SEP]"])]
        [('[CLS]', 'a', 'bcd', '[SEP]')]
        >>> units_per_row(spans={"question": (1, 3)}, tokens=list("xabz"))[0].names
        ('x', 'question', 'z')
    """
    if (word_ids is None) == (spans is None):
        raise AttentionHookerTypeError("give word_ids (a tokenizer's encoding.word_ids()) or spans=[(start, end), ...], "
                                       "one of them")
    if tokenizer is not None and not callable(getattr(tokenizer, "convert_tokens_to_string", None)):
        raise AttentionHookerTypeError(f"tokenizer must have convert_tokens_to_string (a Hugging Face tokenizer), "
                                       f"got {type(tokenizer).__name__}")
    rows = {"word_ids": None, "spans": None}
    if word_ids is not None:
        rows["word_ids"], encoded_tokens, encoded_mask = _word_ids_rows(word_ids)
        tokens = encoded_tokens if tokens is None else tokens
        attention_mask = encoded_mask if attention_mask is None else attention_mask
        for b, ids in enumerate(rows["word_ids"]):
            _check_word_ids(ids, "word_ids" if len(rows["word_ids"]) == 1 else f"word_ids[{b}]")
    else:
        rows["spans"] = [spans] if isinstance(spans, Mapping) else _rows_of(spans, "spans", _is_span_rows)
    rows["tokens"] = _rows_of(tokens, "tokens", _is_row_list)
    rows["attention_mask"] = _rows_of(attention_mask, "attention_mask", _is_row_list)
    if positions is None:
        first = next((rows[name] for name in ("word_ids", "tokens", "attention_mask") if rows[name] is not None), None)
        if first is None:
            raise AttentionHookerError("with spans=, give tokens= or attention_mask= too: they say how many token "
                                       "positions there are")
        positions = len(first[0])
    count = max(len(value) for value in rows.values() if value is not None)
    for name, value in rows.items():
        if value is None:
            continue
        if len(value) not in (1, count):
            raise AttentionHookerError(f"{name} holds {len(value)} rows and another input {count}; give one row for "
                                       "every batch row, or a single one for all")
        for b, row in enumerate(value if name != "spans" else ()):
            if len(row) != positions:
                raise AttentionHookerError(
                    f"{name}{'' if len(value) == 1 else f'[{b}]'} has {len(row)} positions, while the attention "
                    f"has {positions} keys (token positions)")
    pick = lambda value, b: None if value is None else value[b if len(value) > 1 else 0]  # noqa: E731
    units = []
    for b in range(count):
        mask = pick(rows["attention_mask"], b)
        keep = [bool(x) for x in mask] if mask is not None else [True] * positions
        tokens = pick(rows["tokens"], b)
        if rows["word_ids"] is not None:
            groups = _word_groups(pick(rows["word_ids"], b), keep, tokens, tokenizer)
        else:
            where = "spans" if len(rows["spans"]) == 1 else f"spans[{b}]"
            groups = _span_groups(_spans_of(pick(rows["spans"], b), positions, where), keep, tokens, tokenizer, where)
        units.append(_row_units(groups, positions))
    return units
