"""Benchmark of masked attention: maskattn's backends against PyTorch's SDPA, a naive N x N
implementation and FlexAttention, on the protocol of issue 4.

fp32 (``--dtype bfloat16``: every implementation in bf16), B=1, H=8, D=64; for each mask kind and
sequence length N every implementation is timed in forward (under ``torch.no_grad``) and in
forward+backward, the implementations interleaved within each repetition, the median taken after
warm-up. Throughput counts only the *allowed* scores:
4·D flops per allowed (query, key) pair per head for forward, 3.5 times that for forward+backward
(the FlashAttention papers' convention), and is reported as a percentage of this machine's
matmul throughput in the same dtype (4096 x 4096 x 4096), measured inside the same interleaved repetitions as
the attention calls of each configuration, so that both see the same load on a shared machine.

Peak memory of forward+backward is measured in a fresh subprocess per configuration: after the
inputs exist, the process resets its peak-RSS counter (``/proc/self/clear_refs``), runs one
forward+backward, and reports ``VmHWM - VmRSS`` before the run, i.e. the extra resident memory
the call needed at its peak (torch on CPU has no ``max_memory_allocated``); one forward+backward at N = 64
runs first, so that the libraries' one-time set-up (~40 MB) is not counted.

Run ``python -m benchmarks.attention --help``; results are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import maskattn
from benchmarks.args import count, output_path, positive_ints
from maskattn import masks
from maskattn.cli import positive_int
from maskattn.masks import Mask

B, H, D = 1, 8, 64
SIZES = [512, 1024, 2048, 4096, 8192, 16384]
MASKS = ["none", "causal", "padding", "window", "document", "prefix"]
IMPLS = ["auto", "blocked", "sdpa", "sdpa_best", "sdpa_mask", "naive", "flex"]
WINDOW = 256


def make_mask(kind: str, n: int) -> Mask | None:
    """The mask kinds of the benchmark, at sequence length n."""
    if kind == "none":
        return None
    if kind == "causal":
        return masks.causal()
    if kind == "padding":  # the last quarter of the keys is padding
        return masks.padding([3 * n // 4])
    if kind == "window":
        return masks.causal() & masks.sliding_window(WINDOW)
    if kind == "document":  # 4 packed documents of 10%, 20%, 30%, 40% of the sequence
        bounds = [0, n // 10, 3 * n // 10, 6 * n // 10, n]
        ids = torch.cat([torch.full((bounds[i + 1] - bounds[i],), i) for i in range(4)])
        return masks.document(ids.view(1, n))
    if kind == "prefix":
        return masks.prefix_lm(n // 4)
    raise ValueError(f"mask kind must be one of {MASKS}, got {kind!r}")


def allowed_pairs(mask: Mask | None, n: int) -> int:
    """Number of allowed (query, key) pairs of one head, counted in row chunks."""
    if mask is None:
        return n * n
    chunk = max(1, (1 << 24) // n)
    return sum(int(mask.to_dense(min(chunk, n - i), n, q_offset=i).sum()) for i in range(0, n, chunk))


def _sdpa_best(mask: Mask | None, n: int) -> Callable | None:
    """SDPA without a mask tensor, where the mask allows it (no mask, is_causal, key padding)."""
    if mask is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    kinds = masks.structure(mask).kinds
    if kinds == ("causal",):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kinds in (("lengths",), ("valid",)):
        keys = mask.to_dense(1, n)  # (1, 1, 1, Lk)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
    return None


def _naive(dense: torch.Tensor | None) -> Callable:
    def run(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, N, N)
        if dense is not None:
            scores = scores.masked_fill(~dense, -math.inf)
        return torch.softmax(scores, dim=-1) @ v

    return run


def _flex(mask: Mask | None) -> Callable:
    def run(q, k, v):
        return maskattn.attention(q, k, v, mask, backend="flex")

    return run


def make_impls(names: list[str], mask: Mask | None, n: int) -> dict[str, Callable]:
    """Callables (q, k, v) -> out for the implementations that apply to this mask."""
    impls: dict[str, Callable] = {}
    for name in names:
        if name in ("auto", "blocked", "sdpa"):  # "sdpa": maskattn's sdpa backend (per-document / band calls)
            impls[name] = lambda q, k, v, name=name: maskattn.attention(q, k, v, mask, backend=name)
        elif name == "sdpa_best" and _sdpa_best(mask, n) is not None:
            impls[name] = _sdpa_best(mask, n)
        elif name in ("sdpa_mask", "naive"):
            dense = None if mask is None else mask.to_dense(n, n)  # built once, outside the timing
            if name == "naive":
                impls[name] = _naive(dense)
            else:
                impls[name] = lambda q, k, v, dense=dense: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        elif name == "flex":
            impls[name] = _flex(mask)
    return impls


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(n: int, requires_grad: bool, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, n, D, generator=gen).to(dtype).requires_grad_(requires_grad) for _ in range(3))


def _time_forward(run: Callable, qkv) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        run(*qkv)
        return time.perf_counter() - start


def _time_backward(run: Callable, qkv, grad) -> float:
    for x in qkv:
        x.grad = None
    start = time.perf_counter()
    run(*qkv).backward(grad)
    return time.perf_counter() - start


def _time_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def matmul_gflops(seconds: float) -> float:
    return 2 * 4096**3 / seconds / 1e9


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2,  # largest |output - reference| an implementation may show
             torch.float16: 1e-2}  # (attention_gpu.py: fp16 has 3 more mantissa bits than bf16)


def wrong_outputs(errors: dict[str, float], dtype: torch.dtype) -> dict[str, float]:
    """The implementations of ``{name: largest |output - reference|}`` beyond ``TOLERANCE[dtype]`` (NaN too): the
    ones a benchmark reports as WRONG and does not time."""
    return {name: err for name, err in errors.items() if not err <= TOLERANCE[dtype]}


def reference_rows(mask: Mask | None, n: int, qkv) -> dict[int, torch.Tensor]:
    """Attention output of up to 64 query rows at the start, middle and end, in float64 from the dense scores of
    those rows alone (cheap at any N): ``{first row: (B, H, rows, D)}``."""
    q, k, v = (x.detach().double() for x in qkv)
    rows = min(n, 64)
    out = {}
    for start in sorted({0, (n - rows) // 2, n - rows}):
        scores = q[:, :, start:start + rows] @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, rows, N)
        if mask is not None:
            scores = scores.masked_fill(~mask.to_dense(rows, n, q_offset=start), -math.inf)
        out[start] = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v  # a row with no key: zeros
    return out


def disagreement(run: Callable, qkv, reference: dict[int, torch.Tensor]) -> float:
    """Largest |output - reference| of one forward on the reference's rows."""
    with torch.no_grad():
        out = run(*qkv).double()
    return max((out[:, :, start:start + ref.shape[2]] - ref).abs().max().item() for start, ref in reference.items())


