"""The packed vision towers written like Qwen2.5-VL's (Qwen3-VL, Qwen3.5, Qwen4-Exp, GLM-4V, GLM-OCR,
GLM-Image, GLM-5-Next, LLaVA-OneVision-1.5, Cohere Compass and their MoE kin): each layer call of two images is stored
as one block-diagonal ``(1, heads, S, S)`` map (capture/segments.py), checked against

- the model's own code path: the per-image softmaxes its modeling module's ``eager_attention_forward``
  returned on the eager tower (recorded by tests/zoo_vision.py), placed block-diagonally;
- invariants: the tower's output unchanged by the capture, exact zeros between the two images, rows
  summing to 1, on eager and on sdpa (which transformers runs as one sdpa call per image).

transformers' ``output_attentions`` is no oracle here: it records each attention module's output ``(S, C)``.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zoo_harness  # noqa: E402  (tiny configs: the zoo's shrink)
import zoo_vision  # noqa: E402

from attention_hooker import TransformerAttentionHooker  # noqa: E402

TOWERS = ["qwen3_vl_vision", "qwen3_vl_moe_vision", "qwen3_5_vision", "qwen3_5_moe_vision", "qwen4_exp_vision",
          "glm4v_vision", "glm4v_moe_vision", "glm_ocr_vision", "glm_image_vision", "glm5_next_vision", "llava_onevision1_5_vision",
          "cohere_compass_vision"]


def _tower(model_type, implementation):
    config = zoo_harness.shrink(transformers.AutoConfig.for_model(model_type))
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation=implementation).eval(), config


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", TOWERS)
def test_two_images_are_stored_block_diagonally_equal_to_the_towers_own_softmaxes(model_type, implementation):
    eager, config = _tower(model_type, "eager")
    model, _ = _tower(model_type, implementation)
    model.load_state_dict(eager.state_dict())
    inputs, _ = zoo_vision.inputs_for(model, config)
    patches = inputs["grid_thw"].prod(-1).tolist()  # one segment per image (one frame each)
    with torch.no_grad():
        calls = zoo_vision.packed_calls(eager, lambda: eager(**inputs))
        plain = model(**inputs).last_hidden_state
        with TransformerAttentionHooker(model) as hooker:
            hooked = model(**inputs).last_hidden_state
    assert torch.equal(plain, hooked)
    assert len(calls) == config.depth
    for name, _, pieces in calls:
        lengths = [p.shape[-1] for p in pieces]  # LLaVA-OneVision-1.5 adds a class token to each image
        assert [n - p for n, p in zip(lengths, patches)] in ([0, 0], [1, 1])
        (got,) = hooker.values[name]
        assert got.shape == (1, config.num_heads, sum(lengths), sum(lengths))
        torch.testing.assert_close(got, zoo_vision.block_diagonal(pieces), atol=1e-5, rtol=1e-4)
        assert torch.count_nonzero(got[..., :lengths[0], lengths[0]:]) == 0
        assert torch.count_nonzero(got[..., lengths[0]:, :lengths[0]]) == 0
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]))
    assert not hooker.report().missing
