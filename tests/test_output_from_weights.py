"""output_from="weights": the model's sdpa outputs come from the captured weights (weights @ value, as
eager attention computes them), the kernel is not run, and every call the option cannot serve still
runs its kernel, bitwise (issue 22, part 8)."""

from __future__ import annotations

import pytest
import torch
import transformers

from attention_hooker import AttentionHookerError, TransformerAttentionHooker


def _kernel_calls(fn) -> int:
    """How many times an sdpa kernel ran in ``fn()`` (the profiler's aten::scaled_dot_product_attention)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("build", [_gpt2, _llama])
def test_outputs_from_the_weights_equal_the_kernels_within_float_tolerance_and_no_kernel_runs(build):
    model = build()
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row: an explicit mask reaches the calls
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with TransformerAttentionHooker(model) as by_kernel:
            model(ids, attention_mask=mask)
        hooker = TransformerAttentionHooker(model, output_from="weights")
        with hooker:
            assert _kernel_calls(lambda: model(ids, attention_mask=mask)) == 0
        hooker.clear()
        with hooker:
            got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert list(hooker.values) == list(by_kernel.values)
    for name, calls in by_kernel.values.items():
        torch.testing.assert_close(hooker.values[name][0], calls[0], atol=1e-6, rtol=0)


def test_a_timm_vit_gets_its_outputs_from_the_weights():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        hooker = TransformerAttentionHooker(model, output_from="weights")
        with hooker:
            assert _kernel_calls(lambda: model(x)) == 0
            got = model(x)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert len(hooker.values) == 12


@pytest.mark.parametrize("options", [{"heads": [0]}, {"rows": "last"}, {"dtype": torch.float16}])
def test_calls_the_weights_cannot_serve_still_run_their_kernel_bitwise(options):
    model = _gpt2()
    ids = torch.randint(1, 100, (1, 10))
    with torch.no_grad():
        plain = model(ids).logits
        with TransformerAttentionHooker(model, output_from="weights", **options):
            assert _kernel_calls(lambda: model(ids)) == 2
            got = model(ids).logits
    assert torch.equal(got, plain)


def test_a_stream_and_a_reduction_keep_the_kernel(tmp_path):
    from attention_hooker import HeadStatsAccumulator

    model = _gpt2()
    ids = torch.randint(1, 100, (1, 10))
    with torch.no_grad():
        plain = model(ids).logits
        with TransformerAttentionHooker(model, output_from="weights") as hooker, hooker.stream_to(tmp_path / "c"):
            streamed = model(ids).logits
        with TransformerAttentionHooker(model, output_from="weights") as hooker:
            hooker.reduce_into(HeadStatsAccumulator())
            reduced = model(ids).logits
    assert torch.equal(streamed, plain) and torch.equal(reduced, plain)


def test_the_default_keeps_the_kernel_and_a_bad_choice_is_named():
    model = _gpt2()
    ids = torch.randint(1, 100, (1, 10))
    with torch.no_grad():
        plain = model(ids).logits
        with TransformerAttentionHooker(model):
            assert _kernel_calls(lambda: model(ids)) == 2
            assert torch.equal(model(ids).logits, plain)
    with pytest.raises(AttentionHookerError, match="output_from='fast' must be one of"):
        TransformerAttentionHooker(model, output_from="fast")
