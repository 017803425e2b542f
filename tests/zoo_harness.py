"""The architecture zoo's harness (issue 9): build any Hugging Face model type from a
shrunk config, run it on a padded batch of 2, capture it on every attention
implementation transformers offers, and judge the capture against the eager model's
own ``output_attentions``.

Each case ends as one verdict:

- ``exact``: every hooked layer captured, every call equals one of transformers'
  attentions (1e-5), the model's outputs are unchanged;
- ``refused``: the layers that were not captured were refused, and the family is
  listed in :data:`EXPECTED_REFUSALS` with why (windowed, blocked, partial or
  linear attention that has no single ``(batch, heads, query, key)`` map);
- ``no attention`` (tests/zoo_text.py): transformers returns no attentions, the library finds no
  attention layer and the forward computes no softmax (a state-space, convolutional or Fourier model);
- ``failed``: anything else (a call equal to none of transformers' attentions, a
  layer missing without a reason, changed outputs, an error);
- ``unbuildable``: the generic harness cannot build or run the type offline (the
  stage and the error are kept as the reason).

Where transformers' own output is partial or laid out differently, the family's
oracle is adapted below, with the reason (:data:`ORACLE_NOTES`).
"""

from __future__ import annotations

import copy
import inspect
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

import zoo_media
import zoo_text
import zoo_vision

transformers = __import__("transformers")

SHRINK = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=128,
              num_key_value_heads=2, n_layer=2, n_head=4, n_embd=32, d_model=32, num_layers=2, num_heads=4,
              d_kv=8, d_ff=64, num_decoder_layers=2, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, ffn_dim=64,
              max_position_embeddings=64, n_positions=64, num_local_experts=2, num_experts_per_tok=1,
              image_size=32, patch_size=8, rotary_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              decoder_start_token_id=1, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
              dim=32, hidden_dim=64, n_layers=2, n_heads=4,  # DistilBERT's names
              # mixtures of experts, and other names for the sizes above (XLM, LUKE, Perceiver, vision towers)
              num_experts=4, n_routed_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
              emb_dim=32, entity_vocab_size=16, entity_emb_size=16, d_latents=32, num_latents=8,
              num_self_attends_per_block=1, depth=2, embed_dim=32)

# Families whose attention needs other sizes than SHRINK's to run as it does at scale: BigBird's
# block-sparse layers fall back to full attention unless the input is longer than (5 + 2 r) blocks,
# so they get blocks of 2 tokens, one random block and 17 tokens (padded by the model to 18).
FAMILY_SIZES: Dict[str, dict] = {family: dict(block_size=2, num_random_blocks=1)
                                 for family in ("big_bird", "bigbird_pegasus")}
# JetMoE's mixture of attention heads: two of four query experts per token, so the call's heads are
# two slots (each token's first and second chosen expert) of the key/value heads, as at scale.
FAMILY_SIZES["jetmoe"] = dict(num_local_experts=4, num_experts_per_tok=2)


# Hiera's shrunk 8 x 8 tokens would be one mask unit of the default 8 x 8: units of 4 x 4 make four, so that
# the units' strided tokens are placed (and pooled layers have several units).
FAMILY_SIZES["hiera"] = dict(masked_unit_size=[4, 4])
TOKENS = {"big_bird": 17, "bigbird_pegasus": 17}  # text inputs' length where 7 is too short

REFERENCE_FIELDS = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
MAX_PARAMETERS = 150_000_000  # after shrinking; larger ones take too long to build in CI
SECONDS_PER_CASE = 90  # a guard against a hanging build or judge, not a speed test: MaskFormer's Swin oracle
# (every window call recomputed from its weights) takes 30-50 s on two busy cores

# Families whose attention has no single (batch, heads, query, key) map that multiplied the
# values, or none at all: the layers named by the regex must be refused (or, for attention no
# route can see, report "nothing captured"), with a reason. Any other missing layer fails.
EXPECTED_REFUSALS: Dict[str, Tuple[str, str]] = {
    "minimax": (r"layers\.1\.self_attn", "lightning (linear) attention layers compute no weights"),
    "yoso": (r"attention\.self", "LSH-sampled (YOSO) attention computes no softmax"),
    **{family: (r"(attention|mlp|final|message)_input$",
                "attention residuals: each token's softmax over earlier blocks' outputs, not over keys")
       for family in ("inkling2", "inkling2_text", "inkling2_loop", "inkling2_loop_text")},
    "deformable_detr": (r"(self_attn|encoder_attn)\.attn$", "multi-scale deformable attention: a softmax over "
                                                              "sampled points, not keys"),
    "mask2former": (r"pixel_level_module\.decoder\.encoder\.layers\.\d+\.self_attn$",
                    "multi-scale deformable attention: a softmax over sampled points, not keys"),
    "groupvit": (r"downsample\.assign", "the grouping assignment (a softmax over the groups, made hard), not attention "
                                       "over keys"),
}

EXPECTED_REFUSALS.update(zoo_media.EXPECTED_REFUSALS)  # audio, video, time series (tests/zoo_media.py)

# Of those, the families whose refused layers compute no (batch, heads, query, key) map over keys at
# all (linear or hashed attention, weights over sampled points, a softmax over blocks or groups):
# nothing exact can exist there. The others have a map that is not assembled (a band, blocks, two
# streams): those refusals count against the exact share.
NO_ATTENTION_MAP = {"minimax", "yoso", "deformable_detr", "mask2former", "groupvit", "inkling2", "inkling2_text",
                    "inkling2_loop", "inkling2_loop_text"}
