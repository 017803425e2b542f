"""Interventions on windowed and pieced layers act exactly or refuse, naming the family and why.

Oracle for the acts kept: the model with the head's slice of its output projection's input
zeroed or scaled (a pre-hook), which is what the head's knock-out or gate means.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import (
    HeadIntervention,
    block_keys,
    knockout_effects,
    record_heads,
    top_k_keys,
    uniform_weights,
)
from attention_hooker.errors import InterventionError


def _slice_hook(projection, head, head_dim, factor):
    def pre(module, args):
        x = args[0].clone()
        x[..., head * head_dim:(head + 1) * head_dim] *= factor
        return (x,) + tuple(args[1:])
    return projection.register_forward_pre_hook(pre)


def _oracle(model, inputs, projection, head, head_dim, factor):
    handle = _slice_hook(projection, head, head_dim, factor)
    try:
        with torch.no_grad():
            return model(**inputs).last_hidden_state
    finally:
        handle.remove()


def _run(intervention, model, inputs):
    with torch.no_grad(), intervention:
        return model(**inputs).last_hidden_state


# ----------------------------------------------------------------------------- Swin (windowed)
@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     drop_path_rate=0.0)
    model = transformers.SwinModel(config).eval()
    return model, dict(pixel_values=torch.randn(2, 3, 32, 32))


SWIN_SHIFTED = "encoder.layers.0.blocks.1.attention"  # block 1 shifts its windows


@pytest.mark.parametrize("block", [0, 1])
def test_swin_knock_out_and_gate_stay_exact(swin, block):
    model, inputs = swin
    layer = f"encoder.layers.0.blocks.{block}.attention"
    projection = dict(model.named_modules())[f"{layer}.o_proj"]
    plain = _oracle(model, inputs, projection, 1, 8, 1.0)
    zeroed = _oracle(model, inputs, projection, 1, 8, 0.0)
    gated = _oracle(model, inputs, projection, 1, 8, 0.3)
    assert (zeroed - plain).abs().max() > 1e-3  # the oracle moves the output
    assert torch.allclose(_run(HeadIntervention(model).knock_out(layer, [1]), model, inputs), zeroed, atol=1e-6)
    assert torch.allclose(_run(HeadIntervention(model).scale(layer, [1.0, 0.3]), model, inputs), gated, atol=1e-6)


@pytest.mark.parametrize("weights", [block_keys([0]), uniform_weights(), top_k_keys(1), torch.full((16, 16), 1 / 16)])
def test_swin_weight_acts_refused_as_window_local(swin, weights):
    model, _ = swin
    with pytest.raises(InterventionError, match=r"windowed layer \(transformers Swin.*window-local positions"):
        HeadIntervention(model).replace_weights(SWIN_SHIFTED, [1], weights)


def test_swin_patched_weights_refused(swin):
    model, inputs = swin
    with torch.no_grad(), record_heads(model, [SWIN_SHIFTED], weights=True) as recording:
        model(**inputs)
    with pytest.raises(InterventionError, match="window-local"):
        HeadIntervention(model).patch(SWIN_SHIFTED, recording, heads=[0], what="weights")


def test_swin_per_item_gates_name_the_windows(swin):
    model, inputs = swin
    with pytest.raises(InterventionError, match=r"gate per batch item on a windowed layer.*batch x windows"):
        HeadIntervention(model).scale(SWIN_SHIFTED, torch.ones(2, 2))
    with pytest.raises(InterventionError, match=r"batch x windows"):
        knockout_effects(model, inputs, lambda out, _: out.last_hidden_state.mean(1), layers=[SWIN_SHIFTED])


def test_a_mean_knock_out_on_a_windowed_layer_is_refused_because_its_slots_include_padding():
    """A 20 px image in patches of 4 is a 5 x 5 grid, run in windows of 4 as an 8 x 8 grid: 39 of the 64 slots
    of the layer's outputs are padding, which a mean over the reference's calls counted as tokens."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=20, patch_size=4, embed_dim=8, depths=[1], num_heads=[2],
                                     window_size=4)
    model = transformers.SwinModel(config).eval()
    layer = "encoder.layers.0.blocks.0.attention"
    with torch.no_grad(), record_heads(model, [layer]) as recording:
        model(torch.randn(1, 3, 20, 20))
    assert tuple(recording.outputs[layer][0].shape[::2]) == (4, 16)  # 4 windows of 16 slots: 64 for 25 tokens
    for mask in (None, torch.ones(4, 16)):
        with pytest.raises(InterventionError, match=r"mean.*windowed layer \(transformers Swin.*padding"):
            HeadIntervention(model).knock_out(layer, [0], mode="mean", reference=recording, reference_mask=mask)
    HeadIntervention(model).knock_out(layer, [0])  # the zero knock-out stays


