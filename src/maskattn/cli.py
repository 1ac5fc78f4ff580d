"""The ``maskattn`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="draw every kind of mask and check attention against PyTorch")
    demo.add_argument("--length", type=int, default=8, help="sequence length of the pictures")
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
        from maskattn.demo import run

        worst = run(length=args.length)
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
