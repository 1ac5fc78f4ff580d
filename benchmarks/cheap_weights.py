"""What looking at attention costs: weights recomputed from the log-sum-exp vs the dense rerun.

A decoder-only model (4 layers, 8 heads, d_model 256) reads one sequence of N tokens (causal
mask); we capture the weights of 2 heads x 4 query rows of one layer with
``capture_attention(method="lse")`` (fast backends, weights recomputed from the log-sum-exp) and with
``method="rerun"`` (every chosen call asked again with ``return_weights=True``: the dense reference
path), against the plain forward. Each method runs in a fresh subprocess, which reports its wall
time (median of 3 after a full-size call) and the peak resident memory of that call above what the process held
before it (after a 64-token warm-up: :func:`measure`).

    python -m benchmarks.cheap_weights [--sizes 2048,4096,8192]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.args import output_path, positive_ints
from benchmarks.attention import extra_peak_mb, provenance
from maskattn.models import DecoderLM, DecoderLMConfig
from maskattn.viz import capture_attention

METHODS = ["plain", "lse", "rerun"]


def measure(run_at: Callable[[int], Callable[[], object]], n: int) -> tuple[float, float]:
    """Median seconds of 3 calls of ``run_at(n)``, and the extra peak RSS (MB) of the first full-size call before
    them. The warm-up before that call is a small one (``run_at(64)``): the libraries' one-time set-up is not
    counted, and no full-size call has run whose freed memory the allocator keeps for the measured one to reuse
    (a full-size warm-up read N = 1024's plain forward as 8.9 MB instead of 17.5 MB)."""
    peak = extra_peak_mb(run_at(n), warmup=run_at(min(n, 64)))
    run, times = run_at(n), []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def child(method: str, n: int) -> dict:
    torch.manual_seed(0)
    cfg = DecoderLMConfig(vocab_size=1000, d_model=256, num_heads=8, num_layers=4, d_ff=1024, max_len=n)
    model = DecoderLM(cfg).eval()

    def run_at(length: int) -> Callable[[], object]:
        x = torch.randint(0, 1000, (1, length))
        rows = [0, length // 3, length // 2, length - 1]

        def run():
            with torch.no_grad():
                if method == "plain":
                    return model(x)
                with capture_attention(model, layers=["decoder.layers.2.*"], heads=[0, 5], rows=rows,
                                       method=method) as got:
                    model(x)
                return got

        return run

    seconds, peak = measure(run_at, n)
    return {"method": method, "n": n, "seconds": seconds, "peak_extra_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=positive_ints, default="2048,4096,8192")
    p.add_argument("--json", type=output_path, default="benchmarks/results/cheap-weights.json")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    results = []
    print(f"{'N':>6} {'method':>6} {'seconds':>8} {'peak extra MB':>14}")
    for n in map(int, args.sizes.split(",")):
        for method in METHODS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.cheap_weights", "--child", method, str(n),
                                  "--json", os.devnull],  # the child writes nothing: its default need not exist
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{n:>6} {method:>6} {row['seconds']:8.3f} {row['peak_extra_mb']:14.1f}")
    with open(args.json, "w") as f:
        json.dump({"machine": provenance("benchmarks.cheap_weights"), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