# ----------------------------------------------------------------------------- DiffLlama
def test_diffllama_refused_naming_its_paired_heads():
    torch.manual_seed(0)
    config = transformers.DiffLlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                          attn_implementation="eager")
    model = transformers.DiffLlamaModel(config).eval()
    layer = "layers.0.self_attn"
    for act in (lambda i: i.knock_out(layer, [0]), lambda i: i.scale(layer, [1.0, 0.5], heads=[0, 1]),
                lambda i: i.replace_weights(layer, [0], uniform_weights())):
        with pytest.raises(InterventionError, match=r"DiffLlama.*pairs of softmax heads"):
            act(HeadIntervention(model))
    ids = torch.randint(3, 100, (1, 6))
    with pytest.raises(InterventionError, match="pairs of softmax heads"):
        knockout_effects(model, dict(input_ids=ids), lambda out, _: out.last_hidden_state.mean((1, 2)))


# ----------------------------------------------------------------------------- Nystromformer
def _nystromformer(conv):
    torch.manual_seed(0)
    config = transformers.NystromformerConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_landmarks=4, segment_means_seq_len=16, conv_kernel_size=conv or 3, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.NystromformerModel(config).eval()
    if conv is None:  # the config refuses None here; the layer reads its own attribute at each call
        for block in model.encoder.layer:
            block.attention.self.conv_kernel_size = None
    return model, dict(input_ids=torch.randint(3, 100, (2, 16)))


NYS_LAYER = "encoder.layer.0.attention.self"


def test_nystromformer_with_its_conv_refuses_output_acts():
    model, _ = _nystromformer(3)
    with pytest.raises(InterventionError, match=r"conv_kernel_size=3.*convolution of the values"):
        HeadIntervention(model).knock_out(NYS_LAYER, [1])
    with pytest.raises(InterventionError, match="convolution of the values"):
        HeadIntervention(model).scale(NYS_LAYER, [1.0, 0.3])


def test_nystromformer_without_conv_knock_out_and_gates_exact_the_rest_refused():
    model, inputs = _nystromformer(None)
    projection = model.encoder.layer[0].attention.output.dense
    plain = _oracle(model, inputs, projection, 1, 8, 1.0)
    zeroed = _oracle(model, inputs, projection, 1, 8, 0.0)
    gated = _oracle(model, inputs, projection, 1, 8, 0.3)
    assert (zeroed - plain).abs().max() > 1e-3
    assert torch.allclose(_run(HeadIntervention(model).knock_out(NYS_LAYER, [1]), model, inputs), zeroed, atol=1e-6)
    assert torch.allclose(_run(HeadIntervention(model).scale(NYS_LAYER, [1.0, 0.3]), model, inputs), gated, atol=1e-6)
    per_item = torch.tensor([[1.0, 0.3], [1.0, 0.3]])
    assert torch.allclose(_run(HeadIntervention(model).scale(NYS_LAYER, per_item), model, inputs), gated, atol=1e-6)
    with pytest.raises(InterventionError, match=r"landmarks' map \(batch, heads, landmarks, key\)"):
        HeadIntervention(model).replace_weights(NYS_LAYER, [1], top_k_keys(1))
    with torch.no_grad(), record_heads(model, [NYS_LAYER]) as recording:
        model(**inputs)
    with pytest.raises(InterventionError, match="landmark layer"):
        HeadIntervention(model).knock_out(NYS_LAYER, [1], mode="mean", reference=recording)
    with pytest.raises(InterventionError, match="landmark layer"):
        HeadIntervention(model).patch(NYS_LAYER, recording, heads=[1])