EXPECTED_REFUSALS.update(zoo_text.EXPECTED_REFUSALS)  # hybrid stacks' linear-attention layers
NO_ATTENTION_MAP |= zoo_text.NO_ATTENTION_MAP
EXPECTED_REFUSALS.update(zoo_vision.EXPECTED_REFUSALS)
NO_ATTENTION_MAP |= zoo_vision.NO_ATTENTION_MAP

# Layers no oracle reaches (transformers returns neither their attentions nor a sub-model's):
# checked as probabilities over the keys, with the heads the module declares.
UNVERIFIED: Dict[str, Tuple[str, str]] = {
    "groupvit": (r"vision_model\.encoder\.stages\.\d+\.(layers|downsample\.pre_assign_attn)",
                 "transformers returns only the grouping attentions of GroupViT's vision tower"),
}

# Families whose Swin backbone's window attention transformers does not return (MaskFormer returns
# the backbone's hidden states in its place): recomputed from each layer's own weights instead.
SWIN_RECOMPUTED = {"maskformer", "mask2former"}

# Where transformers' output is partial or differently laid out, what the harness does instead.
ORACLE_NOTES = {
    "cpmant": "transformers drops the 32 prompt positions from its attentions: compared on the rest",
    "sam_vision_model, sam_hq_vision_model, vitdet": "transformers returns (batch * heads, query, key) (ViTDet: "
                                                     "(batch, heads, ...)), per window in windowed blocks: global "
                                                     "blocks compared after reshaping, windowed ones after placing "
                                                     "each window at its tokens by the block's own padding and "
                                                     "partition of a grid of token indices",
    "t5gemma2": "the decoder attends to [decoder; encoder] in one softmax: compared with transformers' "
                "self and cross attentions concatenated along the keys",
    "*": "nn.MultiheadAttention layers transformers does not report (attention-pooling heads) are the module's "
         "own need_weights output: checked as probabilities of the declared heads",
    "*, sub-models": "a layer whose attentions the whole model does not return (GIT's image encoder, FLAVA's "
                     "multimodal encoder, GroupViT's towers) is compared with the enclosing sub-model's own "
                     "output_attentions, called again with the arguments it got, in the eager model (the same "
                     "weights: an sdpa sub-model returns no attentions)",
    **zoo_text.ORACLE_NOTES,
    "vit_mae": "random masking: the same seed before every forward",
    "maskformer, mask2former": "transformers returns the decoder's attentions only (MaskFormer's Swin backbone returns "
                               "its hidden states as 'attentions'): each window-attention call of the backbone is "
                               "compared with softmax(q kᵀ/sqrt(d) + relative position bias + window mask) from its "
                               "own weights",
    "prophetnet": "transformers returns the masked scores before the softmax (encoder and cross attention): "
                  "compared with their softmax; the decoder's n-gram streams (decoder_ngram_attentions, (batch, "
                  "ngram, heads, T, 2T)) are compared stream by stream with the '<layer>:ngram<s>' entries, and "
                  "the cross attention ((batch, heads, (1 + ngram) T, source)) is cut into its main rows (the "
                  "layer's map) and each stream's rows (its '<layer>:ngram<s>' entry)",
    "nystromformer": "the library stores the map that multiplies the values, the softmax plus the depthwise value "
                     "convolution as a banded matrix: compared with transformers' attentions (the plain softmax path "
                     "of the shrunk config, as many landmarks as segment_means_seq_len) plus that band, built by the "
                     "harness's own loops over query, key and tap from each layer's conv.weight",
    "longformer, led": "transformers returns each layer's band (batch, heads, query, globals + 2w + 1) and its global "
                       "rows (batch, heads, tokens, globals): placed at their key positions by the harness's own "
                       "loops over queries and band columns, global rows put in whole",
    "diffllama": "transformers returns P, the first of the two identical softmaxes of each layer (batch, heads, "
                 "query, key); the library stores the map that multiplies the values, D = P[:, :H/2] - λ P[:, H/2:] "
                 "(not probabilities): compared with D made here from transformers' P and λ read from each layer's "
                 "lambda_q1/k1/q2/k2 and lambda_init",
    "big_bird, bigbird_pegasus": "block-sparse attention (block_size 2, one random block, 17 tokens): "
                                 "transformers' attentions overwrite a key block attended twice (every random "
                                 "block in eval is block 0, also a global block), so each layer is compared with "
                                 "softmax(q kᵀ/sqrt(d)) from its own weights over the keys it attended, counted as "
                                 "often as attended (the random blocks recorded from the call's torch_gather_b2), "
                                 "cropped to the input; that map times value(x) is checked equal to the layer's "
                                 "output",
    "longt5": "transformers returns each encoder layer's raw blocked softmax (batch, blocks, heads, block_len, "
              "3 * block_len [+ G global aggregates]): placed at (batch, heads, tokens, tokens [+ G]) by the harness's "
              "own loops over blocks, query slots and key slots (slot kk of block i is key (i - 1) * block_len + kk)",
    "pegasus_x": "transformers returns each encoder layer's two softmaxes as a dict {global: (batch, heads, G, G + "
                 "padded tokens), local: (batch, heads, blocks, block, G + block)}, which the generic harness did not "
                 "read: placed at (batch, heads, G + tokens, G + tokens), global tokens first, by the harness's own "
                 "loops over the input's tokens (a staggered layer's tokens shifted by half a block)",
    "hiera": "transformers returns per-unit attentions (batch, heads, units, query, key), and only each stage's last "
             "layer's: every mask-unit attention call is run again with output_attentions=True on the input it got, "
             "and its per-unit weights placed at (batch, heads, query, key) in the layer's token order by the harness's "
             "own loops over units and query slots (unit w holds tokens w, w + units, ...; pooled query j of unit w "
             "is output token j * units + w); the model's own 5-D attentions are left out (they are among those)",
    "aimv2, aimv2_vision_model": "the attention-pooling head (a CLS query over the patches through sdpa), which transformers "
                          "does not report: compared with softmax(cls_token . k_proj(x)ᵀ / sqrt(d)) from its own weights",
    **zoo_media.ORACLE_NOTES,
}

