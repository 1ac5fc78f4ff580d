"""How long ``mask.stats`` takes at long sequence lengths (issue: under 10 ms at N = 65,536 for
structured masks). Run: ``python -m benchmarks.mask_stats [--length 65536] [--repeats 5]``."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskattn import masks
from maskattn.cli import positive_int


def cases(n: int) -> list[tuple[str, masks.Mask]]:
    docs = torch.arange(4).repeat_interleave(-(-n // 4))[:n][None]
    return [
        ("causal", masks.causal()),
        ("causal & window(256)", masks.causal() & masks.sliding_window(256)),
        ("padding", masks.padding([n - n // 4])),
        ("prefix_lm(n/4)", masks.prefix_lm(n // 4)),
        ("document(4) & causal", masks.document(docs) & masks.causal()),
        ("causal & ~window(256) (no interval rows: block map)", masks.causal() & ~masks.sliding_window(256)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=positive_int, default=65536)
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args()
    print(f"mask.stats({args.length}, {args.length}), 128 x 128 tiles, median of {args.repeats} after a warm-up, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, mask in cases(args.length):
        mask.stats(args.length, args.length)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            stats = mask.stats(args.length, args.length)
            times.append(time.perf_counter() - start)
        print(f"{name:52} {1000 * statistics.median(times):7.1f} ms   density {100 * stats.density:6.2f}%")


if __name__ == "__main__":
    main()
