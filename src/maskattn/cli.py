"""The ``maskattn`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small Transformer to translate written dates to ISO dates")
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--steps", type=int, default=800, help="training steps")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    demo.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    showcase = sub.add_parser("showcase", help="draw every kind of mask and check attention against PyTorch")
    showcase.add_argument("--length", type=int, default=8, help="sequence length of the pictures")
    mask_cmd = sub.add_parser("masks", help="draw masks written as expressions").add_subparsers(
        dest="masks_command", required=True)
    show = mask_cmd.add_parser("show", help="render a mask expression as text (and optionally PNG)",
                               description="Expression: names causal, full, window(n), padding(n,...), "
                               "prefix(n), document(len,...), combined with &, |, ~ and parentheses.")
    show.add_argument("expression", help='e.g. "causal & window(4)"')
    show.add_argument("--length", type=int, default=16, help="query and key length")
    show.add_argument("--keys", type=int, default=None, help="key length (default: --length)")
    show.add_argument("--q-offset", type=int, default=0, help="absolute position of the first query")
    show.add_argument("--png", default=None, help="also write a PNG picture here")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from maskattn.demo import run as demo

        result = demo(out=args.out, steps=args.steps, seed=args.seed, resume=args.resume)
        return 0 if result["exact_match"] >= 99.0 else 1
    if args.command == "showcase":
        from maskattn.showcase import run as showcase

        worst = showcase(length=args.length)
        return 0 if worst < 1e-10 else 1
    if args.command == "masks":
        return _masks_show(args)
    return 2


def _masks_show(args: argparse.Namespace) -> int:
    from maskattn.mask_expr import MaskSyntaxError, parse

    try:
        mask = parse(args.expression)
        print(mask.render(args.length, args.keys, q_offset=args.q_offset))
        if args.png:
            mask.plot(args.length, args.keys, q_offset=args.q_offset, path=args.png)
            print(f"wrote {args.png}")
    except (MaskSyntaxError, ValueError) as e:
        print(f"maskattn masks show: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
