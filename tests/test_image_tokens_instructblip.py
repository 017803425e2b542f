"""InstructBLIP's query tokens (issue 23, parts 1-4): as BLIP-2's, but its Q-Former also reads the instruction
(qformer_input_ids). The table is checked against the model's own code path, the capture against the
eager model's own attentions (get_image_features with output_attentions), and the chain through the
Q-Former against a hand computation."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.analysis.query_image_attention import image_attention_through_queries  # noqa: E402
from attention_hooker.media import image_token_map  # noqa: E402
from image_token_oracle import claimed_sources, coordinate_image, sources_by_perturbation  # noqa: E402

IMAGE, QUERIES = 60, 3


def tiny_instructblip(attn="sdpa"):
    config = transformers.InstructBlipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2),
        qformer_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=16, cross_attention_frequency=1, vocab_size=64,
                            max_position_embeddings=32),
        text_config=dict(model_type="opt", hidden_size=16, ffn_dim=16, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        num_query_tokens=QUERIES, image_token_index=IMAGE)
    torch.manual_seed(0)
    model = transformers.InstructBlipForConditionalGeneration(config).eval()
    # the init is so small (query tokens at zero) that a patch's effect on a query token drowns in float32
    # rounding: draw the matrices before the language model at a larger scale (the language model keeps its own)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() >= 2 and not name.startswith("language_model."):
                weight.normal_(0, 0.5)
    model.set_attn_implementation(attn)
    return model


def instructblip_inputs():
    processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    pixels = processor(images=[coordinate_image(40, 40), coordinate_image(28, 60)], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[IMAGE] * QUERIES + [1, 5, 6, 7, 8], [0] + [IMAGE] * QUERIES + [1, 9, 6, 7]])
    qformer_ids = torch.tensor([[3, 4, 5, 6], [0, 7, 8, 9]])
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pixels, qformer_input_ids=qformer_ids,
                qformer_attention_mask=(qformer_ids != 0).long())


def test_query_tokens_are_fed_by_every_patch_of_their_image():
    model = tiny_instructblip()
    inputs = instructblip_inputs()
    tokens = image_token_map(model, inputs)
    assert tokens.family == "instructblip" and tokens.position.tolist() == [0, 1, 2, 1, 2, 3]
    found = sources_by_perturbation(model, inputs, tower=model.vision_model,
                                    language_model=model.language_model, patch=8)
    assert claimed_sources(tokens) == found and len(found) == 2 * QUERIES
    with pytest.raises(AttentionHookerError, match="no cells.*image_attention_through_queries"):
        image_attention(torch.full((2, 1, 8, 8), 1 / 8), tokens)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_capture_equals_eager_and_the_chain_equals_a_hand_computation(attn):
    model, eager = tiny_instructblip(attn), tiny_instructblip("eager")
    inputs = instructblip_inputs()
    with torch.no_grad():
        lm = eager(**inputs, output_attentions=True).language_model_outputs.attentions
        features = eager.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                            inputs["qformer_attention_mask"], output_attentions=True)
    vision, qformer = features.vision_outputs.attentions, features.qformer_outputs
    q_cross = qformer.cross_attentions
    # Hugging Face lists the cross maps under "attentions" too: the self maps are over queries + instruction
    q_self = [a for a in qformer.attentions if a.shape[-1] == QUERIES + 4]
    assert [tuple(a.shape) for a in q_cross] == [(2, 2, QUERIES, 17)] * 2 and len(q_self) == 2
    with TransformerAttentionHooker(model) as hooker:
        with torch.no_grad():
            model(**inputs)
    values = hooker.values
    pairs = [(f"language_model.model.decoder.layers.{i}.self_attn", lm[i]) for i in range(2)]
    pairs += [(f"qformer.encoder.layer.{i}.attention.attention", q_self[i]) for i in range(2)]
    pairs += [(f"qformer.encoder.layer.{i}.crossattention.attention", q_cross[i]) for i in range(2)]
    pairs += [("vision_model.encoder.layers.0.self_attn", vision[0])]
    masks = {"language": inputs["attention_mask"],
             "qformer.encoder.layer.0.attention": torch.cat([torch.ones(2, QUERIES, dtype=torch.long),
                                                             inputs["qformer_attention_mask"]], 1)}
    masks["qformer.encoder.layer.1.attention"] = masks["qformer.encoder.layer.0.attention"]
    for name, want in pairs:
        (got,) = values[name]
        mask = next((m for key, m in masks.items() if key in name), None)  # padded query rows mean nothing
        real = torch.ones_like(want, dtype=torch.bool) if mask is None else \
            mask[:, None, :, None].bool().expand_as(want)
        # on sdpa the model's own computation drifts from eager (its Q-Former output differs by ~8e-6 at these
        # weight scales), so a later layer's inputs differ by that much; on eager the capture is exact
        atol = 5e-6 if attn == "sdpa" and "layer.1." in name else 1e-6
        torch.testing.assert_close(got[real], want[real], atol=atol, rtol=0, msg=name)

    tokens = image_token_map(model, inputs)
    captured = [values[f"qformer.encoder.layer.{i}.crossattention.attention"][0] for i in range(2)]
    lm_map = values["language_model.model.decoder.layers.0.self_attn"][0]
    for b in range(2):
        chain = image_attention_through_queries(lm_map, tokens, captured, batch=b, queries=[-1], heads=[0],
                                                qformer_layers=[1])
        positions = tokens.in_row(b).position
        mixed = q_cross[1][b].double().mean(0)  # (QUERIES, 17): layer 1, both heads averaged
        hand = lm[0][b, 0, -1, positions].double() @ mixed
        torch.testing.assert_close(chain.weights[b][0, 0], hand, atol=1e-6, rtol=0)
        torch.testing.assert_close(chain.grids[b][0, 0], hand[1:].reshape(4, 4), atol=1e-6, rtol=0)
        torch.testing.assert_close(chain.share[b][0, 0], lm[0][b, 0, -1, positions].double().sum(), atol=1e-6,
                                   rtol=0)


def test_generate_step_calls_equal_eager_per_step_attentions():
    model, eager = tiny_instructblip("sdpa"), tiny_instructblip("eager")
    inputs = instructblip_inputs()
    kwargs = dict(inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(model, layer_regex=r"language_model\.model\.decoder\.layers\.\d+\.self_attn$") \
                as hooker:
            generated = model.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    layers = list(hooker.values.values())
    assert [len(calls) for calls in layers] == [3, 3]
    mask = inputs["attention_mask"]
    for step, expected in enumerate(reference.attentions):
        real = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1)[:, -expected[0].shape[2]:].bool()
        for calls, want in zip(layers, expected):
            keep = real[:, None, :, None].expand_as(want)
            assert calls[step].shape == want.shape
            torch.testing.assert_close(calls[step][keep], want[keep], atol=1e-6, rtol=0)
