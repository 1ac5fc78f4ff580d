"""How noisy nanoGPT's reported validation loss is: its 20-batch estimate, repeated, against our full-split loss.

nanoGPT's CPU run reports ``estimate_loss()`` with ``eval_iters=20``: the mean loss of 20 random
batches of 12 x 64 characters from the last 10% of tiny Shakespeare. This draws that estimate 200
times for one of our trained models and prints its spread and how often it would read <= 1.88.

    python -m benchmarks.nanogpt_val_estimate runs/shakespeare/model [--text ../shared/data/tinyshakespeare/input.txt]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.args import positive_int, require_file, require_model
from maskattn.tasks import lm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--text", default="../shared/data/tinyshakespeare/input.txt")
    p.add_argument("--trials", type=positive_int, default=200)
    args = p.parse_args()
    require_model(p, "model", args.model, "lm")
    require_file(p, "--text", args.text)
    model, tok, _ = lm.load(args.model)
    model.eval()
    with open(args.text) as f:
        text = f.read()
    ids = torch.tensor(tok.encode(text[int(0.9 * len(text)) :]))  # nanoGPT's split: the last 10% of characters
    gen = torch.Generator().manual_seed(0)
    estimates = []
    with torch.no_grad():
        for _ in range(args.trials):
            batches = []
            for _ in range(20):
                starts = torch.randint(len(ids) - 64, (12,), generator=gen).tolist()
                x = torch.stack([ids[i : i + 64] for i in starts])
                y = torch.stack([ids[i + 1 : i + 65] for i in starts])
                batches.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
            estimates.append(sum(batches) / len(batches))
    est = torch.tensor(estimates)
    print(f"{args.model}: {args.trials} draws of the 20-batch estimate: mean {est.mean():.4f}, sd {est.std():.4f}, "
          f"min {est.min():.4f}, max {est.max():.4f}; share <= 1.88: {(est <= 1.88).float().mean():.2f}")


if __name__ == "__main__":
    main()
