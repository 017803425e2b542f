"""Text-side fixes of the architecture zoo (issue 23, part 6): the sizes, inputs and verdicts that
the generic harness (``tests/zoo_harness.py``) needs for text families it could not build.

- :func:`adjust_config` gives a shrunk config what its family needs to run as it does at scale:
  a hybrid stack keeps one layer of each kind (two layers cut from a linear-attention-first
  pattern keep no attention layer, and transformers' mask code then finds no attention cache);
  multi-head latent attention keeps its low-rank and per-part head sizes consistent; and
  the sizes SHRINK misses or sets where the family reads another name.
- :func:`extra_inputs` adds the inputs a family requires beside its tokens (word boxes).
- :func:`count_attention_ops` counts the softmax / scaled-dot-product calls of a forward, at
  the dispatcher (below every Python wrapper), and :func:`judge_attention_free` gives the
  verdict ``"no attention"`` to a model transformers returns no attentions for, where the
  library finds no attention layer and the forward computes no softmax over anything.
"""

from __future__ import annotations

import copy
import inspect
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = __import__("transformers")

NO_ATTENTION = "no attention"  # the verdict's outcome: counted apart from exact and refused

# ---------------------------------------------------------------------------------------------------------
# Hybrid stacks: one layer of each kind, in the order the full-size pattern first meets them.

# The attributes that say, per layer, which kind of block it is (kept consistent with the layer count).
_LAYER_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")

# Mamba-2 mixers: heads x head size must be expand x hidden (2 x 32), with a small state.
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=4)

# Per family: the kinds given by a period and an offset, indices or a default with no attention layer
# (Bamba's and Granite-4.0-H's defaults are all Mamba-2; released checkpoints place attention layers
# among them), and sizes SHRINK misses or that the family reads under other names.
FAMILY_SIZES: Dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1], **_MAMBA2),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], shared_intermediate_size=32,
                             **_MAMBA2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "mamba2": dict(num_heads=8, head_dim=8, n_groups=1, state_size=16, chunk_size=4),
    "zamba2": dict(n_mamba_heads=8, mamba_headdim=8, mamba_d_state=16, chunk_size=4, attention_hidden_size=64,
                   attention_head_dim=16),
    "rwkv": dict(attention_hidden_size=32),
    "dots1": dict(n_shared_experts=1),  # its default (None) builds no model; released ones share experts
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # its default (None) builds no model
}
# Gemma 3n shares the keys and values of its last layers from earlier layers of the same kind: four layers,
# the last two reusing the first two's. Gemma 4's per-layer inputs are sized down with the vocabulary.
_GEMMA_PER_LAYER = dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8)
for _family in ("gemma3n", "gemma3n_text"):
    FAMILY_SIZES[_family] = dict(layer_types=["sliding_attention", "full_attention"] * 2, num_hidden_layers=4,
                                 num_kv_shared_layers=2, **_GEMMA_PER_LAYER)
for _family in ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text"):
    FAMILY_SIZES[_family] = dict(layer_types=["sliding_attention", "full_attention"], **_GEMMA_PER_LAYER)
