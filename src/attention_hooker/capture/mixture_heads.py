"""Head counts that a family's forward computes from other sizes than its declared one.

JetMoE's mixture of attention heads (transformers ``JetMoeAttention``): each token's router
picks ``top_k`` of the layer's query experts; keys and values are shared. The layer lays the
``top_k`` expert queries of every token out as extra heads and calls the attention once
with ``top_k * num_key_value_heads`` query heads, the keys and values repeated ``top_k``
times. So the call's map is an ordinary ``(batch, top_k * kv_heads, query, key)`` softmax:
head ``j * kv_heads + h`` is *slot* ``j``, head ``h``. Row ``t`` of slot ``j`` is the
softmax of token ``t``'s query from its ``j``-th chosen expert (the router's
``logits.topk(top_k)`` order, highest logit first) over the shared keys, and that row times
value head ``h`` is slot ``j``'s output for token ``t`` before the expert's output
projection and the router's gate. Which expert slot ``j`` is differs per token: the router
returns its logits (the layer's third output, ``output_router_logits=True`` on the model,
or a forward hook on ``<layer>.experts.router``, whose output ``[4]`` is the logits of the
flattened tokens, ``(batch * query, experts)``).

The layer's ``num_heads`` is the configuration's ``num_attention_heads``, which the
forward never reads: a configuration loaded with a stale ``num_attention_heads`` (one not
equal to ``num_key_value_heads * num_experts_per_tok``) keeps it, so the count is taken
from the sizes the forward uses.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

__all__ = ["COMPUTED_HEADS", "computed_heads"]

# class name -> the module's attributes whose product is the number of query heads its
# attention call has. One row per family; matched by name so transformers is not imported.
COMPUTED_HEADS: Dict[str, Tuple[str, ...]] = {
    "JetMoeAttention": ("top_k", "num_key_value_heads"),  # slots x heads per expert
}


def computed_heads(module) -> Optional[int]:
    """The query heads of ``module``'s attention call where its family computes them from
    other sizes (:data:`COMPUTED_HEADS`), else ``None``.

    Example:
        >>> class JetMoeAttention: top_k, num_key_value_heads, num_heads = 2, 3, 4
        >>> computed_heads(JetMoeAttention()), computed_heads(object())
        (6, None)
    """
    names = COMPUTED_HEADS.get(type(module).__name__)
    if names is None:
        return None
    heads = 1
    for name in names:
        value = getattr(module, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return None  # not the layout the row describes: the declared count applies
        heads *= value
    return heads
