"""The output projection of a decoding step: ``F.linear`` against the layouts ``step_logits`` picks.

A step of a few rows against a large vocabulary matrix is bound by reading the matrix, and on CPU that speed
depends on the layout. For each row count this times, interleaved, ``head(h)`` (``F.linear`` on the (V, E)
weight) and ``maskattn.models.common.step_logits`` (one row: a contiguous (E, V) copy; 2-8 rows:
(V, E) @ (E, rows); more: ``F.linear`` again), each followed by the argmax greedy decoding takes, and prints the
median milliseconds and the ratio. The outputs are checked equal first.

    OMP_NUM_THREADS=2 python -m benchmarks.lm_head                    # GPT-2's 50,257 x 256
    python -m benchmarks.lm_head --vocab 512 --width 32 --repeats 1  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.args import output_path, positive_int, positive_ints
from benchmarks.attention import provenance
from maskattn.models.common import head_copy_pays, step_logits


def time_ms(call, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        call()
    return (time.perf_counter() - start) / inner * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=positive_int, default=50257)
    parser.add_argument("--width", type=positive_int, default=256)
    parser.add_argument("--rows", type=positive_ints, default="1,2,4,8,16", help="comma-separated row counts")
    parser.add_argument("--repeats", type=positive_int, default=7, help="interleaved rounds; the median is reported")
    parser.add_argument("--inner", type=positive_int, default=10, help="calls per timed round")
    parser.add_argument("--json", type=output_path, help="also write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    head = nn.Linear(args.width, args.vocab, bias=False).eval()
    result = {"machine": provenance("benchmarks.lm_head", argv), "threads": torch.get_num_threads(),
              "vocab": args.vocab, "width": args.width, "rows": {}}
    with torch.no_grad():
        for rows in (int(r) for r in args.rows.split(",")):
            h = torch.randn(rows, 1, args.width)
            state = SimpleNamespace(head_t=None, head_copy_ok=head_copy_pays(rows, steps=256))
            torch.testing.assert_close(step_logits(state, head, h), head(h), atol=1e-4, rtol=1e-4)  # makes the copy
            calls = {"linear": lambda h=h: head(h).argmax(-1),
                     "step_logits": lambda h=h, state=state: step_logits(state, head, h).argmax(-1)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    times[name].append(time_ms(call, args.inner))
            ms = {name: statistics.median(t) for name, t in times.items()}
            result["rows"][str(rows)] = {**ms, "speedup": ms["linear"] / ms["step_logits"]}
            print(f"rows {rows:3d}: F.linear {ms['linear']:7.2f} ms   step_logits {ms['step_logits']:7.2f} ms   "
                  f"{ms['linear'] / ms['step_logits']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