ORACLE_NOTES.update(zoo_vision.ORACLE_NOTES)


class Unbuildable(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


@dataclass
class Verdict:
    model_type: str
    implementation: str
    outcome: str  # exact / refused / failed
    detail: str = ""


@dataclass
class Case:
    model_type: str
    config: object
    models: Dict[str, torch.nn.Module]
    inputs: dict
    mask: Optional[torch.Tensor]
    references: List[torch.Tensor] = field(default_factory=list)
    attention_free: bool = False  # no attentions from transformers and no softmax in the forward


def shrink(config):
    """``config`` with every size the harness knows made small, in nested configs too."""
    for sub in list(vars(config).values()):
        if isinstance(sub, transformers.PretrainedConfig):
            shrink(sub)
    if getattr(config, "model_type", None) == "timm_backbone" and getattr(config, "backbone", None):
        config.backbone = "resnet10t"  # the detection families' ResNet-50 backbone, smallest of its kind
    for key, value in SHRINK.items():
        declared = key in vars(config) or (hasattr(type(config), key)
                                           and not isinstance(getattr(type(config), key), property))
        if declared:
            try:
                current = getattr(config, key, None)
            except Exception:  # noqa: BLE001 - a per-layer attribute this config will not read globally
                continue
            if isinstance(current, (list, tuple)):  # per stage (Swin's num_heads): each stage made small
                value = type(current)([value] * len(current))
            try:
                setattr(config, key, value)
            except Exception:  # noqa: BLE001 - a size this config validates otherwise stays as it is
                pass
    try:
        if getattr(config, "head_dim", None) is not None and "head_dim" in vars(config):
            config.head_dim = 8
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:2]
    except Exception:  # per-layer attributes some configs refuse to set globally
        pass
    return config


def inputs_for(model, config):
    """``(inputs, mask)``: a batch of 2, the second one padded by two tokens at the end (and, for a model
    that takes ``global_attention_mask``, global tokens {0} and {0, 3})."""
    special = zoo_vision.inputs_for(model, config)  # packed vision towers
    if special is not None:
        return special
    torch.manual_seed(1)
    name = model.main_input_name
    params = inspect.signature(model.forward).parameters
    media = zoo_media.inputs_for(model, config)  # audio, video, time series (tests/zoo_media.py)
    if media is not None:
        return media
    if name == "pixel_values" or (name == "input_ids" and "pixel_values" in params):
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        pixels = dict(pixel_values=torch.randn(2, getattr(vision, "num_channels", 3), size, size))
        if name == "pixel_values":
            return pixels, None
        text, mask = _text_inputs(config)
        return dict(text, **pixels), mask
    if name == "input_features" and getattr(config, "num_mel_bins", None):
        inputs = dict(input_features=torch.randn(2, config.num_mel_bins, 32))
        if config.is_encoder_decoder:
            inputs["decoder_input_ids"] = torch.randint(3, 100, (2, 5))
        return inputs, None
    if name != "input_ids":
        raise Unbuildable("inputs", f"main input {name!r} has no generic form in the harness")
    inputs, mask = _text_inputs(config)
    if "global_attention_mask" in params:  # Longformer, LED: global tokens, in different places per row
        inputs["global_attention_mask"] = torch.zeros_like(mask)
        inputs["global_attention_mask"][0, 0] = 1
        inputs["global_attention_mask"][1, [0, 3]] = 1
    return inputs, mask


def _text_inputs(config):
    length = TOKENS.get(getattr(config, "model_type", None), 7)
    ids = torch.randint(3, 100, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -2:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, 100, (2, 5))
    return inputs, mask


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _with_time_limit(seconds, fn, *args):
    if not hasattr(signal, "SIGALRM"):
        return fn(*args)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def build(model_type: str) -> Case:
    """The case for ``model_type``, or :class:`Unbuildable` with the stage and the reason."""
    try:
        return _with_time_limit(SECONDS_PER_CASE, _build, model_type)
    except _Timeout:
        raise Unbuildable("build", f"over {SECONDS_PER_CASE} s") from None


def _forward(model, inputs, **kwargs):
    torch.manual_seed(2)  # models that draw noise in their forward (ViT-MAE masking) draw the same
    with torch.no_grad():
        return model(**inputs, **kwargs)


