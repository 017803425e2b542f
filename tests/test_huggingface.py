"""Hugging Face models on sdpa and eager, against HF's own eager ``output_attentions``."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from attention_hooker import AttentionHookerError, TransformerAttentionHooker

transformers = pytest.importorskip("transformers")


def _pair(model_cls, config):
    """The same random weights as an ``sdpa`` and an ``eager`` model (eval)."""
    torch.manual_seed(0)
    sdpa = model_cls(copy.deepcopy(config))
    sdpa.set_attn_implementation("sdpa")
    eager = model_cls(copy.deepcopy(config))
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    return sdpa.eval(), eager.eval()


def _right_padded_ids(batch=2, length=7, vocab=100):
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0
    return ids, mask


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ids, mask = _right_padded_ids()
    return transformers.GPT2LMHeadModel, cfg, dict(input_ids=ids, attention_mask=mask), {"attentions": r"attn$"}


def _llama_gqa():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                   intermediate_size=64, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ids, mask = _right_padded_ids()
    return transformers.LlamaForCausalLM, cfg, dict(input_ids=ids, attention_mask=mask), {"attentions": r"self_attn$"}


def _t5():
    cfg = transformers.T5Config(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=32, d_kv=8, d_ff=64,
                                vocab_size=100, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids, mask = _right_padded_ids()
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(3, 100, (2, 5)))
    groups = {
        "encoder_attentions": r"^encoder\..*SelfAttention$",
        "decoder_attentions": r"^decoder\..*SelfAttention$",
        "cross_attentions": r"EncDecAttention$",
    }
    return transformers.T5ForConditionalGeneration, cfg, inputs, groups


def _vit():
    cfg = transformers.ViTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                                 image_size=32, patch_size=8)
    return transformers.ViTModel, cfg, dict(pixel_values=torch.randn(2, 3, 32, 32)), {"attentions": r"."}


def _whisper():
    cfg = transformers.WhisperConfig(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     vocab_size=100, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                     suppress_tokens=None, begin_suppress_tokens=None)
    inputs = dict(input_features=torch.randn(2, 8, 32), decoder_input_ids=torch.randint(3, 100, (2, 5)))
    groups = {
        "encoder_attentions": r"encoder\.layers\.\d+\.self_attn$",
        "decoder_attentions": r"decoder\.layers\.\d+\.self_attn$",
        "cross_attentions": r"encoder_attn$",
    }
    return transformers.WhisperForConditionalGeneration, cfg, inputs, groups


MODELS = {"gpt2": _gpt2, "llama_gqa": _llama_gqa, "t5": _t5, "vit": _vit, "whisper": _whisper}


def _compare_with_reference(values, reference, groups, atol):
    compared = 0
    for field, pattern in groups.items():
        ours = [calls for name, calls in values.items() if re.search(pattern, name)]
        theirs = getattr(reference, field)
        assert len(ours) == len(theirs), f"{field}: {len(ours)} captured layers, {len(theirs)} in HF's output"
        for calls, expected in zip(ours, theirs):
            assert len(calls) == 1
            assert calls[0].shape == expected.shape
            torch.testing.assert_close(calls[0], expected, atol=atol, rtol=1e-4)
            compared += 1
    assert compared == len(values), "every captured layer is compared with HF's"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_matches_hf_eager_output_attentions(name, implementation):
    model_cls, config, inputs, groups = MODELS[name]()
    sdpa, eager = _pair(model_cls, config)
    model = sdpa if implementation == "sdpa" else eager
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        plain = model(**inputs)
        with TransformerAttentionHooker(model) as hooker:
            out = model(**inputs)
    logits = "logits" if hasattr(plain, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(out, logits), getattr(plain, logits), atol=0, rtol=0)
    _compare_with_reference(hooker.values, reference, groups, atol=1e-5)
    for calls in hooker.values.values():
        w = calls[0]
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_real_minilm_matches_eager_output_attentions(implementation, minilm_sdpa, minilm_eager, minilm_batch):
    model = minilm_sdpa if implementation == "sdpa" else minilm_eager
    with torch.no_grad():
        reference = minilm_eager(**minilm_batch, output_attentions=True)
        plain = model(**minilm_batch)
        with TransformerAttentionHooker(model) as hooker:
            out = model(**minilm_batch)
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, atol=0, rtol=0)
    assert hooker.hooked_layers == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert len(hooker.values) == 6
    # sdpa and eager hidden states differ by float rounding; 6 layers deep that is ~1e-5.
    _compare_with_reference(hooker.values, reference, {"attentions": r"."}, atol=5e-5)
    pad = minilm_batch["attention_mask"] == 0  # (B, L)
    for calls in hooker.values.values():
        w = calls[0]  # (B, H, L, L)
        assert w.shape == (2, 12) + (pad.shape[1],) * 2
        assert (w.masked_select(pad[:, None, None, :].expand_as(w)) < 1e-6).all(), "padding keys get ~0"


def test_gpt2_generate_with_kv_cache_gives_one_call_per_step():
    model_cls, config, _, _ = _gpt2()
    sdpa, eager = _pair(model_cls, config)
    prompt = torch.randint(3, 100, (2, 4))
    with torch.no_grad(), TransformerAttentionHooker(sdpa) as hooker:
        generated = sdpa.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                                  pad_token_id=0)
    assert generated.shape == (2, 7)
    for name, calls in hooker.values.items():
        assert [tuple(c.shape) for c in calls] == [(2, 4, 4, 4), (2, 4, 1, 5), (2, 4, 1, 6)], name
    # Each step's row is the matching row of one full forward over the same tokens.
    with torch.no_grad():
        full = eager(generated[:, :6], output_attentions=True).attentions
    for layer, (name, calls) in enumerate(hooker.values.items()):
        torch.testing.assert_close(calls[0], full[layer][:, :, :4, :4], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(calls[1][:, :, 0], full[layer][:, :, 4, :5], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(calls[2][:, :, 0], full[layer][:, :, 5, :6], atol=1e-5, rtol=1e-4)


def test_flash_attention_is_refused_with_the_fix(monkeypatch):
    model_cls, config, _, _ = _gpt2()
    model, _ = _pair(model_cls, config)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    with pytest.raises(AttentionHookerError, match=r"flash_attention_2.*set_attn_implementation\('sdpa'\)"):
        TransformerAttentionHooker(model).setup()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 4e-2), (torch.float16, 5e-3)])
def test_half_precision_minilm_matches_eager_within_its_precision(dtype, atol, minilm_path, minilm_batch):
    from transformers import AutoModel

    sdpa = AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa", dtype=dtype).eval()
    eager = AutoModel.from_pretrained(minilm_path, attn_implementation="eager", dtype=dtype).eval()
    with torch.no_grad():
        reference = eager(**minilm_batch, output_attentions=True).attentions
        with TransformerAttentionHooker(sdpa) as hooker:
            sdpa(**minilm_batch)
    for calls, expected in zip(hooker.values.values(), reference):
        assert calls[0].dtype == dtype
        torch.testing.assert_close(calls[0].float(), expected.float(), atol=atol, rtol=0)
        torch.testing.assert_close(calls[0].float().sum(-1), torch.ones(calls[0].shape[:-1]), atol=atol, rtol=0)


def _llama_gqa_pair():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                   intermediate_size=64, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _pair(transformers.LlamaForCausalLM, cfg)


@pytest.mark.parametrize("heads", [None, [3, 0]], ids=["all_heads", "heads_3_0"])
def test_grouped_query_generate_on_sdpa_with_left_padding_is_labelled_per_query_head(heads):
    """Issue 9: transformers packs the single decode query of GQA as (batch, kv_heads, groups,
    dim) for the sdpa kernel; each step was stored as (2, 2, 2, S) instead of (2, 4, 1, S)."""
    sdpa, eager = _llama_gqa_pair()
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(sdpa, r"self_attn$", heads=heads) as hooker:
            sdpa.generate(**kwargs)
    chosen = list(range(4)) if heads is None else heads
    layers = list(hooker.values.values())
    assert [len(calls) for calls in layers] == [3, 3]
    for step, expected_layers in enumerate(reference.attentions):
        real = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1)[:, -expected_layers[0].shape[2]:].bool()
        for calls, expected in zip(layers, expected_layers):
            got, want = calls[step], expected[:, chosen]
            assert got.shape == want.shape, f"step {step}: {tuple(got.shape)} != {tuple(want.shape)}"
            # padded query rows mean nothing (HF eager spreads them uniformly, the sdpa kernel zeroes them)
            torch.testing.assert_close(got[real[:, None, :, None].expand_as(got)],
                                       want[real[:, None, :, None].expand_as(want)], atol=1e-5, rtol=1e-4)


def test_packed_query_groups_are_read_from_what_the_module_declares():
    from attention_hooker.capture.routes.sdpa import packed_query_groups

    class Declared(torch.nn.Module):
        num_key_value_groups = 2
        num_heads = 4

    module = Declared()
    packed_q, packed_k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 5, 8)  # (B, kv_heads, groups, E)
    assert packed_query_groups(lambda: [module], packed_q, packed_k) == 2
    repeated_q, repeated_k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 5, 8)  # kv repeated: 2 real positions
    assert packed_query_groups(lambda: [module], repeated_q, repeated_k) == 1
    assert packed_query_groups(lambda: [torch.nn.Linear(2, 2)], packed_q, packed_k) == 1  # nothing declared: shapes as they are
