"""The zoo's text-side helpers (tests/zoo_text.py): the hybrid-stack cut keeps an attention layer, the
latent-attention sizes stay consistent, the softmax counter sees attention at the dispatcher, and the
"no attention" verdict is given only where the library finds no layer and no softmax is computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
import zoo_harness  # noqa: E402
import zoo_text  # noqa: E402


def test_a_hybrid_stack_cut_to_its_kinds_keeps_an_attention_layer():
    config = zoo_text.adjust_config("qwen3_next", zoo_harness.shrink(transformers.AutoConfig.for_model("qwen3_next")))
    assert config.layer_types == ["linear_attention", "full_attention"] and config.num_hidden_layers == 2


def test_latent_attention_sizes_are_shrunk_together():
    config = zoo_text.adjust_config("deepseek_v3", zoo_harness.shrink(transformers.AutoConfig.for_model("deepseek_v3")))
    assert (config.kv_lora_rank, config.q_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim,
            config.v_head_dim, config.qk_head_dim, config.head_dim) == (16, 16, 4, 8, 8, 12, 4)
    assert config.num_key_value_heads == config.num_attention_heads


def test_the_counter_sees_sdpa_and_softmax_and_nothing_in_a_convolution():
    q = torch.randn(1, 2, 3, 4)
    attention = type("SDPA", (nn.Module,), {"forward": lambda self, q: nn.functional.scaled_dot_product_attention(
        q, q, q)})()
    assert zoo_text.count_attention_ops(attention, dict(q=q))
    assert zoo_text.count_attention_ops(nn.Conv1d(2, 2, 3), dict(input=torch.randn(1, 2, 5))) == {}


def _case(model_type):
    case = zoo_harness.build(model_type)
    return case


def test_an_attention_free_model_is_judged_no_attention():
    case = _case("mamba")
    assert case.attention_free and list(case.models) == ["eager"]
    verdict = zoo_text.judge_attention_free(case, "eager")
    assert verdict.outcome == zoo_text.NO_ATTENTION, verdict


def test_a_model_that_computes_an_uncovered_softmax_is_not_attention_free():
    class Hidden(nn.Module):  # a softmax over keys in a module no rule of the harness reaches
        def forward(self, x):
            return (x @ x.transpose(-1, -2)).softmax(-1) @ x

    case = zoo_harness.Case("handmade", None, {"eager": Hidden()}, dict(x=torch.randn(2, 3, 4)), None)
    with pytest.raises(zoo_harness.Unbuildable, match="_softmax"):
        zoo_text.attention_free_case(case)


def test_an_attention_module_the_library_would_find_is_not_judged_no_attention():
    class SelfAttention(nn.Module):  # the library finds it by name; it computes no softmax
        def forward(self, x):
            return x * 2

    model = nn.Sequential(SelfAttention())
    case = zoo_harness.Case("handmade", None, {"eager": model}, dict(input=torch.randn(2, 3)), None,
                            attention_free=True)
    assert zoo_text.judge_attention_free(case, "eager").outcome != zoo_text.NO_ATTENTION


def test_own_path_maps_are_the_layers_softmax():
    case = _case("mobilevit")
    model = case.models["eager"]
    maps = zoo_text.own_path_references(model, case.inputs)
    assert maps and all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)
    assert max(float((m.amax(-1) - m.amin(-1)).max()) for m in maps) > 0.1  # not uniform: a map to check
    layer = next(m for m in model.modules() if type(m).__name__ == "MobileViTSelfAttention")
    original = layer.forward
    layer.forward = lambda *args, **kwargs: original(*args, **kwargs) * 1.5  # not map @ value(x) any more
    with pytest.raises(AssertionError, match="does not give its output"):
        zoo_text.own_path_references(model, case.inputs)
