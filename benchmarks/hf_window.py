"""One training step of a Hugging Face model with attn_implementation "maskattn" against "sdpa" (and "eager").

Two cases, fp32 on the CPU, B=1, forward + backward of the language-model loss:

* ``window``: a Mistral-style model (hidden 256, 4 layers, 8 heads, 2 key/value heads, sliding window
  256) on ``--n`` tokens: maskattn gets ``sliding_window(256) & causal()``, sdpa a dense (1, 1, N, N) mask;
* ``packed``: the same model without a window, ``--docs`` documents packed into ``--n`` tokens (position
  ids that restart): maskattn gets ``causal() & document(ids)``, sdpa a dense mask.

The implementations are interleaved, median of ``--repeats`` after one warm-up, in which each row's loss is
compared with ``sdpa``'s: a row further than ``LOSS_TOLERANCE`` is WRONG, not timed, and the exit status is
non-zero. ``eager`` only up to
``--eager-max`` tokens (it materialises the (B, H, N, N) scores in every layer). With ``--memory``, the
extra peak RSS of one step is measured in a fresh subprocess per row (as in benchmarks/attention.py).
With ``--compile BACKEND`` (``inductor``, ``aot_eager``), rows ``maskattn+compile`` and ``sdpa+compile`` time
``torch.compile(model, fullgraph=True, backend=BACKEND)`` of a model of their own (the warm-up compiles).

    python -m benchmarks.hf_window [--n 8192] [--memory] [--compile inductor]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.args import count, positive_int
from benchmarks.attention import extra_peak_mb, machine

IMPLS = ("maskattn", "sdpa", "eager")
LOSS_TOLERANCE = 1e-4  # largest |loss - sdpa's loss| of a row before it is timed (fp32)
CASES = ("window", "packed")


def build(case: str, args: argparse.Namespace):
    """The model (train mode, no dropout) and its inputs for one case."""
    import transformers

    from maskattn import hf

    hf.register()
    config = transformers.MistralConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4), max_position_embeddings=args.n,
        sliding_window=args.window if case == "window" else None, attention_dropout=0.0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).train()
    ids = torch.randint(0, 1000, (1, args.n), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    if case == "packed":
        size = args.n // args.docs
        inputs["position_ids"] = (torch.arange(args.n) % size)[None]  # (1, N): restarts at every document
    return model, inputs


def step(model, inputs, impl: str, run=None) -> torch.Tensor:
    """One forward + backward; ``run``: a compiled ``model`` to call instead. Returns the loss (detached)."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(**inputs).loss
    loss.backward()
    return loss.detach()


def wrong_rows(losses: dict[str, float]) -> dict[str, float]:
    """``{row: |loss - sdpa's loss|}`` of the rows beyond ``LOSS_TOLERANCE`` (NaN too)."""
    errors = {row: abs(loss - losses["sdpa"]) for row, loss in losses.items()}
    return {row: err for row, err in errors.items() if not err <= LOSS_TOLERANCE}


def time_rows(case: str, rows: dict, inputs: dict, repeats: int) -> tuple[dict[str, list[float]], int]:
    """Seconds of each row's step, interleaved, after one warm-up round whose losses are compared with sdpa's:
    a row beyond ``LOSS_TOLERANCE`` is printed as WRONG and dropped from ``rows``. Returns (times, rows dropped)."""
    times: dict[str, list[float]] = {row: [] for row in rows}
    losses: dict[str, float] = {}
    dropped = 0
    for rep in range(repeats + 1):
        for row, (m, impl, run) in rows.items():
            start = time.perf_counter()
            loss = step(m, inputs, impl, run)
            if rep:  # the first round is the warm-up (and the compile)
                times[row].append(time.perf_counter() - start)
            else:
                losses[row] = loss.item()
        wrong = wrong_rows(losses) if not rep else {}
        for row, err in wrong.items():
            print(f"{case:8} {row:16} WRONG: loss {losses[row]:.6f}, sdpa's {losses['sdpa']:.6f}, difference "
                  f"{err:.2e} (tolerance {LOSS_TOLERANCE:.0e}); not timed", flush=True)
            del rows[row], times[row]
            dropped += 1
    return times, dropped


def memory_here(case: str, impl: str, args: argparse.Namespace) -> float:
    """Extra peak RSS (MB) of one step, in this (fresh) process, after one on 16 tokens (the one-time set-up)."""
    model, inputs = build(case, args)
    model.set_attn_implementation(impl)
    short = {name: value[:, :16] if torch.is_tensor(value) else value for name, value in inputs.items()}
    return extra_peak_mb(lambda: step(model, inputs, impl), warmup=lambda: step(model, short, impl))


def memory(case: str, impl: str, argv: list[str]) -> float:
    cmd = [sys.executable, "-m", "benchmarks.hf_window", *argv, "--memory-child", case, impl]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_window", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=positive_int, default=8192, help="tokens (default: %(default)s)")
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--window", type=positive_int, default=256)
    p.add_argument("--docs", type=positive_int, default=8, help="documents in the packed case (default: %(default)s)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--eager-max", type=count, default=4096, help="run eager only up to this many tokens")
    p.add_argument("--memory", action="store_true", help="also measure peak memory, one subprocess per row")
    p.add_argument("--compile", metavar="BACKEND", help="also time maskattn and sdpa under torch.compile(fullgraph="
                   "True, backend=BACKEND), e.g. inductor")
    p.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = sorted(set(args.cases.split(",")) - set(CASES))
    if bad:
        p.error(f"--cases: unknown {bad}; expected some of {list(CASES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.memory_child:
        print(memory_here(*args.memory_child, args))
        return
    shape = [a for a in argv if a != "--memory"]
    print(f"# {machine()}  N={args.n} hidden={args.hidden} layers={args.layers} heads={args.heads} "
          f"window={args.window} docs={args.docs}")
    print(f"{'case':8} {'impl':16} {'step ms':>9} {'x sdpa':>7} {'peak MB':>8}")
    failed = 0
    for case in args.cases.split(","):
        model, inputs = build(case, args)
        rows = {impl: (model, impl, None) for impl in IMPLS if impl != "eager" or args.n <= args.eager_max}
        if args.compile:
            for impl in ("maskattn", "sdpa"):
                own = build(case, args)[0]
                own.set_attn_implementation(impl)
                rows[f"{impl}+compile"] = (own, impl, torch.compile(own, fullgraph=True, backend=args.compile))
        times, wrong = time_rows(case, rows, inputs, args.repeats)
        failed += wrong
        if "sdpa" not in times:  # a NaN loss: every row is WRONG
            continue
        base = statistics.median(times["sdpa"])
        for row, (_, impl, run) in rows.items():
            t = statistics.median(times[row])
            peak = f"{memory(case, impl, shape):8.0f}" if args.memory and run is None else f"{'-':>8}"
            print(f"{case:8} {row:16} {t * 1e3:9.1f} {base / t:7.2f} {peak}")
    if failed:
        sys.exit(f"{failed} row(s) gave a loss other than sdpa's and were not timed (see above)")


if __name__ == "__main__":
    main()