# Defaults that build no model (a None where the model reads a number, a field the model reads but the
# config lacks), given the value released checkpoints have, in small.
FAMILY_SIZES.update({
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                      indexer_compress_ratio=2),
    "hrm_text": dict(num_layers_per_stack=1, num_hidden_layers=8),  # one layer per stack, H x (L + 1) cache slots
    "squeezebert": dict(embedding_size=32),
    "esmc": dict(num_key_value_heads=4),  # as at scale, one key/value head per query head
    "diffusion_gemma": dict(num_experts=4, top_k_experts=1, moe_intermediate_size=32, canvas_length=5),
    "t5gemma": dict(cross_attention_hidden_size=32),
    # DBRX reads rope_theta from its attention config, which no longer holds it, and clamps q/k/v by clip_qkv
    # (None by default, which torch refuses; 8 in the released model)
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "t5gemma2_encoder": dict(dropout_rate=0.0, mm_tokens_per_image=4),  # 4 x 4 patches pooled to 2 x 2
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0)}),
    # HunYuan-VL's rotary sections (x, y, t, ...) of a head of 8: one frequency each, as 16 each of 128
    "hunyuan_vl_text": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 1, 1])),
})
FAMILY_SIZES.update({
    "step3p7": dict(sliding_window=4),  # None by default, which its sliding layers refuse; 4 of the 7 tokens
    "funnel": dict(architectures=["FunnelModel"]),  # transformers' auto class reads it to choose among two
    # Zamba's shared transformer block is tied across its hybrid layers: two of them, as the tying expects
    "zamba": dict(layers_block_type=["linear_attention", "hybrid", "hybrid"], num_hidden_layers=3,
                  attention_hidden_size=64, attention_head_dim=16, mamba_dt_rank=4),
    # Reformer: one local and one LSH layer, chunks of 4 tokens (the 7 are padded to 8), 2 buckets
    "reformer": dict(attn_layers=["local", "lsh"], attention_head_size=8, axial_pos_shape=(8, 8),
                     axial_pos_embds_dim=(16, 16), local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2,
                     feed_forward_size=64),
    "bros": dict(dim_bbox_sinusoid_emb_1d=8, dim_bbox_sinusoid_emb_2d=64, dim_bbox_projection=8),
    # Layout models: the box embeddings are cut from the hidden size (4 coordinates and 2 sizes, or 6 sixths)
    "layoutlmv3": dict(coordinate_size=6, shape_size=4, input_size=32),  # and its page image of 32 pixels
    "lilt": dict(hidden_size=48),
    "cohere_compass": {"vision_config.rope_parameters": dict(rope_type="axial", rope_theta=10000.0),
                       "text_config.rope_parameters": {"full_attention": dict(rope_type="default", rope_theta=1e4)}},
})
# Convolutional stacks that downsample 32 times: 64-pixel images, small stems and one block per stage.
_CONVNEXT = dict(image_size=64, patch_size=4, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64])
FAMILY_SIZES.update({
    "convnext": _CONVNEXT, "convnextv2": _CONVNEXT,
    # Attention over image patches: 64-pixel images so that the stages attend over several patches (at 32 pixels
    # their keys are one patch, or PVTv2's one reduced token, and every map is 1), and an initializer range
    # (0.02 by default) at which activations do not vanish through the convolutions (at 0.02 they are ~1e-30
    # at MobileViT's attention, whose maps are then uniform: nothing to check)
    "mobilevit": dict(image_size=64, patch_size=2, initializer_range=0.3),
    "mobilevitv2": dict(image_size=64, patch_size=2, initializer_range=0.2),
    "pvt_v2": dict(image_size=64),
    "apertus1p5": {"vision_config.base_channels": 32},  # its image tokenizer's convolutions, 256 channels wide
    # EfficientNet-B0's widths and depths (the default is B7's), with its top convolution's width, which
    # SHRINK's hidden_dim cut
    "efficientnet": dict(width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280),
})
FAMILY_SIZES["qwen4_exp_text"] = FAMILY_SIZES["qwen4_exp"]
FAMILY_SIZES["hunyuan_vl"] = FAMILY_SIZES["hunyuan_vl_text"]

# xLSTM's config rounds the mLSTM's query/key and value widths (hidden x 0.5, hidden x 1) up to multiples
# of 64 while its layers do not: hidden 128 makes both agree.
FAMILY_SIZES["xlstm"] = dict(hidden_size=128, embedding_dim=128, num_blocks=2)


def _attention_kind(kind) -> bool:
    return isinstance(kind, str) and ("attention" in kind or kind == "hybrid") and "linear" not in kind


def one_of_each_kind(kinds: List[str]) -> List[str]:
    """The first layer of each kind in ``kinds``, in their order: ``["linear_attention",
    "linear_attention", "full_attention", "mlp"]`` gives ``["linear_attention", "full_attention", "mlp"]``.

    >>> one_of_each_kind(["linear_attention", "linear_attention", "full_attention", "linear_attention"])
    ['linear_attention', 'full_attention']
    """
    kept: List[str] = []
    for kind in kinds:
        if kind not in kept:
            kept.append(kind)
    return kept


