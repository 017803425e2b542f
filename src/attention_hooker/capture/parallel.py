"""Tensor-parallel attention: which of a layer's heads this rank computes.

With ``torch.distributed.tensor.parallel`` (colwise q/k/v projections, rowwise output),
or transformers' ``tp_plan``, each rank's projections hold a contiguous block of the
output features, so its attention sees only its own block of heads: rank ``r`` of ``n``
computes heads ``r*h .. r*h + h - 1`` of ``n*h``. The capture keeps the local heads and
labels them with these global indices; :func:`attention_hooker.distributed.assemble_heads`
puts the full ``(batch, heads, query, key)`` together.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

__all__ = ["head_shard"]

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = Shard = None


def head_shard(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(this rank's block, blocks)`` when ``module``'s query projection is a DTensor
    sharded on its output features (dim 0 of the weight), else ``None``."""
    if DTensor is None:  # pragma: no cover - torch without distributed tensors
        return None
    for name, parameter in module.named_parameters():
        if not name.endswith("weight"):
            continue
        if not isinstance(parameter, DTensor):  # runs on every sdpa call: one look at the first projection
            return None
        for mesh_dim, placement in enumerate(parameter.placements):
            if isinstance(placement, Shard) and placement.dim == 0:
                coordinate = parameter.device_mesh.get_coordinate()
                if coordinate is None:  # this rank is not in the mesh
                    return None
                return coordinate[mesh_dim], parameter.device_mesh.size(mesh_dim)
        return None  # the first projection is not split by heads: not tensor-parallel heads
    return None
