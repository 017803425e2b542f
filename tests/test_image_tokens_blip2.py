"""BLIP-2's query tokens (issue 23, parts 1-4): the table checked against the model's own code path (every
pixel_values patch of an image feeds each of its query tokens), the capture of the language model, the
Q-Former and the vision tower checked against the eager model's own attentions, and the chain
text -> query tokens -> patches checked against a hand computation from those eager attentions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_hooker import AttentionHookerError, TransformerAttentionHooker  # noqa: E402
from attention_hooker.analysis.image_attention import image_attention  # noqa: E402
from attention_hooker.analysis.query_image_attention import image_attention_through_queries  # noqa: E402
from attention_hooker.media import image_token_map  # noqa: E402
from image_token_oracle import (centres_of_sources, claimed_sources, coordinate_image,  # noqa: E402
                                sources_by_perturbation)

IMAGE, QUERIES = 60, 3
LM = r"language_model\.model\.decoder\.layers\.\d+\.self_attn$"
QFORMER_CROSS = r"qformer\.encoder\.layer\.\d+\.crossattention\.attention$"


def tiny_blip2(attn="sdpa"):
    config = transformers.Blip2Config(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2),
        qformer_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=16, cross_attention_frequency=1, vocab_size=64),
        text_config=dict(model_type="opt", hidden_size=16, ffn_dim=16, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        num_query_tokens=QUERIES, image_token_index=IMAGE)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    # BLIP-2's init is so small (query tokens at zero) that a patch's effect on a query token drowns in float32
    # rounding: draw the matrices before the language model at a larger scale (the language model keeps its own)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() >= 2 and not name.startswith("language_model."):
                weight.normal_(0, 0.5)
    model.set_attn_implementation(attn)
    return model


def blip2_inputs(sizes=((40, 40), (28, 60)), per_row=(1, 1)):
    processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    pixels = processor(images=[coordinate_image(h, w) for h, w in sizes], return_tensors="pt")["pixel_values"]
    rows = [[IMAGE] * (QUERIES * n) + [1, 5 + r, 6, 7, 8] for r, n in enumerate(per_row)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padded
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pixels), processor


@pytest.mark.parametrize("sizes, per_row", [(((40, 40), (28, 60)), (1, 1)),
                                            (((40, 40), (28, 60), (64, 36)), (2, 1))])
def test_query_tokens_are_fed_by_every_patch_of_their_image(sizes, per_row):
    model = tiny_blip2()
    inputs, processor = blip2_inputs(sizes, per_row)
    tokens = image_token_map(model, inputs)
    found = sources_by_perturbation(model, inputs, tower=model.vision_model,
                                    language_model=model.language_model, patch=8)
    assert claimed_sources(tokens) == found
    assert len(tokens) == QUERIES * len(sizes) and len(found) == len(tokens)
    assert {v.name for v in tokens.views} == {"queries"} and {(v.rows, v.cols) for v in tokens.views} == {(0, 0)}
    # a query token stands for its whole image: its box is the image, its patches' centre the image's centre
    assert bool((tokens.boxes() == torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)).all())
    centres = centres_of_sources(tokens, inputs["pixel_values"], processor.image_mean, processor.image_std)
    torch.testing.assert_close(centres, torch.full_like(centres, 0.5), atol=0.02, rtol=0)


def test_query_tokens_are_refused_on_a_grid_and_bad_inputs_by_name():
    model = tiny_blip2()
    inputs, _ = blip2_inputs()
    tokens = image_token_map(model, inputs)
    with pytest.raises(AttentionHookerError, match="no cells.*image_attention_through_queries"):
        image_attention(torch.full((2, 1, 8, 8), 1 / 8), tokens)
    with pytest.raises(AttentionHookerError, match="not a multiple of the 3 query tokens"):
        image_token_map(model, dict(input_ids=torch.tensor([[IMAGE, IMAGE, 4]])))
    with pytest.raises(AttentionHookerError, match="pixel_values hold 2 images but input_ids hold query tokens for 1"):
        image_token_map(model, dict(inputs, input_ids=inputs["input_ids"][:1]))


def _eager_references(inputs):
    """The eager model's own attentions: language model, Q-Former (self and cross) and vision tower."""
    eager = tiny_blip2("eager")
    with torch.no_grad():
        lm = eager(**inputs, output_attentions=True).language_model_outputs.attentions
        vision = eager.vision_model(inputs["pixel_values"], output_attentions=True)
        embeds = vision.last_hidden_state
        qformer = eager.qformer(query_embeds=eager.query_tokens.expand(embeds.shape[0], -1, -1),
                                encoder_hidden_states=embeds,
                                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                                output_attentions=True)
    # Hugging Face records the Q-Former's cross maps under "attentions" too (its recorder matches the name
    # ".attention" inside ".crossattention"): the self maps are those over the queries' own keys
    own = [a for a in qformer.attentions if a.shape[-1] == QUERIES]
    assert len(own) == 2 and len(qformer.cross_attentions) == 2
    return lm, vision.attentions, own, qformer.cross_attentions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_capture_equals_eager_and_the_chain_equals_a_hand_computation(attn):
    model = tiny_blip2(attn)
    inputs, _ = blip2_inputs()
    lm, vision, q_self, q_cross = _eager_references(inputs)
    assert [tuple(c.shape) for c in q_cross] == [(2, 2, QUERIES, 17)] * 2  # class token + 4 x 4 patches
    with TransformerAttentionHooker(model) as hooker:
        with torch.no_grad():
            model(**inputs)
    values = hooker.values
    pairs = [(f"language_model.model.decoder.layers.{i}.self_attn", lm[i]) for i in range(2)]
    pairs += [(f"qformer.encoder.layer.{i}.attention.attention", q_self[i]) for i in range(2)]
    pairs += [(f"qformer.encoder.layer.{i}.crossattention.attention", q_cross[i]) for i in range(2)]
    pairs += [("vision_model.encoder.layers.0.self_attn", vision[0])]
    for name, want in pairs:
        (got,) = values[name]
        real = inputs["attention_mask"][:, None, :, None].bool().expand_as(want) if "language" in name else \
            torch.ones_like(want, dtype=torch.bool)  # padded query rows of the language model mean nothing
        torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=0, msg=name)

    tokens = image_token_map(model, inputs)
    captured_cross = [values[f"qformer.encoder.layer.{i}.crossattention.attention"][0] for i in range(2)]
    lm_map = values["language_model.model.decoder.layers.1.self_attn"][0]
    for b in range(2):
        chain = image_attention_through_queries(lm_map, tokens, captured_cross, batch=b, queries=[-2, -1],
                                                qformer_heads=[1])
        (image,) = chain.images
        assert image == b
        positions = tokens.in_row(b).position
        for h in range(2):
            for qi, q in enumerate((-2, -1)):
                hand = torch.zeros(17, dtype=torch.float64)
                for j in range(QUERIES):
                    mixed = (q_cross[0][b, 1, j].double() + q_cross[1][b, 1, j].double()) / 2
                    hand += lm[1][b, h, q, positions[j]].double() * mixed
                torch.testing.assert_close(chain.weights[b][h, qi], hand, atol=1e-6, rtol=0)
                torch.testing.assert_close(chain.class_token[b][h, qi], hand[0], atol=1e-6, rtol=0)
                torch.testing.assert_close(chain.grids[b][h, qi], hand[1:].reshape(4, 4), atol=1e-6, rtol=0)
                share = lm[1][b, h, q, positions].double().sum()
                torch.testing.assert_close(chain.share[b][h, qi], share, atol=1e-6, rtol=0)
                assert float(share) < 1 - 1e-3  # the rest went to text: nothing renormalised
        torch.testing.assert_close(chain.weights[b].sum(-1), chain.share[b], atol=1e-6, rtol=0)
        torch.testing.assert_close(chain.share_by_image(), chain.share[b][..., None])  # (heads, q, 1 image)
        last_head = image_attention_through_queries(lm_map, tokens, captured_cross, batch=b, queries=[-1], heads=[-1],
                                                    qformer_heads=[1])
        torch.testing.assert_close(last_head.weights[b][0], chain.weights[b][1, 1:])  # head -1 is head 1