def _keep_each_kind(shrunk, original) -> None:
    """Where ``original`` (the full-size config) declares per-layer kinds and the shrunk cut lost an
    attention kind, the shrunk config gets one layer of each kind and that many layers."""
    for name in _LAYER_KIND_FIELDS:
        if name not in vars(original):
            continue
        full = list(getattr(original, name) or [])
        cut = list(getattr(shrunk, name) or [])
        if not any(_attention_kind(k) for k in full) or any(_attention_kind(k) for k in cut):
            continue
        kinds = one_of_each_kind(full)
        setattr(shrunk, name, kinds)
        if "num_hidden_layers" in vars(shrunk) and name != "block_types":
            shrunk.num_hidden_layers = len(kinds)
        if name == "layers_block_type" and "hybrid_layer_ids" in vars(shrunk):  # Zamba2
            shrunk.hybrid_layer_ids = [i for i, k in enumerate(kinds) if k == "hybrid"]


# ---------------------------------------------------------------------------------------------------------
# Multi-head latent attention (DeepSeek-V2 and its descendants): queries and keys are a part without
# rotary embedding and a rotary part, made from low-rank projections; values have their own head size.
# The harness's SHRINK leaves these at full size (hidden 32 against a 512-rank projection), so they are
# shrunk together here, and the fields that repeat them (qk_head_dim, head_dim) follow.
MLA_SIZES = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
# Sizes of the sparse-attention indexer (DeepSeek-V3.2's DSA) and of the linear-attention layers beside MLA:
# the indexer keeps 4 keys of the 7-token batch, so that it selects as it does on a long input.
SIDE_SIZES = dict(index_head_dim=8, index_n_heads=2, index_topk=4, linear_head_dim=8, linear_num_heads=4)


def _shrink_latent_attention(shrunk, full) -> None:
    if "kv_lora_rank" not in vars(shrunk):
        return
    sizes = dict(MLA_SIZES)
    full = dict(vars(full))  # as declared (some configs refuse per-layer fields read globally)
    if full.get("q_lora_rank") is None:
        sizes["q_lora_rank"] = None  # queries projected at full rank, as at scale
    if not full.get("qk_rope_head_dim"):
        sizes["qk_rope_head_dim"] = 0  # no rotary part (GLM-5 Next)
    elif full.get("qk_nope_head_dim") == full["qk_rope_head_dim"]:
        sizes["qk_nope_head_dim"] = sizes["qk_rope_head_dim"]  # Mistral 4: halves, rotary over a factor of 0.5
    sizes["qk_head_dim"] = sizes["qk_rope_head_dim"] + sizes["qk_nope_head_dim"]
    for key, value in sizes.items():
        if key in vars(shrunk) or key != "qk_head_dim":
            setattr(shrunk, key, value)
    head_dim = full.get("head_dim")
    if "head_dim" in vars(shrunk) and head_dim is not None:  # the field the family repeats in head_dim
        for key in ("qk_rope_head_dim", "qk_head_dim", "v_head_dim"):
            if head_dim == full.get(key):
                shrunk.head_dim = sizes[key]
                break
    if full.get("num_key_value_heads") == full.get("num_attention_heads"):
        shrunk.num_key_value_heads = vars(shrunk)["num_attention_heads"]  # keys and values per head, as at scale
    for key, value in SIDE_SIZES.items():
        if key in vars(shrunk):
            setattr(shrunk, key, value)
    for key in ("n_group", "topk_group"):  # expert groups: one group of the 4 shrunk experts
        if key in vars(shrunk):
            setattr(shrunk, key, 1)


