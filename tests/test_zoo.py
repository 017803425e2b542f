"""A first architecture zoo (issue 9): Hugging Face families built from shrunk configs,
each on eager and sdpa (where transformers offers it), captured and compared with the
eager model's own ``output_attentions`` (padded batch of 2; padded query rows, which
carry no meaning, left out). Every hooked layer must capture, none may be refused.
"""

from __future__ import annotations

import copy

import pytest
import torch

from attention_hooker import TransformerAttentionHooker

transformers = pytest.importorskip("transformers")

_SHRINK = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=128,
               num_key_value_heads=2, n_layer=2, n_head=4, n_embd=32, d_model=32, num_layers=2, num_heads=4,
               d_kv=8, d_ff=64, num_decoder_layers=2, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, ffn_dim=64,
               max_position_embeddings=64, n_positions=64, num_local_experts=2, num_experts_per_tok=1,
               image_size=32, patch_size=8, rotary_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, num_mel_bins=8, max_source_positions=16, max_target_positions=16)

FAMILIES = ["albert", "bart", "beit", "bert", "bloom", "deit", "dinov2", "distilbert", "electra", "falcon", "gemma",
            "gemma2", "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "mvp", "opt", "phi", "phi3",
            "qwen2", "qwen3", "roberta", "t5", "vit", "whisper", "xglm"]

_REFERENCE_FIELDS = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")


def _config(family: str):
    config = transformers.AutoConfig.for_model(family)
    for key, value in _SHRINK.items():
        if key in vars(config) or hasattr(type(config), key) and not isinstance(getattr(type(config), key), property):
            setattr(config, key, value)
    if getattr(config, "head_dim", None) is not None and "head_dim" in vars(config):
        config.head_dim = 8
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:2]
    return config


def _inputs(model, config):
    torch.manual_seed(1)
    if model.main_input_name == "pixel_values":
        return dict(pixel_values=torch.randn(2, 3, 32, 32)), None
    if model.main_input_name == "input_features":
        inputs = dict(input_features=torch.randn(2, 8, 32))
        return dict(inputs, decoder_input_ids=torch.randint(3, 100, (2, 5))), None
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, 100, (2, 5))
    return inputs, mask


def _implementations(family):
    config = _config(family)
    torch.manual_seed(0)
    eager = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    models = {"eager": eager}
    try:
        sdpa = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    except (ValueError, ImportError):  # transformers offers no sdpa for this family
        sdpa = None
    if sdpa is not None:
        sdpa.load_state_dict(eager.state_dict())
        models["sdpa"] = sdpa
    return config, models


@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_family_is_captured_exactly_on_every_implementation(family):
    config, models = _implementations(family)
    eager = models["eager"]
    inputs, mask = _inputs(eager, config)
    with torch.no_grad():
        output = eager(**inputs, output_attentions=True)
    references = [a for field in _REFERENCE_FIELDS for a in (getattr(output, field, None) or ())]
    assert references, f"{family}: transformers returned no attentions to compare with"
    for implementation, model in models.items():
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            model(**inputs)
        report = hooker.report()
        assert report.missing == [], f"{family}/{implementation}: {[(n, report[n].reason) for n in report.missing]}"
        calls = [c for calls in hooker.values.values() for c in calls]
        assert len(calls) == len(references), f"{family}/{implementation}: {len(calls)} calls, {len(references)} in HF's output"
        unmatched = list(references)  # HF groups encoder / decoder / cross; values keep model order
        for got in calls:
            rows = torch.ones(got.shape[0], got.shape[2], dtype=torch.bool)
            if mask is not None and got.shape[2] == mask.shape[1]:
                rows = mask.bool()  # padded query rows carry no meaning
            keep = rows[:, None, :, None].expand_as(got)
            match = [i for i, e in enumerate(unmatched)
                     if e.shape == got.shape and torch.allclose(got[keep], e[keep], atol=1e-5, rtol=1e-4)]
            assert match, f"{family}/{implementation}: a {tuple(got.shape)} call equals none of HF's attentions"
            unmatched.pop(match[0])


DECODERS = ["bloom", "falcon", "gemma", "gemma2", "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral",
            "opt", "phi", "phi3", "qwen2", "qwen3", "xglm"]


@pytest.mark.parametrize("family", DECODERS)
def test_zoo_generate_with_left_padding_is_captured_step_by_step(family):
    """Every decode step of every layer, on eager and sdpa, equals the eager model's own
    per-step output_attentions (grouped-query families pack the decode query on sdpa)."""
    config = _config(family)
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    models = {"eager": eager}
    try:
        models["sdpa"] = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                                       attn_implementation="sdpa").eval()
        models["sdpa"].load_state_dict(eager.state_dict())
    except (ValueError, ImportError):
        pass
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
    steps = reference.attentions  # (steps) x (layers) x (B, H, q, k)
    for implementation, model in models.items():
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            model.generate(**kwargs)
        assert hooker.report().missing == [], f"{family}/{implementation}"
        layers = list(hooker.values.values())
        assert [len(calls) for calls in layers] == [len(steps)] * len(steps[0]), f"{family}/{implementation}"
        for step, expected_layers in enumerate(steps):
            real = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1).bool()
            for calls, expected in zip(layers, expected_layers):
                got = calls[step]
                assert got.shape == expected.shape, f"{family}/{implementation} step {step}: {tuple(got.shape)}"
                rows = real[:, -got.shape[2]:][:, None, :, None].expand_as(got)
                torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-4,
                                           msg=lambda m: f"{family}/{implementation} step {step}: {m}")
