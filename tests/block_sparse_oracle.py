"""An oracle for BigBird's block-sparse attention, written apart from the library's placement.

:func:`block_sparse_calls` runs a model once and records, for each block-sparse layer call, its
input, its query and key masks, its output and the random key blocks its keys were gathered with
(from the module's own ``torch_gather_b2``, the one place the layer uses them).
:func:`dense_by_hand` then computes each real query's softmax of ``q.k / sqrt(d)`` from the module's
own weights over every key it attended, each counted as often as the layer attended it (written
from the layer's description: its window, the first and last blocks, its random blocks); it never
looks at the layer's five softmaxes, so it shares nothing with a placement of them.
"""

import math
from typing import Dict, List, Tuple

import torch

KINDS = ("BigBirdBlockSparseAttention", "BigBirdPegasusBlockSparseAttention")


def block_sparse_layers(model) -> List[Tuple[str, torch.nn.Module]]:
    """The model's block-sparse attention modules, by name."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in KINDS]


def block_sparse_calls(model, inputs, forward) -> Dict[str, tuple]:
    """Runs ``forward(model, inputs)`` once; for each block-sparse layer: (hidden states (B, L, C), real
    queries (B, L), real keys (B, L), the random key blocks its call gathered with (B, H, nb-2, r), its
    output (B, L, C)); and the forward's output under the key ``None``."""
    seen, handles, patched = {}, [], []
    for name, module in block_sparse_layers(model):
        gather = type(module).torch_gather_b2

        def record(params, indices, name=name, gather=gather):
            seen.setdefault(name + "/rand", indices.clone())
            return gather(params, indices)

        module.torch_gather_b2 = record  # the instance's own, looked up through self by the layer
        patched.append(module)

        def hook(m, args, out, name=name):
            hidden, from_mask, to_mask = args[0], args[2], args[3]
            b, length = hidden.shape[:2]
            seen[name] = (hidden, from_mask.reshape(b, length) != 0, to_mask.reshape(b, length) != 0, out[0])
        handles.append(module.register_forward_hook(hook))
    try:
        output = forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.torch_gather_b2
    calls = {name: (*seen[name][:3], seen[name + "/rand"], seen[name][3]) for name, _ in block_sparse_layers(model)
             if name in seen}
    calls[None] = output
    return calls


def attended_counts(blocks: int, random: torch.Tensor, bs: int) -> torch.Tensor:
    """``(B, H, L, L)``: how many times each query of a call attended each key. Global query blocks
    (the first and last) attend every key once; query block 1 the key blocks 0, 1, 2, the last; query
    block ``nb-2`` 0, ``nb-3``, ``nb-2``, the last; the others their block and its two neighbours, the
    first and the last; each also its random blocks ``random[:, :, q - 1]`` (which may repeat one)."""
    batch, heads = random.shape[:2]
    counts = torch.zeros(batch, heads, blocks, blocks)
    for b in range(batch):
        for h in range(heads):
            for q in range(blocks):
                if q in (0, blocks - 1):
                    counts[b, h, q] += 1
                    continue
                if q == 1:
                    listed = [0, 1, 2, blocks - 1]
                elif q == blocks - 2:
                    listed = [0, blocks - 3, blocks - 2, blocks - 1]
                else:
                    listed = [0, q - 1, q, q + 1, blocks - 1]
                for k in listed + random[b, h, q - 1].tolist():
                    counts[b, h, q, k] += 1
    return counts.repeat_interleave(bs, 2).repeat_interleave(bs, 3)


def dense_by_hand(module, x, query_real, key_real, random) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(map (B, H, L, L), values (B, H, L, d))`` from the module's weights: each real query's softmax
    of ``q.k / sqrt(d)`` over the keys it attended, with multiplicity; padded keys and padded queries 0."""
    b, length, _ = x.shape
    h = module.num_attention_heads
    d = module.attention_head_size
    with torch.no_grad():
        q, k, v = (proj(x).view(b, length, h, d).transpose(1, 2) for proj in (module.query, module.key, module.value))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).double()
        counts = attended_counts(length // module.block_size, random, module.block_size).double()
        counts = counts * key_real[:, None, None, :]
        top = scores.masked_fill(counts == 0, -math.inf).amax(-1, keepdim=True)
        weights = counts * torch.exp(scores - top)
        weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * query_real[:, None, :, None]
    return weights.float(), v