def _path(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _configs(config):
    """``config`` and every config nested in it, outermost first."""
    yield config
    for value in list(vars(config).values()):
        if isinstance(value, transformers.PretrainedConfig):
            yield from _configs(value)


def adjust_config(model_type: str, config, original=None):
    """``config`` (shrunk by the harness) with what ``model_type`` needs to run as at scale; ``original``
    is the full-size config it was shrunk from (default: made again from ``model_type``)."""
    if original is None:
        original = transformers.AutoConfig.for_model(model_type)
    for shrunk, full in zip(_configs(config), _configs(original)):
        if "head_dim" in vars(shrunk) and vars(shrunk)["head_dim"] is None and "num_attention_heads" in vars(shrunk):
            shrunk.head_dim = shrunk.hidden_size // shrunk.num_attention_heads  # read as is by some families
        _keep_each_kind(shrunk, full)
        _shrink_latent_attention(shrunk, full)
    configs = list(_configs(config))
    for key, value in FAMILY_SIZES.get(model_type, {}).items():  # on the (nested) configs that declare it
        if "." in key:  # a field of a nested config, by its path
            owner, _, key = key.rpartition(".")
            setattr(_path(config, owner), key, value)
            continue
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for target in [c for c in configs if key in vars(c)] or list({id(c): c for c in (config, text)}.values()):
            setattr(target, key, value)
    return config


# ---------------------------------------------------------------------------------------------------------
# Refusals: the linear-attention layers of the hybrid stacks above (layer 0 after :func:`one_of_each_kind`,
# whose full-size patterns start with a linear layer), which the library finds by their class names and
# which compute no softmax: a recurrent state updated by a delta rule, no (batch, heads, query, key) map.
_DELTA_RULE = "gated delta-rule linear attention: a recurrent state, no softmax over keys"
EXPECTED_REFUSALS = {
    "kimi_linear": (r"layers\.0\.self_attn$", "Kimi delta attention (KDA), " + _DELTA_RULE),
    "bailing_hybrid": (r"layers\.0\.self_attn$", _DELTA_RULE),
    "glm5_next": (r"layers\.0\.self_attn$", _DELTA_RULE),
    "glm5_next_text": (r"layers\.0\.self_attn$", _DELTA_RULE),
    "olmo_hybrid": (r"layers\.0$", "the linear-attention decoder layer (found by its class name): " + _DELTA_RULE),
}
NO_ATTENTION_MAP = set(EXPECTED_REFUSALS)
# RWKV's WKV normalises time-decayed exp(k) weights over the past keys, channel by channel, as a recurrence: a
# map per channel exists but none per head, and none is assembled (counted against the exact share).
# Maps that exist but that the library does not assemble (counted against the exact share).
EXPECTED_REFUSALS.update({
    "lilt": (r"encoder\.layer\.\d+\.attention\.self$", "LiLT's two streams (text and layout), each with its own "
                                                       "softmax over all keys in one call: two maps, not one"),
    "swiftformer": (r"attn$", "SwiftFormer's efficient additive attention: a softmax over the tokens that pools one "
                              "global query, no map over keys per query"),
    "reformer": (r"attention\.self_attention$", "Reformer's chunked local and LSH-bucketed attention, normalised by "
                                              "exp(scores - logsumexp) per chunk (no softmax call): not assembled"),
})
NO_ATTENTION_MAP.add("swiftformer")
EXPECTED_REFUSALS["rwkv"] = (r"blocks\.\d+\.attention$", "RWKV's WKV recurrence: per-channel decayed weights over "
                                                        "past keys, never assembled, no heads")

# Types whose attention the harness cannot run on this machine, with why (kept unbuildable).
NOT_RUNNABLE = {
    "mra": "MRA attention is a custom CUDA kernel (mra_cuda_kernel), not loaded on CPU: transformers returns zeros "
           "in place of the attention output",
}


# ---------------------------------------------------------------------------------------------------------
# Inputs beside the tokens.


def extra_inputs(model, config, inputs: dict) -> dict:
    """``inputs`` with what ``model``'s forward requires beside them: X-MOD's language of each row (its
    adapters), the first and second of the config's languages."""
    if getattr(config, "model_type", None) == "xmod" and "input_ids" in inputs:
        inputs["lang_ids"] = torch.tensor([0, 1 % len(config.languages)])
    params = inspect.signature(model.forward).parameters
    if "bbox" in params and "input_ids" in inputs and inputs.get("bbox") is None:
        inputs["bbox"] = word_boxes(*inputs["input_ids"].shape, normalised=config.model_type in NORMALISED_BOXES)
    return inputs


NORMALISED_BOXES = {"udop", "bros"}  # boxes as fractions of the page; the others read 0-1000 integers


def word_boxes(batch: int, tokens: int, normalised: bool = False) -> torch.Tensor:
    """``(batch, tokens, 4)`` boxes ``(x0, y0, x1, y1)`` of words laid out left to right on lines of four
    words (row ``b`` a line lower than row ``b - 1``), in 0-1000 page units, or as fractions of the page.

    >>> word_boxes(1, 5)[0].tolist()
    [[50, 100, 250, 140], [250, 100, 450, 140], [450, 100, 650, 140], [650, 100, 850, 140], [50, 150, 250, 190]]
    """
    boxes = torch.zeros(batch, tokens, 4, dtype=torch.long)
    for b in range(batch):
        for t in range(tokens):
            line, slot = divmod(t, 4)
            x0, y0 = 50 + 200 * slot, 100 + 50 * line + 20 * b
            boxes[b, t] = torch.tensor([x0, y0, x0 + 200, y0 + 40])
    return boxes / 1000.0 if normalised else boxes


# ---------------------------------------------------------------------------------------------------------
# Oracles: where transformers' output is laid out otherwise than the attention that multiplied the values.

ORACLE_NOTES = {
    "squeezebert": "transformers returns each layer's masked scores before the softmax ('attention_score') as its "
                   "attentions: compared with their softmax over the keys",
}


def adapt_references(case, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """transformers' attentions of ``case`` made into the maps the library stores, where :data:`ORACLE_NOTES`
    says how; others as they are."""
    if case.model_type == "squeezebert":
        return [r.softmax(-1) for r in references]
    return references


# ---------------------------------------------------------------------------------------------------------
# Attention-free models.

_ATTENTION_OPS = ("softmax", "scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")


class _CountAttentionOps(TorchDispatchMode):
    """Counts the aten calls of a forward whose name says softmax or fused attention."""

    def __init__(self):
        super().__init__()
        self.seen: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if any(op in name for op in _ATTENTION_OPS):
            self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_attention_ops(model, inputs: dict) -> Dict[str, int]:
    """``{aten op: calls}`` of the softmax and fused-attention ops one forward of ``model`` on ``inputs``
    dispatches (empty for a model that computes no softmax at all).

    >>> count_attention_ops(torch.nn.Linear(3, 2), dict(input=torch.ones(1, 3)))
    {}
    >>> count_attention_ops(torch.nn.Softmax(-1), dict(input=torch.ones(1, 3)))
    {'aten::_softmax': 1}
    """
    counter = _CountAttentionOps()
    with torch.no_grad(), counter:
        torch.manual_seed(2)
        model(**inputs)
    return counter.seen


def attention_free_case(case):
    """``case``, a model transformers returns no attentions for, made judgeable, or
    :class:`zoo_harness.Unbuildable` with why:

    - no softmax or fused attention dispatched in its forward: marked attention-free;
    - each softmax is a transformers attention layer's with query and key projections: compared with that
      layer's own maps (:func:`own_path_references`);
    - the family's softmax is not over keys (listed in :data:`EXPECTED_REFUSALS`): judged with no reference,
      its layers required refused with the recorded reason;
    - otherwise unbuildable: attention is computed and no oracle reaches it."""
    from zoo_harness import Unbuildable

    if case.model_type in NOT_RUNNABLE:
        raise Unbuildable("reference", NOT_RUNNABLE[case.model_type])
    seen = count_attention_ops(case.models["eager"], case.inputs)
    if not seen:
        case.attention_free = True
        return case
    if case.model_type in EXPECTED_REFUSALS:
        return case
    references = own_path_references(case.models["eager"], case.inputs)
    softmaxes = sum(n for op, n in seen.items() if "softmax" in op)
    if references and len(references) == softmaxes == sum(seen.values()):
        if all(float((r.amax(-1) - r.amin(-1)).max()) < 1e-3 for r in references):
            raise Unbuildable("reference", "every attention map is uniform on these random weights: nothing to check")
        case.references = references
        return case
    calls = ", ".join(f"{n} x{c}" for n, c in sorted(seen.items()))
    raise Unbuildable("reference", f"transformers returns no attention tensors, yet its forward computes {calls}: "
                                   "no oracle for them")


def own_path_references(model, inputs: dict) -> List[torch.Tensor]:
    """The attention maps of every call of ``model``'s transformers attention layers that project queries and
    keys by ``query`` and ``key`` (MobileViT, PVTv2), in call order: the layer's own output when its forward
    takes ``output_attentions`` (called again on the arguments it got), otherwise ``softmax(q kᵀ / sqrt(d))``
    from its own ``query`` and ``key`` and ``attention_head_size``, checked first to give the layer's output
    as ``map @ value(x)``. ``(batch, heads, query, key)``, with the batch the layer was called with."""
    from zoo_harness import _forward

    modules = [m for m in model.modules() if type(m).__module__.startswith("transformers.")
               and "Attention" in type(m).__name__ and (isinstance(getattr(m, "query", None), torch.nn.Linear)
                                                        and isinstance(getattr(m, "key", None), torch.nn.Linear)
                                                        or _separable(m))]
    calls = []
    handles = [m.register_forward_pre_hook(lambda m, args, kwargs: calls.append((m, args, kwargs)), with_kwargs=True)
               for m in modules]
    try:
        _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for module, args, kwargs in calls:
        with torch.no_grad():
            if _separable(module):
                maps.append(_separable_map(module, *args, **kwargs))
                continue
            if "output_attentions" in inspect.signature(module.forward).parameters:
                maps.append(module(*args, **dict(kwargs, output_attentions=True))[1])
                continue
            x = args[0] if args else kwargs["hidden_states"]
            d = module.attention_head_size
            q, k, v = (p(x).view(*x.shape[:-1], -1, d).transpose(-2, -3) for p in (module.query, module.key,
                                                                                    module.value))
            weights = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)
            out = module(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if not torch.allclose((weights @ v).transpose(-2, -3).reshape(out.shape), out, atol=1e-5):
                raise AssertionError(f"the harness's map of {type(module).__name__} does not give its output")
            maps.append(weights)
    return maps


def _separable(module) -> bool:
    """MobileViTV2's separable self-attention: one 1 x 1 convolution makes a context query (1 channel), keys
    and values (``embed_dim`` channels each)."""
    return isinstance(getattr(module, "qkv_proj", None), torch.nn.Module) and isinstance(
        getattr(module, "embed_dim", None), int) and "LinearSelfAttention" in type(module).__name__


def _separable_map(module, hidden_states) -> torch.Tensor:
    """The context scores of a separable self-attention call on ``(batch, channels, P, N)``: the softmax of
    the 1-channel query over the ``N`` patches, ``(batch, 1, P, N)`` (one pooling query per position in a
    patch), checked to give the layer's output as ``out_proj(relu(value) * sum_n(key * scores))``."""
    qkv = module.qkv_proj(hidden_states)
    query, key, value = qkv[:, :1], qkv[:, 1:1 + module.embed_dim], qkv[:, 1 + module.embed_dim:]
    scores = query.softmax(-1)
    made = module.out_proj(value.relu() * (key * scores).sum(-1, keepdim=True))
    if not torch.allclose(made, module(hidden_states), atol=1e-5):
        raise AssertionError("the harness's separable-attention scores do not give the layer's output")
    return scores


def judge_attention_free(case, implementation: str):
    """The verdict on an attention-free ``case`` (:func:`attention_free_case`): ``"no attention"`` when the
    library finds no attention layer to hook (it refuses with its error) and the model's output is the same
    as without it; where the library hooks layers by their names (a linear recurrence called attention),
    the harness's own judgement, which requires them refused with the family's recorded reason."""
    from attention_hooker import TransformerAttentionHooker
    from attention_hooker.errors import AttentionHookerError
    from zoo_harness import Verdict, _forward, _judge_one

    model = case.models[implementation]
    try:
        TransformerAttentionHooker(model).setup().remove_hooks()
    except AttentionHookerError as err:
        if "found no attention module" not in str(err):
            return Verdict(case.model_type, implementation, "failed", f"unexpected refusal: {err}"[:300])
        after = count_attention_ops(model, case.inputs)
        if after:
            return Verdict(case.model_type, implementation, "failed", f"softmax calls appeared: {after}")
        return Verdict(case.model_type, implementation, NO_ATTENTION,
                       "the library finds no attention layer and the forward computes no softmax")
    return _judge_one(case, implementation)