def _build(model_type: str) -> Case:
    stage = "config"
    try:
        config = shrink(transformers.AutoConfig.for_model(model_type))
        for key, value in FAMILY_SIZES.get(model_type, {}).items():
            setattr(config, key, value)
        config = zoo_media.adapt(config)
        config = zoo_text.adjust_config(model_type, config)  # hybrid stacks, latent attention, other names
        zoo_vision.adapt(model_type, config)
        stage = "build"
        with torch.device("meta"):
            probe = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager")
        n = sum(p.numel() for p in probe.parameters())
        if n > MAX_PARAMETERS:
            raise Unbuildable("size", f"{n / 1e6:.0f}M parameters after shrinking")
        torch.manual_seed(0)
        eager = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
        stage = "inputs"
        inputs, mask = inputs_for(eager, config)
        inputs = zoo_text.extra_inputs(eager, config, inputs)
        stage = "reference"
        try:
            output = _forward(eager, inputs, output_attentions=True)
        except Exception:  # noqa: BLE001
            if "pixel_values" not in inputs or "input_ids" not in inputs:
                raise
            inputs.pop("pixel_values")  # a text-and-image model whose text side runs alone
            output = _forward(eager, inputs, output_attentions=True)
    except Unbuildable:
        raise
    except Exception as err:  # noqa: BLE001 - every failure to build is a recorded reason
        raise Unbuildable(stage, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}") from None
    references = zoo_vision.references(eager, inputs, _attentions_in(output), _forward)
    if not references:  # an attention-free model, checked to compute no softmax (or unbuildable)
        return zoo_text.attention_free_case(Case(model_type, config, {"eager": eager}, inputs, mask))
    if all(r.isnan().all() for r in references):  # nothing to compare with (a mask the model itself misreads)
        raise Unbuildable("reference", "transformers' own attentions are NaN everywhere on this input")
    models = {"eager": eager}
    try:
        sdpa = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    except Exception:  # noqa: BLE001 - transformers offers no sdpa for this family
        sdpa = None
    if sdpa is not None:
        sdpa.load_state_dict(eager.state_dict())
        models["sdpa"] = sdpa
    return Case(model_type, config, models, inputs, mask, references)


def _attentions_in(output) -> List[torch.Tensor]:
    """transformers' attention tensors in ``output``, with those of nested outputs (CLIP's
    ``text_model_output`` and ``vision_model_output``)."""
    found = [a for f in REFERENCE_FIELDS for a in (getattr(output, f, None) or ()) if isinstance(a, torch.Tensor)]
    if isinstance(output, transformers.utils.ModelOutput):
        for value in output.values():
            if isinstance(value, transformers.utils.ModelOutput):
                found += _attentions_in(value)
    return found


def judge(case: Case) -> List[Verdict]:
    """One verdict per implementation of ``case``."""
    judge_one = zoo_text.judge_attention_free if case.attention_free else _judge_one
    return [_with_time_limit(SECONDS_PER_CASE, judge_one, case, impl) for impl in case.models]


def _references(case: Case, got_batch: int) -> List[torch.Tensor]:
    refs = []
    for ref in case.references:
        if case.model_type == "prophetnet" and not torch.allclose(ref.sum(-1), torch.ones(()), atol=1e-3):
            ref = ref.softmax(-1)  # its ProphetNetAttention returns the masked scores
        if ref.dim() == 3 and ref.shape[0] % got_batch == 0:  # (batch * heads, query, key)
            ref = ref.view(got_batch, ref.shape[0] // got_batch, *ref.shape[1:])
        refs.append(ref)
    return refs


def _matches(model_type, got, ref, rows) -> bool:
    if model_type == "cpmant" and got.shape[2] > ref.shape[2]:
        skip = got.shape[2] - ref.shape[2]  # the prompt positions transformers leaves out
        got = got[:, :, skip:, skip:]
        rows = rows[:, skip:] if rows.shape[1] == got.shape[2] + skip else rows
    if got.shape != ref.shape:
        return False
    keep = rows[:, None, :, None].expand_as(got)
    return torch.allclose(got[keep], ref[keep], atol=1e-5, rtol=1e-4)


def _judge_one(case: Case, implementation: str) -> Verdict:
    from attention_hooker import TransformerAttentionHooker

    model = case.models[implementation]
    verdict = lambda outcome, detail="": Verdict(case.model_type, implementation, outcome, detail)  # noqa: E731
    try:
        plain = _forward(model, case.inputs)
        with TransformerAttentionHooker(model) as hooker:
            hooked = _forward(model, case.inputs)
    except Exception as err:  # noqa: BLE001
        return verdict("failed", f"{type(err).__name__}: {err}"[:300])
    problems = []
    first = lambda out: out if isinstance(out, torch.Tensor) else out[0]  # noqa: E731
    if isinstance(first(plain), torch.Tensor) and not torch.allclose(first(plain), first(hooked), rtol=0, atol=0,
                                                                     equal_nan=True):  # ALIGN: NaN logits
        problems.append("the model's output changed")
    report = hooker.report()
    modules = dict(model.named_modules())
    references = zoo_text.adapt_references(case, _references(case, 2))
    if case.model_type == "t5gemma2":  # one softmax over [decoder; encoder] keys
        self_refs = [r for r in references if r.shape[-1] == r.shape[-2] == 5]
        cross = [r for r in references if r.shape[-2] == 5 and r.shape[-1] == 7]
        references = [r for r in references if r.shape[-2] != 5] + [torch.cat(p, -1) for p in zip(self_refs, cross)]
    references += [_aimv2_pooling_oracle(model, head, case.inputs)
                   for head in model.modules() if type(head).__name__ == "Aimv2AttentionPoolingHead"]
    if case.model_type in SWIN_RECOMPUTED:
        references += _swin_window_oracles(model, case.inputs)
    references = _placed_swin_windows(model, case.inputs, references)
    references = _placed_sam_windows(model, case.inputs, references)
    references = _placed_longformer_bands(model, case.inputs, references)
    references = _differential_references(model, references)
    references = _block_sparse_oracles(model, case.inputs, references)
    references = _nystromformer_with_conv(model, references)
    if case.model_type == "prophetnet":
        references = _split_cross_streams(model, case.inputs, references) + _ngram_streams(model, case.inputs)
    references = _placed_longt5_blocks(model, case.inputs, references)
    references += _placed_pegasus_x_pieces(model, case.inputs)
    references = _placed_hiera_units(model, case.inputs, references)
    references = zoo_media.oracle_references(model, case.inputs, references)
    unmatched, wrong = list(references), []
    for layer, calls in hooker.values.items():
        for got in calls:
            unverified = UNVERIFIED.get(case.model_type)
            if (isinstance(modules.get(layer), torch.nn.MultiheadAttention)
                    and not any(r.shape == got.shape for r in unmatched)) or (
                    unverified and re.search(unverified[0], layer)):
                heads = getattr(modules[layer], "num_heads", None) or modules[layer].config.num_attention_heads
                if got.shape[1] != heads or not torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5):
                    wrong.append(f"{layer} {tuple(got.shape)}")
                continue
            rows = torch.ones(got.shape[0], got.shape[2], dtype=torch.bool)
            if case.mask is not None and got.shape[2] == case.mask.shape[1]:
                rows = case.mask.bool()  # padded query rows carry no meaning
            match = [i for i, ref in enumerate(unmatched) if _matches(case.model_type, got, ref, rows)]
            if match:
                unmatched.pop(match[0])
            elif not any(_matches(case.model_type, got, ref, rows)
                         for ref in _submodel_references(case.models["eager"], case.inputs, layer)):
                wrong.append(f"{layer} {tuple(got.shape)}")
    if wrong:
        problems.append(f"calls equal to none of transformers' attentions: {', '.join(wrong[:4])}")
    missing = report.missing
    expected = EXPECTED_REFUSALS.get(case.model_type)
    if missing:
        unexpected = [n for n in missing if expected is None or not re.search(expected[0], n)]
        unexplained = [n for n in missing if report[n].status == "nothing captured" and expected is None]
        if unexpected or unexplained:
            problems.append("layers missing: " + "; ".join(
                f"{n}: {report[n].status} ({report[n].reason})" for n in (unexpected or unexplained)[:3]))
    elif expected is not None:
        problems.append(f"expected refusals ({expected[1]}) did not happen: update EXPECTED_REFUSALS")
    if unmatched and not missing and not wrong:
        problems.append(f"{len(unmatched)} of transformers' attentions were not captured")
    if problems:
        return verdict("failed", "; ".join(problems))
    return verdict("refused" if missing else "exact", expected[1] if missing else "")