def test_chain_refuses_maps_that_do_not_fit_the_table():
    model = tiny_blip2()
    inputs, _ = blip2_inputs()
    tokens = image_token_map(model, inputs)
    lm = torch.full((2, 1, 8, 8), 1 / 8)
    with pytest.raises(AttentionHookerError, match="17 vision tokens|vision tokens, expected the class token"):
        image_attention_through_queries(lm, tokens, [torch.full((2, 1, QUERIES, 10), 0.1)])
    with pytest.raises(AttentionHookerError, match="hold 1 images but the token table 2"):
        image_attention_through_queries(lm, tokens, [torch.full((1, 1, QUERIES, 17), 1 / 17)])
    with pytest.raises(AttentionHookerError, match=r"Q-Former layers \[2\] out of range for 1 maps"):
        image_attention_through_queries(lm, tokens, [torch.full((2, 1, QUERIES, 17), 1 / 17)], qformer_layers=[2])
    llava_like = image_token_map(transformers.LlavaConfig(
        vision_config=dict(image_size=32, patch_size=8), image_token_id=50), dict(input_ids=torch.tensor([[50] * 16])))
    with pytest.raises(AttentionHookerError, match="expected a table of Q-Former query tokens"):
        image_attention_through_queries(torch.full((1, 1, 16, 16), 1 / 16), llava_like, [torch.ones(1, 1, 1, 1)])


