"""An independent oracle for the SST-2 fine-tune: the same checkpoint fine-tuned by Hugging Face code.

maskattn's fine-tunes of all-MiniLM-L6-v2 land at 88-90% on held-out sentences however they are set up
(docs/results.md, rounds two to nine). This recipe asks whether that is the checkpoint or our stack: it
fine-tunes the same weights with ``transformers``' own ``AutoModelForSequenceClassification`` (BERT's
pretrained pooler on [CLS], then a new linear layer) in the recipe of the GLUE examples (random batches of
32 rows, AdamW with weight decay 0.01, linear decay after a warm-up, fp32), and prints the validation
accuracy as it goes::

    python -m recipes.sst2_hf_baseline MODEL_DIR runs/sst2-split/train.tsv runs/sst2-split/valid.tsv \\
        --out runs/sst2-hf --lr 5e-5 --epochs 2 --eval-every 500

The checkpoint best on validation is kept in memory; with ``--test`` it is scored on that file once, at
the end. Needs the ``hf`` extra (``pip install -e .[hf]``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from recipes import errors_in_one_line
from recipes.sst2_sentences import read_tsv


def batches(rows: Sequence[tuple[str, int]], size: int, rng: random.Random) -> list[list[tuple[str, int]]]:
    order = list(rows)
    rng.shuffle(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def accuracy(model, tokenizer, rows: Sequence[tuple[str, int]], max_len: int, size: int = 128) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            enc = tokenizer([t for t, _ in part], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            guess = model(**enc).logits.argmax(-1)  # (B,)
            right += int((guess == torch.tensor([y for _, y in part])).sum())
    model.train()
    return right / len(rows)


def labelled(path: Path) -> list[tuple[str, int]]:
    """The rows of an SST-2 TSV with their 0/1 labels; ValueError naming the file and line of a bad one."""
    _, rows = read_tsv(path)
    if not rows:
        raise ValueError(f"{path}: no rows under its header")
    for number, (_, label) in enumerate(rows, start=2):  # the classifier has two outputs
        if label not in ("0", "1"):
            raise ValueError(f"{path}:{number}: label must be 0 or 1 (SST-2's), got {label!r}")
    return [(text, int(label)) for text, label in rows]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a BERT checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("train", type=Path)
    parser.add_argument("valid", type=Path)
    parser.add_argument("--test", type=Path, help="score the checkpoint best on validation here, once")
    parser.add_argument("--out", type=Path, required=True, help="directory for log.json")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=0.06, help="share of the steps spent warming up")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, value, ok, expected in (
            ("--epochs", args.epochs, math.isfinite(args.epochs) and args.epochs > 0, "a number > 0"),
            ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "a number > 0"),
            ("--warmup", args.warmup, 0 <= args.warmup <= 1, "a share of the steps in [0, 1]"),
            *((f"--{name.replace('_', '-')}", getattr(args, name), getattr(args, name) >= 1, "an int >= 1")
              for name in ("batch_size", "max_len", "eval_every"))):
        if not ok:
            parser.error(f"{flag} must be {expected}, got {value!r}")
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise SystemExit("recipes.sst2_hf_baseline needs transformers: pip install -e '.[hf]'") from None

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    with errors_in_one_line(parser):
        train, valid = labelled(args.train), labelled(args.valid)
        test = labelled(args.test) if args.test is not None else None
    if not (Path(args.model) / "config.json").is_file():  # else transformers' words on Hub ids and connections
        parser.error(f"{args.model}: no config.json; expected a BERT checkpoint directory (config.json, weights, "
                     "tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on biases and norms
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr)
    steps = math.ceil(args.epochs * math.ceil(len(train) / args.batch_size))
    warmup = int(args.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))

    args.out.mkdir(parents=True, exist_ok=True)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": steps, "valid": []}
    best, best_step, best_state, step, start = -1.0, 0, None, 0, time.time()
    model.train()
    while step < steps:
        for part in batches(train, args.batch_size, rng):
            enc = tokenizer([t for t, _ in part], padding=True, truncation=True, max_length=args.max_len,
                            return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([y for _, y in part])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % args.eval_every == 0 or step == steps:
                acc = accuracy(model, tokenizer, valid, args.max_len)
                log["valid"].append({"step": step, "accuracy": acc, "seconds": round(time.time() - start)})
                print(f"step {step}/{steps} loss {loss.item():.4f} valid accuracy {100 * acc:.1f}", flush=True)
                if acc > best:
                    best, best_step = acc, step
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                (args.out / "log.json").write_text(json.dumps(log, indent=1) + "\n")
            if step == steps:
                break
    log["best"] = {"step": best_step, "valid accuracy": best}
    print(f"best on validation: step {best_step}, accuracy {100 * best:.1f}")
    if args.test is not None:
        model.load_state_dict(best_state)
        log["best"]["test accuracy"] = accuracy(model, tokenizer, test, args.max_len)
        print(f"test accuracy of the step-{best_step} checkpoint: {100 * log['best']['test accuracy']:.1f}")
    (args.out / "log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    main()
