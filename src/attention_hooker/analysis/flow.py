"""Attention flow (Abnar & Zuidema 2020): how much of each input token can reach a token at the top,
as a maximum flow through the layered graph of attention.

The graph is rollout's: a node per (layer, token), and from token ``i`` of layer ``l + 1`` an edge to
token ``j`` of layer ``l`` with capacity ``A~_l[i, j] = rownorm(fuse_heads(A_l) + I)`` (the residual
connection as the identity). Rollout multiplies the layers' matrices (every path counts, in
proportion); flow asks how much can get through at once, bounded by the narrowest layer, so that a
token reached by one wide path and one narrow path is not counted twice.

Each (output token, input token) pair is one maximum flow, solved by scipy's
``scipy.sparse.csgraph.maximum_flow`` on integer capacities (``A~ * 2**28``, rounded): a flow is
within ``layers * tokens / 2**29`` of the exact one. Cost grows with the pairs and the edges
(``layers * tokens**2``): all pairs of 64 tokens over 6 layers take a few seconds; at 512 tokens ask
for the output positions you need (``output_positions=[0]``: the [CLS] token).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .._checks import check_flag, index_list, one_of
from .core import FUSIONS, square_stack
from .rollout import layer_graphs
from ..errors import AttentionHookerError

__all__ = ["attention_flow"]

_SCALE = 2 ** 28  # capacities as integers: scipy's maximum flow takes int32


def attention_flow(
    attentions,
    *,
    output_positions: Optional[Sequence[int]] = None,
    add_residual: bool = True,
    head_fusion: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """The attention flow from every input token to chosen tokens of the last layer.

    Args:
        attentions: per-layer ``(batch, heads, tokens, tokens)`` in model order, or
            ``hooker.values`` (first call of each layer), as :func:`attention_rollout` takes them.
        output_positions: the last layer's tokens to compute the flow into (negative ones count
            from the end); all tokens by default.
        add_residual: add the identity for the residual connection (as the paper does).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        normalize: divide each output token's flows by their sum, as the authors' code does, so
            that each row sums to 1 and reads as shares; ``False`` keeps the maximum-flow values
            (each at most 1).

    Returns:
        ``(batch, outputs, tokens)`` float64: row ``o`` holds the flow from each input token into
        output token ``output_positions[o]``.

    Raises:
        AttentionHookerError: on layers that are not square attention probabilities of one shape,
            an output position outside the tokens, or when scipy is missing.

    Example:
        >>> a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # one layer, one head
        >>> attention_flow([a], normalize=False)  # one layer: the flow is the edge itself
        tensor([[[1.0000, 0.0000],
                 [0.2500, 0.7500]]], dtype=torch.float64)
    """
    try:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_flow
    except ImportError:  # pragma: no cover - scipy comes with the "analysis" extra
        raise AttentionHookerError("attention_flow needs scipy: pip install scipy") from None
    one_of(head_fusion, "head_fusion", FUSIONS)
    add_residual = check_flag(add_residual, "add_residual")
    normalize = check_flag(normalize, "normalize")
    layers = square_stack(attentions, "attentions")
    graphs = layer_graphs(layers, add_residual, head_fusion)  # each (B, T, T)
    batch, tokens = graphs[0].shape[0], graphs[0].shape[-1]
    outputs = range(tokens) if output_positions is None else index_list(
        output_positions, "output_positions", length=tokens, where="the tokens", allow_negative=True, noun="position")
    n_layers = len(graphs)
    flows = torch.zeros(batch, len(outputs), tokens, dtype=torch.float64)
    for b in range(batch):
        rows, cols, capacities = [], [], []
        for level, graph in enumerate(graphs):  # edges from layer level + 1 down to layer level
            weights = np.rint(graph[b].cpu().numpy() * _SCALE).astype(np.int64)
            above, below = np.nonzero(weights)
            rows.append((level + 1) * tokens + above)
            cols.append(level * tokens + below)
            capacities.append(weights[above, below])
        size = (n_layers + 1) * tokens
        network = csr_matrix((np.concatenate(capacities).astype(np.int32),
                              (np.concatenate(rows), np.concatenate(cols))), shape=(size, size))
        for o, position in enumerate(outputs):
            source = n_layers * tokens + position
            for sink in range(tokens):
                flows[b, o, sink] = maximum_flow(network, source, sink).flow_value / _SCALE
    if normalize:
        totals = flows.sum(-1, keepdim=True)
        if (totals <= 0).any():  # pragma: no cover - the residual edge always carries flow
            raise AttentionHookerError("an output token receives no flow at all: nothing to normalise")
        flows = flows / totals
    return flows.to(graphs[0].device)