# ----------------------------------------------------------------------------- Longformer
def test_longformer_refused_even_when_heads_equal_the_padded_length():
    torch.manual_seed(0)
    config = transformers.LongformerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=8,
                                           intermediate_size=32, attention_window=4, max_position_embeddings=64,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    model = transformers.LongformerModel(config, add_pooling_layer=False).eval()
    with pytest.raises(InterventionError, match=r"Longformer.*band of keys.*not supported"):
        HeadIntervention(model).knock_out("encoder.layer.0.attention.self", [1])


# ----------------------------------------------------------------------------- Qwen2-VL (segments)
def test_qwen2_vl_segments_keep_knock_out_and_refuse_block_keys():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )
    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                                 spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config._attn_implementation = "eager"
    model = Qwen2VisionTransformerPretrainedModel(config).eval()
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    x = torch.randn(24, 24)
    layer = "blocks.0.attn"

    def run(intervention=None):
        with torch.no_grad():
            if intervention is None:
                out = model(hidden_states=x, grid_thw=grid)
            else:
                with intervention:
                    out = model(hidden_states=x, grid_thw=grid)
        return out if isinstance(out, torch.Tensor) else out[0]

    handle = _slice_hook(model.blocks[0].attn.proj, 1, 16, 0.0)
    try:
        zeroed = run()
    finally:
        handle.remove()
    assert (zeroed - run()).abs().max() > 1e-3
    assert torch.allclose(run(HeadIntervention(model).knock_out(layer, [1])), zeroed, atol=1e-6)
    with pytest.raises(InterventionError, match=r"segmented layer.*segment-local positions"):
        HeadIntervention(model).replace_weights(layer, [1], block_keys([0]))


# ----------------------------------------------------------------------------- other windowed and pieced families
def test_vitdet_windowed_block_keys_refused():
    torch.manual_seed(0)
    config = transformers.VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                       patch_size=4, window_size=4, window_block_indices=[0],
                                       use_relative_position_embeddings=True, drop_path_rate=0.0)
    model = transformers.VitDetModel(config).eval()
    with pytest.raises(InterventionError, match=r"windowed layer \(transformers VitDetLayer\).*window-local"):
        HeadIntervention(model).replace_weights("encoder.layer.0.attention", [0], block_keys([0]))
    HeadIntervention(model).replace_weights("encoder.layer.1.attention", [0], block_keys([0]))  # a global block: plain


def test_block_sparse_refused_with_its_family_not_the_capture_wording():
    torch.manual_seed(0)
    config = transformers.BigBirdConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, attention_type="block_sparse", block_size=2,
                                        num_random_blocks=1, max_position_embeddings=64)
    model = transformers.BigBirdModel(config, add_pooling_layer=False).eval()
    with pytest.raises(InterventionError, match=r"BigBird.*in blocks.*not supported") as refused:
        HeadIntervention(model).knock_out("encoder.layer.0.attention.self", [1])
    assert "not stored" not in str(refused.value)


def test_maxvit_five_d_windows_refused_as_windowed():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
                          block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=2).eval()
    layer = next(name for name, module in model.named_modules()
                 if type(module).__name__ == "RelativePositionalMultiHeadAttention")
    with pytest.raises(InterventionError, match=r"windowed layer \(torchvision MaxViT.*5-D.*not supported") as refused:
        HeadIntervention(model).knock_out(layer, [0])
    assert "not stored" not in str(refused.value)


def test_a_five_d_softmax_outside_any_family_is_refused_in_the_interventions_words():
    class BlockedAttention(torch.nn.Module):  # (batch, blocks, heads, query, key): no family's layer
        num_heads = 2

        def forward(self, x):  # x (batch, blocks, heads, query, dim)
            return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x

    layer = BlockedAttention()
    with pytest.raises(InterventionError, match=r"5-D tensor.*so its heads cannot be acted on") as refused:
        with HeadIntervention(layer).knock_out("", [0]):
            layer(torch.randn(1, 3, 2, 4, 8))
    assert "not stored" not in str(refused.value)
