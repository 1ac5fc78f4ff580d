"""Block sizes of the blocked backend on the causal window, against SDPA given the mask tensor.

fp32, B=1, H=8, D=64, ``causal() & sliding_window(256)``, forward+backward, the configurations
interleaved, median of 5 after one warm-up. Used to choose ``blocked.BLOCK_Q`` / ``BLOCK_K``. Each output is first
compared with benchmarks/attention.py's float64 reference rows: one beyond its tolerance is WRONG, not timed, and
the exit status is non-zero.

    python -m benchmarks.blocked_window [--n 8192]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import attention
from maskattn import masks
from maskattn.backends import blocked, sdpa
from maskattn.cli import positive_int

SIZES = [(128, 128), (64, 64), (128, 64), (256, 128), (256, 256)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, default=8192)
    p.add_argument("--repeats", type=positive_int, default=5)
    args = p.parse_args()
    n = args.n
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(1, 8, n, 64, generator=gen)
    window = masks.causal() & masks.sliding_window(256)
    dense = window.to_dense(n, n)
    runs = {f"blocked {bq}x{bk}": lambda bq=bq, bk=bk: blocked.attention(q, k, v, window, scale=0.125, block_q=bq,
                                                                          block_k=bk)[0] for bq, bk in SIZES}
    runs["sdpa backend (banded)"] = lambda: sdpa.attention(q, k, v, window, scale=0.125)[0]
    runs["SDPA + mask tensor"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    reference = attention.reference_rows(window, n, (q, k, v))
    errors = {name: attention.disagreement(lambda *qkv, run=run: run(), (q, k, v), reference)
              for name, run in runs.items()}
    for name, err in attention.wrong_outputs(errors, torch.float32).items():
        print(f"{name:24} WRONG: output differs from the reference by {err:.2e} (tolerance "
              f"{attention.TOLERANCE[torch.float32]:.0e}); not timed", flush=True)
        del runs[name]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.repeats + 1):
        for name, run in runs.items():
            for x in (q, k, v):
                x.grad = None
            start = time.perf_counter()
            run().backward(grad)
            if rep:  # the first round is the warm-up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["SDPA + mask tensor"]) if "SDPA + mask tensor" in times else float("nan")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"{name:24} {t * 1e3:8.1f} ms  {base / t:5.1f}x vs SDPA + mask tensor")
    if len(runs) < len(errors):
        sys.exit(f"{len(errors) - len(runs)} configuration(s) gave wrong outputs and were not timed (see above)")


if __name__ == "__main__":
    main()
