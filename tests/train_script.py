"""A tiny training run driven as a subprocess by test_training.py (kill -9 and resume, torchrun)."""

import argparse
import os
import time

import torch
from torch import nn

from maskattn import MultiHeadAttention, distributed, masks
from maskattn.data import bucket_batches
from maskattn.plotting import plot_curves
from maskattn.training import TrainConfig, Trainer


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MultiHeadAttention(8, 2, dropout=0.1)
        self.out = nn.Linear(8, 1)

    def forward(self, x, lengths):
        return self.out(self.attn(x, mask=masks.causal() & masks.padding(lengths))).squeeze(-1)


def make_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    x = torch.randn(n, 8, 8, generator=g)
    y = x.sum(-1).cumsum(-1) / 10
    return x, y, lengths


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--double", action="store_true", help="float64, to compare runs that sum in different orders")
    p.add_argument("--exit-after", type=int, default=0, help="die (os._exit, as a kill would) in step N + 1")
    p.add_argument("--nan-in-step", type=int, default=0, help="rank 1's loss is NaN in step N (rank 0's is not)")
    p.add_argument("--out-per-rank", action="store_true", help="each process its own run directory OUT-RANK")
    args = p.parse_args(argv)
    context = distributed.init(device="cpu")  # joins the process group under torchrun (gloo: it trains on the CPU)
    out = f"{args.out}-{context.rank}" if args.out_per_rank else args.out
    calls = [0]
    torch.manual_seed(0)
    model = TinyModel()
    model.attn.dropout = args.dropout
    x, y, lengths = make_data()
    if args.double:
        model, x, y = model.double(), x.double(), y.double()

    def collate(idx):
        return {"x": x[idx], "y": y[idx], "lengths": lengths[idx], "num_targets": int(lengths[idx].sum())}

    def loss(m, b):
        if args.sleep:
            time.sleep(args.sleep)
        calls[0] += 1
        if args.exit_after and calls[0] > args.exit_after * args.accumulate:
            os._exit(3)
        valid = torch.arange(8)[None] < b["lengths"][:, None]
        loss = ((m(b["x"], b["lengths"]) - b["y"]) ** 2 * valid).sum()
        if context.rank == 1 and trainer.step == args.nan_in_step:
            loss = loss * float("nan")
        return loss

    cfg = TrainConfig(steps=args.steps, lr=1e-2, warmup=3, checkpoint_every=args.checkpoint_every,
                      accumulate=args.accumulate, progress=False, log_every=1, seed=3)
    trainer = Trainer(model, cfg, plan=lambda e: bucket_batches(lengths.tolist(), args.max_tokens, seed=3, epoch=e),
                      collate=collate, loss=loss, out_dir=out, device="cpu",
                      rank=context.rank, world_size=context.world_size)
    if args.resume:
        trainer.resume()
    trainer.fit()
    if context.is_main:
        plot_curves(trainer.out_dir / "metrics.jsonl")  # as `maskattn train` does: curves.png beside it


if __name__ == "__main__":
    main()
