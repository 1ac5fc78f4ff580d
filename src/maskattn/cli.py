"""The ``maskattn`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="draw every kind of mask and check attention against PyTorch")
    demo.add_argument("--length", type=int, default=8, help="sequence length of the pictures")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from maskattn.demo import run

        worst = run(length=args.length)
        return 0 if worst < 1e-10 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
