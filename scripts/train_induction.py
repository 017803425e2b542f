"""Trains the toy induction model shipped in attention_hooker/examples/induction (Olsson et al. 2022's set-up):
a 2-layer attention-only transformer on random tokens repeated twice, next-token loss on every position.

    python scripts/train_induction.py                      # the shipped weights (a few minutes on 2 CPU cores)
    python scripts/train_induction.py --steps 40 --out DIR/model.safetensors   # a short run elsewhere (the tests)

Training draws fresh sequences each step from one generator seeded with --seed; the model is initialised
after torch.manual_seed(--seed). The weights are written with a record beside them (model.json: the config,
the seed, these options, the loss every --log-every steps, and the losses of each half measured at the end
on --eval-batch held-out sequences drawn from a generator seeded with --seed + 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from attention_hooker import AttentionHookerError
from attention_hooker.examples.induction import (WEIGHTS, AttentionOnlyTransformer, InductionConfig, half_losses,
                                                 repeated_random_tokens, save_induction_model, training_tokens)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = InductionConfig()
    p.add_argument("--out", default=str(WEIGHTS), help="the .safetensors file to write (its .json record beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shortest", type=int, default=12, help="the shortest repeated segment in training")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=1000)
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    for name in ("vocab", "half", "d_model", "heads", "layers"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--no-final-norm", action="store_true")
    return p.parse_args(argv)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = InductionConfig(vocab=args.vocab, half=args.half, d_model=args.d_model, heads=args.heads,
                             layers=args.layers, final_norm=not args.no_final_norm)
    model = AttentionOnlyTransformer(config)
    data = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    history, start, running = [], time.perf_counter(), []
    for step in range(1, args.steps + 1):
        ids = training_tokens(args.batch, config, shortest=args.shortest, generator=data)  # (B, 2L)
        logits = model(ids)  # (B, 2L, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if step % args.log_every == 0 or step in (1, args.steps):
            with torch.no_grad():
                probe = repeated_random_tokens(args.eval_batch, config, generator=torch.Generator().manual_seed(args.seed + 2))
                halves = half_losses(model(probe), probe, config.half)
            history.append({"step": step, "loss": sum(running) / len(running), "first": halves.first,
                            "repeated": halves.repeated})
            running = []
            print(f"step {step:5d}  training loss {history[-1]['loss']:.3f}  on x x: first half {halves.first:.3f}  "
                  f"repeated half {halves.repeated:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        held_out = repeated_random_tokens(args.eval_batch, config, generator=torch.Generator().manual_seed(args.seed + 1))
        halves = half_losses(model(held_out), held_out, config.half)
    losses = {"first": halves.first, "repeated": halves.repeated, "uniform": math.log(config.vocab),
              "eval_batch": args.eval_batch, "eval_seed": args.seed + 1}
    training = {"steps": args.steps, "batch": args.batch, "shortest": args.shortest, "optimizer": "AdamW", "lr": args.lr,
                "weight_decay": args.weight_decay, "threads": args.threads, "seconds": round(time.perf_counter() - start, 1),
                "history_on": f"{args.eval_batch} sequences x x drawn with seed {args.seed + 2}", "history": history}
    path = save_induction_model(model, args.out, seed=args.seed, training=training, losses=losses)
    print(f"held-out loss: first half {halves.first:.3f} (ln {config.vocab} = {math.log(config.vocab):.3f}), "
          f"repeated half {halves.repeated:.3f}; wrote {path}")
    return losses


def main(argv=None) -> int:
    try:
        train(parse(sys.argv[1:] if argv is None else argv))
    except AttentionHookerError as err:  # a bad option: one readable line
        print(f"train_induction.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