def time_config(kind: str, n: int, names: list[str], warmup: int, repeats: int, naive_max: int,
                dtype: torch.dtype = torch.float32) -> tuple[dict, float, dict[str, float]]:
    """Median forward and forward+backward seconds of every implementation, interleaved; the matmul
    reference in the same dtype; and ``{name: largest error}`` of the implementations whose output differs
    from :func:`reference_rows` beyond ``TOLERANCE``: those are not timed."""
    mask = make_mask(kind, n)
    names = [x for x in names if x != "naive" or n <= naive_max]
    impls = make_impls(names, mask, n)
    qkv, qkv_grad = _inputs(n, False, dtype), _inputs(n, True, dtype)
    reference = reference_rows(mask, n, qkv)
    errors = {name: disagreement(run, qkv, reference) for name, run in impls.items()}
    wrong = wrong_outputs(errors, dtype)
    impls = {name: run for name, run in impls.items() if name not in wrong}
    grad = torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    forward = {name: [] for name in impls}
    backward = {name: [] for name in impls}
    a, b = torch.randn(4096, 4096).to(dtype), torch.randn(4096, 4096).to(dtype)
    matmul = []
    for rep in range(warmup + repeats):
        if rep >= warmup:
            matmul.append(_time_matmul(a, b))
        for name, run in impls.items():
            fwd = _time_forward(run, qkv)
            bwd = math.nan if name == "flex" else _time_backward(run, qkv_grad, grad)  # no flex backward on CPU
            if rep >= warmup:
                forward[name].append(fwd)
                backward[name].append(bwd)
    medians = {name: (statistics.median(forward[name]), statistics.median(backward[name])) for name in impls}
    return medians, matmul_gflops(statistics.median(matmul)), wrong


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def extra_peak_mb(call: Callable[[], object], warmup: Callable[[], object] | None = None) -> float:
    """Extra peak RSS (MB) of ``call()`` in this process: ``VmHWM`` after it minus ``VmRSS`` before, the peak
    counter reset just before. ``warmup``: a small run of the same code first, so that what a fresh process
    pays once (libraries' lazy set-up: ~40 MB for a first forward+backward) is not counted as the call's."""
    if warmup is not None:
        warmup()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    call()
    return (_rss_kb("VmHWM") - before) / 1024


def measure_memory_here(kind: str, n: int, name: str, dtype: torch.dtype = torch.float32) -> float:
    """Extra peak RSS (MB) of one forward+backward, in this (fresh) process, after one at N = 64."""

    def step(n: int) -> Callable[[], object]:
        run = make_impls([name], make_mask(kind, n), n)[name]
        qkv = _inputs(n, True, dtype)
        grad = torch.randn(B, H, n, D).to(dtype)
        return lambda: run(*qkv).backward(grad)

    return extra_peak_mb(step(n), warmup=step(min(n, 64)))


