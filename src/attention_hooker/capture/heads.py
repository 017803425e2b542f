"""How many heads an attention module (or a model's configuration) declares: the one place
that reads a head count, for finding attention modules, for checking a call's layout
against its layer, and for the command line's plan of a streamed capture."""

from __future__ import annotations

import weakref
from typing import Optional

from .mixture_heads import computed_heads
from .parallel import head_shard

__all__ = ["HEAD_COUNT_NAMES", "head_count", "declared_heads"]

HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def head_count(owner, *, own_only: bool = False) -> Optional[int]:
    """The first positive int among ``owner``'s :data:`HEAD_COUNT_NAMES`, or ``None``.

    Args:
        owner: a module or a configuration (``None`` gives ``None``).
        own_only: read the object's own attributes only (``vars``), not its class's or
            properties (finding modules: an attribute miss on a module costs an exception).

    Example:
        >>> class Config: n_head = 12
        >>> head_count(Config()), head_count(None)
        (12, None)
    """
    if owner is None:
        return None
    attributes = vars(owner) if own_only else None
    for name in HEAD_COUNT_NAMES:
        value = attributes.get(name) if own_only else getattr(owner, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


_DECLARED_HEADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def declared_heads(module) -> Optional[int]:
    """The number of query heads an attention module declares, itself or in its ``config``
    (on a tensor-parallel rank: its share of them), or ``None``. Where the family's forward
    computes its heads from other sizes (JetMoE: slots x heads per expert), that count
    (:mod:`.mixture_heads`).

    Read once per module (``nn.Module`` attribute misses cost an exception each):
    a module's head count does not change between calls.
    """
    try:
        heads = _DECLARED_HEADS[module]
    except KeyError:
        heads = computed_heads(module)
        if heads is None:
            heads = head_count(module)
        if heads is None:
            heads = head_count(getattr(module, "config", None))
        _DECLARED_HEADS[module] = heads
    shard = head_shard(module) if heads is not None else None  # not cached: a model may be parallelised later
    if shard is not None and heads % shard[1] == 0:
        heads //= shard[1]  # tensor parallelism: this rank computes its block of the heads
    return heads