def test_generate_step_calls_equal_eager_per_step_attentions():
    model, eager = tiny_blip2("sdpa"), tiny_blip2("eager")
    inputs, _ = blip2_inputs()
    kwargs = dict(inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(model, layer_regex=LM) as hooker:
            generated = model.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    layers = list(hooker.values.values())
    assert [len(calls) for calls in layers] == [3, 3]
    mask = inputs["attention_mask"]
    for step, expected in enumerate(reference.attentions):
        real = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1)[:, -expected[0].shape[2]:].bool()
        for calls, want in zip(layers, expected):
            got = calls[step]
            assert got.shape == want.shape
            keep = real[:, None, :, None].expand_as(got)
            torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=0)


def tiny_blip2_t5(attn="sdpa"):
    """BLIP-2 over an encoder-decoder language model (the Flan-T5 variant): the query tokens are in the
    encoder's input, and the decoder reads them through its cross-attention."""
    config = transformers.Blip2Config(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2),
        qformer_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=16, cross_attention_frequency=1, vocab_size=64),
        text_config=dict(model_type="t5", d_model=16, d_kv=8, d_ff=16, num_layers=1, num_decoder_layers=1,
                         num_heads=2, vocab_size=64, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0),
        num_query_tokens=QUERIES, image_token_index=IMAGE)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # as in tiny_blip2
        for name, weight in model.named_parameters():
            if weight.dim() >= 2 and not name.startswith("language_model."):
                weight.normal_(0, 0.5)
    model.set_attn_implementation(attn)
    return model


def test_t5_variant_query_tokens_and_the_chain_through_the_decoders_cross_attention():
    model, eager = tiny_blip2_t5("sdpa"), tiny_blip2_t5("eager")
    inputs, _ = blip2_inputs()
    inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
    tokens = image_token_map(model, inputs)
    found = sources_by_perturbation(model, inputs, tower=model.vision_model, language_model=model.language_model,
                                    patch=8)
    assert claimed_sources(tokens) == found and len(found) == 2 * QUERIES
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).language_model_outputs
        features = eager.get_image_features(inputs["pixel_values"])
        embeds = features.last_hidden_state
        q_cross = eager.qformer(query_embeds=eager.query_tokens.expand(2, -1, -1), encoder_hidden_states=embeds,
                                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                                output_attentions=True).cross_attentions
    with TransformerAttentionHooker(model) as hooker:
        with torch.no_grad():
            model(**inputs)
    values = hooker.values
    real = inputs["attention_mask"][:, None, :, None].bool()
    enc = values["language_model.encoder.block.0.layer.0.SelfAttention"][0]
    want = reference.encoder_attentions[0]
    torch.testing.assert_close(enc[real.expand_as(enc)], want[real.expand_as(want)], atol=1e-6, rtol=0)
    (cross,) = values["language_model.decoder.block.0.layer.1.EncDecAttention"]
    torch.testing.assert_close(cross, reference.cross_attentions[0], atol=1e-6, rtol=0)
    (q_map,) = values["qformer.encoder.layer.0.crossattention.attention"]
    torch.testing.assert_close(q_map, q_cross[0], atol=1e-6, rtol=0)
    for b in range(2):  # a decoder token's attention on the patches, through the encoder positions of the queries
        chain = image_attention_through_queries(cross, tokens, [q_map], batch=b, queries=[-1])
        positions = tokens.in_row(b).position
        hand = torch.einsum("hj,jv->hv", reference.cross_attentions[0][b, :, -1, positions].double(),
                            q_cross[0][b].double().mean(0))
        torch.testing.assert_close(chain.weights[b][:, 0], hand, atol=1e-6, rtol=0)


def test_t5_variant_generate_step_cross_attention_equals_eager():
    model, eager = tiny_blip2_t5("sdpa"), tiny_blip2_t5("eager")
    inputs, _ = blip2_inputs()
    kwargs = dict(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = eager.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
        with TransformerAttentionHooker(model, layer_regex=r"EncDecAttention$") as hooker:
            generated = model.generate(**kwargs)
    assert torch.equal(generated, reference.sequences)
    (calls,) = hooker.values.values()
    assert len(calls) == len(reference.cross_attentions) == 3
    for step, (want,) in enumerate(reference.cross_attentions):  # one decoder layer: (B, H, 1, encoder keys)
        torch.testing.assert_close(calls[step], want, atol=1e-6, rtol=0)