def _submodel_references(model, inputs, layer: str) -> List[torch.Tensor]:
    """transformers' own attentions for a layer whose sub-model's attentions the whole
    model does not return (GIT's image encoder, FLAVA's multimodal encoder, GroupViT's
    towers): the nearest enclosing module that returns attentions when asked, called
    again with the arguments it got in the model's forward and ``output_attentions=True``."""
    parts = layer.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        seen = {}
        handle = owner.register_forward_pre_hook(
            lambda m, args, kwargs: seen.setdefault("call", (args, kwargs)), with_kwargs=True)
        try:
            _forward(model, inputs)
        finally:
            handle.remove()
        if "call" not in seen:
            continue
        args, kwargs = seen["call"]
        try:
            torch.manual_seed(2)
            with torch.no_grad():
                output = owner(*args, **dict(kwargs, output_attentions=True))
        except Exception:  # noqa: BLE001 - this module does not take output_attentions
            continue
        found = _attentions_in(output) if isinstance(output, transformers.utils.ModelOutput) else []
        if found:
            return found
    return []


def _placed_swin_windows(model, inputs, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """transformers' per-window Swin attentions ``(batch * windows, heads, N, N)`` placed at
    the image's tokens, as the library stores them (issue 24), by each block's own pad/roll
    of a grid of token indices (window and shift read when its attention runs: the block
    changes them inside its forward). Other references are returned as they are."""
    from window_oracle import PAD_THEN_ROLL, place_by_index_grid

    blocks = [m for m in model.modules() if type(m).__module__.startswith("transformers.")
              and hasattr(m, "shift_size") and callable(getattr(m, "get_attn_mask", None))]
    if not blocks:
        return references
    layouts, current, handles = [], {}, []
    for block in blocks:
        def pre(m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
            current[m] = (hidden.shape[0], tuple(int(d) for d in dims))
        attention = getattr(block, "attention", None)
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attention.register_forward_pre_hook(
            lambda m, args, block=block: layouts.append((*current[block], block.window_size, block.shift_size))))
    try:
        _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    placed, pending = [], list(layouts)
    for ref in references:
        fit = None
        for i, (batch, (h, w), ws, s) in enumerate(pending):
            windows = -(-h // ws) * -(-w // ws)
            if ref.dim() == 4 and ref.shape[0] == batch * windows and ref.shape[-1] == ws * ws == ref.shape[-2]:
                fit = i
                break
        if fit is None:
            placed.append(ref)
            continue
        batch, (h, w), ws, s = pending.pop(fit)
        placed.append(place_by_index_grid(ref, batch, h, w, (ws, ws), (s, s), PAD_THEN_ROLL))
    return placed


# SAM-style windowed blocks the library stores at the image's tokens (issue 24), and whether their
# input is channels-first (ViTDet's (batch, channels, height, width)).
SAM_WINDOWED_BLOCKS = {"SamVisionLayer": False, "SamHQVisionLayer": False, "VitDetLayer": True}


def _placed_sam_windows(model, inputs, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """transformers' per-window attentions of SAM / ViTDet windowed blocks (``window_size > 0``),
    ``(batch * windows * heads, N, N)`` or ``(batch * windows, heads, N, N)``, placed at the image's
    tokens as the library stores them (issue 24), by the block's own padding and window partition
    of a grid of token indices (no shift); global blocks' references are returned as they are."""
    from window_oracle import PAD_THEN_ROLL, place_by_index_grid

    blocks = [m for m in model.modules() if type(m).__module__.startswith("transformers.")
              and type(m).__name__ in SAM_WINDOWED_BLOCKS and m.window_size > 0]
    if not blocks:
        return references
    layouts, handles = [], []
    for block in blocks:
        def pre(m, args, kwargs):
            shape = (args[0] if args else kwargs["hidden_states"]).shape
            b, h, w = (shape[0], shape[2], shape[3]) if SAM_WINDOWED_BLOCKS[type(m).__name__] else shape[:3]
            attention = getattr(m, "attn", None) or m.attention
            heads = getattr(attention, "num_attention_heads", None) or attention.num_heads
            layouts.append((b, h, w, m.window_size, heads))
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    placed, pending = [], list(layouts)
    for ref in references:
        fit = next((i for i, (b, h, w, ws, heads) in enumerate(pending)
                    if ref.shape[-2:] == (ws * ws, ws * ws)
                    and ref.numel() == b * -(-h // ws) * -(-w // ws) * heads * ws ** 4), None)
        if fit is None:
            placed.append(ref)
            continue
        b, h, w, ws, heads = pending.pop(fit)
        per_window = ref.reshape(-1, heads, ws * ws, ws * ws)  # (batch * windows, heads, N, N), batch-major
        placed.append(place_by_index_grid(per_window, b, h, w, (ws, ws), (0, 0), PAD_THEN_ROLL))
    return placed


def _differential_references(model, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """transformers' DiffLlama attentions ``P (batch, heads, query, key)`` (one per layer, in model order)
    made into the map that multiplies the values, ``P[:, :H/2] - λ P[:, H/2:]``, with ``λ`` computed here
    from each layer's parameters (``exp(q1 . k1) - exp(q2 . k2) + lambda_init``, in float32). Other
    references are returned as they are."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "lambda_q1", None), torch.nn.Parameter)
              and hasattr(m, "lambda_init")]
    if not layers:
        return references
    if len(references) != len(layers):
        raise AssertionError(f"{len(references)} attentions from transformers for {len(layers)} differential layers")
    made = []
    for module, probs in zip(layers, references):
        with torch.no_grad():
            first = torch.exp((module.lambda_q1.float() * module.lambda_k1.float()).sum())
            second = torch.exp((module.lambda_q2.float() * module.lambda_k2.float()).sum())
            lam = float(first - second + module.lambda_init)
        half = probs.shape[1] // 2
        made.append(probs[:, :half] - lam * probs[:, half:])
    return made


def _placed_longformer_bands(model, inputs, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """transformers' Longformer / LED-encoder bands ``(batch, heads, tokens, globals + 2w + 1)``, with their
    global rows ``(batch, heads, padded tokens, globals)``, placed at their keys as ``(batch, heads, tokens,
    tokens)``, written for the harness (loops over queries, band columns and global tokens; not the
    library's placement). Each layer's window and masks are read from its call. Other references are
    returned as they are."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "one_sided_attn_window_size", None), int)
               and isinstance(getattr(m, "query_global", None), torch.nn.Module)]
    if not modules:
        return references
    calls, handles = [], []
    for module in modules:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append((m.one_sided_attn_window_size, kwargs["is_index_global_attn"],
                                                  kwargs["is_index_masked"])), with_kwargs=True))
    try:
        output = _forward(model, inputs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    bands = getattr(output, "attentions", None) or getattr(output, "encoder_attentions", None)
    global_rows = getattr(output, "global_attentions", None) or getattr(output, "encoder_global_attentions", None)
    placed = []
    for number, (band, (window, is_global, is_masked)) in enumerate(zip(bands, calls)):
        batch, heads, tokens, columns = band.shape
        extra = columns - (2 * window + 1)
        dense = torch.zeros(batch, heads, tokens, tokens)
        for b in range(batch):
            globals_ = [p for p in range(is_global.shape[1]) if is_global[b, p]]
            for i in range(tokens):
                if is_masked[b, i]:
                    continue
                if i in globals_:
                    dense[b, :, i] = global_rows[number][b, :, :tokens, globals_.index(i)]
                    continue
                for c in range(2 * window + 1):
                    if 0 <= i - window + c < tokens:
                        dense[b, :, i, i - window + c] += band[b, :, i, extra + c]
                for n, p in enumerate(globals_):
                    dense[b, :, i, p] += band[b, :, i, n]
        placed.append(dense)
    kept = [r for r in references if not any(r.shape == band.shape and torch.equal(r, band) for band in bands)]
    return kept + placed


def _block_sparse_oracles(model, inputs, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """BigBird's block-sparse layers: transformers' attentions of these layers (wrong in eval: a key block
    attended twice is overwritten, not added) replaced by each call's map from its own weights over the keys
    it attended, with multiplicity (tests/block_sparse_oracle.py), cropped to the input's tokens; each
    checked to multiply value(x) into the layer's output first. Other references are returned as they are."""
    from block_sparse_oracle import block_sparse_calls, block_sparse_layers, dense_by_hand

    layers = block_sparse_layers(model)
    if not layers:
        return references
    calls = block_sparse_calls(model, inputs, lambda m, i: _forward(m, i, output_attentions=True))
    output = calls.pop(None)
    theirs = getattr(output, "encoder_attentions", None) or getattr(output, "attentions", None) or ()
    tokens = inputs["input_ids"].shape[1]
    placed = []
    for name, module in layers:
        if name not in calls:
            continue
        x, query_real, key_real, random, out = calls[name]
        dense, v = dense_by_hand(module, x, query_real, key_real, random)
        batch, length = x.shape[:2]
        context = out.view(batch, length, module.num_attention_heads, -1).transpose(1, 2)
        if not torch.allclose(dense @ v, context, atol=1e-5):
            raise AssertionError(f"the harness's block-sparse oracle of {name} does not give the layer's output")
        placed.append(dense[:, :, :tokens, :tokens])
    kept = [r for r in references if not any(r.shape == a.shape and torch.equal(r, a) for a in theirs)]
    return kept + placed


def _ngram_streams(model, inputs) -> List[torch.Tensor]:
    """ProphetNet's n-gram streams as transformers returns them, ``decoder_ngram_attentions`` ``(batch,
    ngram, heads, T, 2T)`` per decoder layer, one ``(batch, heads, T, 2T)`` reference per stream."""
    output = _forward(model, inputs, output_attentions=True)
    return [layer[:, s] for layer in output.decoder_ngram_attentions for s in range(layer.shape[1])]


def _split_cross_streams(model, inputs, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """ProphetNet's decoder cross-attentions, which transformers returns as masked scores ``(batch, heads, (1 +
    n) T, S)`` (the main stream's T rows, then each predict stream's), softmaxed and cut by the harness into
    ``1 + n`` references ``(batch, heads, T, S)``, in place of the whole one; other references as they are."""
    output = _forward(model, inputs, output_attentions=True)
    ngram = model.config.ngram
    whole = [a.softmax(-1) for a in (getattr(output, "cross_attentions", None) or ())]
    kept = [r for r in references if not any(r.shape == w.shape and torch.equal(r, w) for w in whole)]
    if len(kept) != len(references) - len(whole):
        raise AssertionError("the harness did not find each ProphetNet cross-attention among the references")
    parts = []
    for w in whole:
        t = w.shape[2] // (1 + ngram)
        parts += [w[:, :, s * t:(s + 1) * t] for s in range(1 + ngram)]
    return kept + parts


def _nystromformer_with_conv(model, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """Each Nystromformer layer's softmax ``(batch, heads, L, L)`` (transformers' attentions on the plain
    path) plus its depthwise value convolution as a matrix, written for the harness: for every query i,
    key j and tap t of ``conv.weight`` ``(heads, 1, k, 1)`` with ``j = i + t - k // 2``. Matched to the
    layers in model order; other references are returned as they are."""
    layers = [m for m in model.modules() if type(m).__name__ == "NystromformerSelfAttention"]
    if not layers:
        return references
    convs = iter(layers)
    out = []
    for ref in references:
        module = next(convs, None) if ref.dim() == 4 and ref.shape[-1] == ref.shape[-2] else None
        if module is None:
            out.append(ref)
            continue
        weight = module.conv.weight.detach()
        taps, length = weight.shape[2], ref.shape[-1]
        band = torch.zeros(ref.shape[1], length, length)
        for i in range(length):
            for t in range(taps):
                j = i + t - taps // 2
                if 0 <= j < length:
                    band[:, i, j] = weight[:, 0, t, 0]
        out.append(ref + band)
    return out


def _placed_longt5_blocks(model, inputs, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """transformers' LongT5 local / transient-global blocks ``(batch, blocks, heads, bl, 3 bl [+ G])`` placed at
    ``(batch, heads, tokens, tokens [+ G])`` by loops written for the harness (not the library's placement): slot
    ``kk`` of block ``i`` is the key ``(i - 1) * bl + kk``, dropped off the sequence; the ``G`` global-aggregate
    slots go to the last ``G`` columns. Each layer's token count is read from its call. Other references are
    returned as they are."""
    modules = [m for m in model.modules()
               if type(m).__name__ in ("LongT5LocalAttention", "LongT5TransientGlobalAttention")]
    if not modules:
        return references
    lengths, handles = [], []
    for module in modules:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
            with_kwargs=True))
    try:
        _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    placed, pending = [], list(zip(lengths, modules))
    for ref in references:
        if ref.dim() != 5 or not pending:
            placed.append(ref)
            continue
        tokens, module = pending.pop(0)
        batch, blocks, heads, bl, slots = ref.shape
        extra = slots - 3 * bl
        dense = torch.zeros(batch, heads, tokens, tokens + extra)
        for i in range(blocks):
            for s in range(bl):
                if i * bl + s >= tokens:
                    continue
                for kk in range(3 * bl):
                    if 0 <= (i - 1) * bl + kk < tokens:
                        dense[:, :, i * bl + s, (i - 1) * bl + kk] = ref[:, i, :, s, kk]
                dense[:, :, i * bl + s, tokens:] = ref[:, i, :, s, 3 * bl:]
        placed.append(dense)
    return placed


def _placed_pegasus_x_pieces(model, inputs) -> List[torch.Tensor]:
    """transformers' PEGASUS-X encoder attentions, a dict per layer ``{"global": (batch, heads, G, G + Lp),
    "local": (batch, heads, blocks, bs, G + bs)}`` (which :func:`_attentions_in` leaves out), placed at
    ``(batch, heads, G + L, G + L)`` (global tokens first, then the input's ``L`` tokens) by loops over the
    input's tokens; a staggered layer's token ``t`` is its padded token ``bs // 2 + t``."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "stagger_blocks_this_layer", None), bool)]
    if not layers:
        return []
    length = inputs["input_ids"].shape[1]
    output = _forward(model, inputs, output_attentions=True)
    placed = []
    for layer, pieces in zip(layers, getattr(output, "encoder_attentions", None) or ()):
        glob, local = pieces["global"], pieces["local"]
        batch, heads, g, _ = glob.shape
        bs = local.shape[3]
        shift = layer.block_size // 2 if layer.stagger_blocks_this_layer else 0
        dense = torch.zeros(batch, heads, g + length, g + length)
        for i in range(g):
            dense[:, :, i, :g] = glob[:, :, i, :g]
            for u in range(length):
                dense[:, :, i, g + u] = glob[:, :, i, g + shift + u]
        for t in range(length):
            x = shift + t
            dense[:, :, g + t, :g] = local[:, :, x // bs, x % bs, :g]
            for u in range(length):
                if (shift + u) // bs == x // bs:
                    dense[:, :, g + t, g + u] = local[:, :, x // bs, x % bs, g + (shift + u) % bs]
        placed.append(dense)
    return placed


def _placed_hiera_units(model, inputs, references: List[torch.Tensor]) -> List[torch.Tensor]:
    """Every transformers Hiera mask-unit attention call's own per-unit weights (the module called again with
    ``output_attentions=True`` on the hidden states it got), ``(batch, heads, units, Tq, T)``, placed at
    ``(batch, heads, units * Tq, units * T)``: query slot ``j`` of unit ``w`` at row ``j * units + w``, key slot
    ``i`` at column ``i * units + w``. The model's own 5-D attentions (each stage's last layer) are replaced by these."""
    modules = [m for m in model.modules() if type(m).__name__ == "HieraMaskUnitAttention"]
    if not modules:
        return references
    calls, handles = [], []
    for module in modules:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append((m, args[0] if args else kwargs["hidden_states"])), with_kwargs=True))
    try:
        _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    placed = [ref for ref in references if ref.dim() != 5]
    for module, hidden in calls:
        with torch.no_grad():
            per_unit = module(hidden, output_attentions=True)[1]
        batch, heads, units, queries, keys = per_unit.shape
        dense = torch.zeros(batch, heads, units * queries, units * keys)
        for w in range(units):
            for j in range(queries):
                for i in range(keys):
                    dense[:, :, j * units + w, i * units + w] = per_unit[:, :, w, j, i]
        placed.append(dense)
    return placed


def _swin_window_oracles(model, inputs) -> List[torch.Tensor]:
    """Every Swin window-attention call of the model recomputed from the module's own
    weights and the call's inputs: ``softmax(q kᵀ / sqrt(d) + relative position bias +
    the shifted-window mask)``, ``(batch * windows, heads, N, N)``."""
    calls = []
    modules = [m for m in model.modules() if hasattr(m, "relative_position_bias_table") and hasattr(m, "query")
               or isinstance(getattr(m, "relative_position_bias", None), torch.nn.Module) and hasattr(m, "q_proj")]
    handles = [m.register_forward_pre_hook(lambda m, args, kwargs: calls.append((m, args, kwargs)), with_kwargs=True)
               for m in modules]
    try:
        _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    oracles = []
    for m, args, kwargs in calls:
        x = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        b, n, _ = x.shape
        h = m.num_attention_heads
        d = getattr(m, "attention_head_size", None) or m.head_dim
        with torch.no_grad():
            q = getattr(m, "query", None) or m.q_proj
            k = getattr(m, "key", None) or m.k_proj
            q, k = (proj(x).view(b, n, h, d).transpose(1, 2) for proj in (q, k))
            if hasattr(m, "relative_position_bias_table"):
                table = m.relative_position_bias_table
                bias = table[m.relative_position_index.view(-1)].view(n, n, h).permute(2, 0, 1)
            else:
                bias = m.relative_position_bias()  # (1, H, N, N)
            scores = q @ k.transpose(-1, -2) / d ** 0.5 + bias  # (B * nW, H, N, N)
            if mask is not None:
                windows = mask.shape[0]
                scores = (scores.view(b // windows, windows, h, n, n) + mask[None, :, None]).view(b, h, n, n)
            oracles.append(scores.softmax(-1))
    return oracles


def _aimv2_pooling_oracle(model, head, inputs) -> torch.Tensor:
    """The Aimv2 pooling head's weights from its own parameters: (batch, heads, 1, patches)."""
    seen = {}
    handle = head.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        _forward(model, inputs)
    finally:
        handle.remove()
    x = seen["x"]
    b, n, d = x.shape
    h = head.num_heads
    with torch.no_grad():
        k = head.k_proj(x).view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, d)
        q = head.cls_token.view(1, 1, h, d // h).transpose(1, 2)  # (1, H, 1, d)
        return ((q @ k.transpose(-1, -2)) / (d // h) ** 0.5).softmax(-1)  # (B, H, 1, N)


def run(model_type: str):
    """``(verdicts, None)`` or ``([], Unbuildable)``, and the seconds it took."""
    start = time.perf_counter()
    try:
        case = build(model_type)
    except Unbuildable as err:
        # Kept by the summary: without its traceback, whose frames would keep the models alive.
        err.__traceback__ = err.__context__ = err.__cause__ = None
        return [], err, time.perf_counter() - start
    try:
        verdicts = judge(case)
    except _Timeout:
        verdicts = [Verdict(model_type, "?", "failed", f"judging took over {SECONDS_PER_CASE} s")]
    return verdicts, None, time.perf_counter() - start
