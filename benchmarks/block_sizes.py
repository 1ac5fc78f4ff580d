"""Tile sizes of the ``blocked`` backend: forward + backward at one N for each (block_q, block_k),
against SDPA with the dense mask tensor and ``auto``, in the same run (the shapes of
benchmarks/attention.py: B=1, H=8, D=64). Each output is first compared with benchmarks/attention.py's float64
reference rows: one beyond its tolerance is WRONG, not timed, and the exit status is non-zero::

    OMP_NUM_THREADS=2 python -m benchmarks.block_sizes --masks window,document --n 8192
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch

from benchmarks import attention
from benchmarks.attention import MASKS, B, D, H, make_impls, make_mask
from maskattn.backends import blocked
from maskattn.cli import positive_int

TILES = [(128, 128), (64, 64), (64, 128), (128, 64), (256, 128), (128, 256), (256, 256)]


def seconds(run: Callable, n: int, repeats: int) -> float:
    """Best time of ``repeats`` forward + backward passes after one warm-up."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_() for _ in range(3))
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        run(q, k, v).sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def error(run: Callable, mask, n: int) -> float | None:
    """Largest |output - reference| of ``run`` when beyond the fp32 tolerance (printed as WRONG), else None."""
    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(B, H, n, D, generator=g) for _ in range(3))  # the inputs seconds() times
    err = attention.disagreement(run, qkv, attention.reference_rows(mask, n, qkv))
    return err if attention.wrong_outputs({"run": err}, torch.float32) else None


def timed(label: str, run: Callable, mask, n: int, repeats: int) -> float:
    """Seconds of :func:`seconds`, or NaN (not timed) after printing WRONG when ``run`` disagrees."""
    err = error(run, mask, n)
    if err is None:
        return seconds(run, n, repeats)
    print(f"{label} WRONG: output differs from the reference by {err:.2e} (tolerance "
          f"{attention.TOLERANCE[torch.float32]:.0e}); not timed", flush=True)
    return math.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", default="window,document", help="mask kinds of benchmarks/attention.py")
    p.add_argument("--n", type=positive_int, default=8192, help="sequence length")
    p.add_argument("--repeats", type=positive_int, default=3)
    args = p.parse_args()
    bad = sorted(set(args.masks.split(",")) - set(MASKS))
    if bad:
        p.error(f"--masks: unknown {bad}; expected some of {MASKS}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n}, best of {args.repeats}")
    wrong = 0
    for kind in args.masks.split(","):
        mask = make_mask(kind, args.n)
        impls = make_impls(["sdpa_mask", "auto"], mask, args.n)
        base = timed(f"{kind:9} sdpa_mask ", impls["sdpa_mask"], mask, args.n, args.repeats)
        if not math.isnan(base):
            print(f"{kind:9} sdpa_mask  {base * 1e3:8.1f} ms", flush=True)
        runs = {f"{kind:9} auto      ": impls["auto"]}
        for bq, bk in TILES:
            def run(q, k, v, bq=bq, bk=bk, mask=mask):
                return blocked.attention(q, k, v, mask, scale=D**-0.5, block_q=bq, block_k=bk)[0]

            runs[f"{kind:9} {bq:4d} x {bk:<4d}"] = run
        for label, run in runs.items():
            t = timed(label, run, mask, args.n, args.repeats)
            wrong += math.isnan(t)
            if not math.isnan(t):
                print(f"{label} {t * 1e3:8.1f} ms  {base / t:5.2f}x", flush=True)
        wrong += math.isnan(base)
    if wrong:
        sys.exit(f"{wrong} configuration(s) gave wrong outputs and were not timed (see above)")


if __name__ == "__main__":
    main()