def measure_memory(kind: str, n: int, name: str, dtype: str = "float32") -> float:
    """Run :func:`measure_memory_here` in a fresh subprocess."""
    cmd = [sys.executable, "-m", "benchmarks.attention", "--memory-child", kind, str(n), name, "--dtype", dtype,
           "--json", os.devnull]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def provenance(module: str, argv: list[str] | None = None) -> dict:
    """What every benchmark's ``--json`` records so that a figure can be traced to its run: :func:`machine` (CPU,
    cores, torch version, torch threads, GPU) and the exact command line (``argv``: the flags; None: sys.argv's)."""
    argv = sys.argv[1:] if argv is None else argv
    return machine() | {"command": shlex.join(["python", "-m", module, *argv])}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=positive_ints, default=",".join(map(str, SIZES)),
                   help="comma-separated N (default: %(default)s)")
    p.add_argument("--masks", default=",".join(MASKS), help="comma-separated mask kinds (default: %(default)s)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations (default: %(default)s)")
    p.add_argument("--warmup", type=count, default=1, help="untimed repetitions first (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions (default: %(default)s)")
    p.add_argument("--naive-max", type=count, default=8192,
                   help="largest N for the naive N x N implementation (16384 needs > 24 GB; default: %(default)s)")
    p.add_argument("--memory-sizes", type=lambda x: positive_ints(x) if x else x, default="",
                   help="comma-separated N at which to measure peak memory, in subprocesses (default: none)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of q, k, v for every implementation (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="sizes 512,1024,2048, 3 repeats: a smoke run")
    p.add_argument("--json", type=output_path, default="benchmarks/results.json", help="where to write the results")
    p.add_argument("--memory-child", nargs=3, metavar=("MASK", "N", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "512,1024,2048", 3
    for name, allowed in (("masks", MASKS), ("impls", IMPLS)):
        bad = set(getattr(args, name).split(",")) - set(allowed)
        if bad:
            p.error(f"--{name}: unknown {sorted(bad)}; expected some of {allowed}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.memory_child:
        kind, n, name = args.memory_child
        print(measure_memory_here(kind, int(n), name, DTYPES[args.dtype]))
        return
    names = args.impls.split(",")
    memory_sizes = {int(x) for x in args.memory_sizes.split(",") if x}
    info = provenance("benchmarks.attention", argv)
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.dtype}")
    header = (f"{'mask':9} {'N':>6} {'impl':10} {'mm GF/s':>7} {'fwd ms':>9} {'f+b ms':>9} {'fwd %mm':>8} "
              f"{'f+b %mm':>8} {'x sdpa_mask':>11} {'x sdpa_best':>11} {'peak MB':>8}")
    print(header)
    rows, disagreements = [], []
    for kind in args.masks.split(","):
        for n in map(int, args.sizes.split(",")):
            pairs = allowed_pairs(make_mask(kind, n), n) * B * H
            flops = 4 * D * pairs
            times, gflops, wrong = time_config(kind, n, names, args.warmup, args.repeats, args.naive_max,
                                               DTYPES[args.dtype])
            for name, err in wrong.items():
                print(f"{kind:9} {n:6} {name:10} WRONG: output differs from the reference by {err:.2e} "
                      f"(tolerance {TOLERANCE[DTYPES[args.dtype]]:.0e}); not timed", flush=True)
                disagreements.append({"mask": kind, "n": n, "impl": name, "max_error": err})
            for name, (fwd, bwd) in times.items():
                row = {"mask": kind, "n": n, "impl": name, "matmul_gflops": gflops, "fwd_s": fwd, "fwd_bwd_s": bwd,
                       "allowed_fraction": pairs / (B * H * n * n),
                       "fwd_pct_matmul": 100 * flops / fwd / 1e9 / gflops,
                       "fwd_bwd_pct_matmul": 100 * 3.5 * flops / bwd / 1e9 / gflops}
                for base in ("sdpa_mask", "sdpa_best"):
                    row[f"speedup_vs_{base}"] = times[base][1] / bwd if base in times else math.nan
                row["peak_extra_mb"] = (measure_memory(kind, n, name, args.dtype)
                                        if n in memory_sizes and name != "flex" else math.nan)
                rows.append(row)
                print(f"{kind:9} {n:6} {name:10} {gflops:7.0f} {1e3 * fwd:9.1f} {1e3 * bwd:9.1f} "
                      f"{row['fwd_pct_matmul']:7.1f}% {row['fwd_bwd_pct_matmul']:7.1f}% "
                      f"{row['speedup_vs_sdpa_mask']:11.2f} {row['speedup_vs_sdpa_best']:11.2f} "
                      f"{row['peak_extra_mb']:8.0f}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"machine": info, "protocol": {"B": B, "H": H, "D": D, "dtype": args.dtype, "warmup": args.warmup,
                                                 "repeats": args.repeats, "window": WINDOW}, "rows": rows,
                   "disagreements": disagreements}, f, indent=1)
    print(f"# wrote {args.json}")
    if disagreements:
        sys.exit(f"{len(disagreements)} implementation(s) gave wrong outputs and were not timed (see above)")


if __name__ == "__main__":
    main()
