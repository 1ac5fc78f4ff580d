"""Masked attention on a GPU: maskattn's backends against PyTorch's SDPA with a dense mask, SDPA's own
causal kernel and FlexAttention, in half precision, with CUDA's peak allocated memory.

The mask kinds are benchmarks/attention.py's (``causal & sliding_window(256)``, 4 packed documents, a
prefix-LM, key padding, causal). Per kind and sequence length N, each implementation runs forward (no
grad) and forward+backward, interleaved within each repetition, timed with ``torch.cuda.synchronize``;
the median after warm-up is reported, with the extra peak memory (``max_memory_allocated`` above what
the inputs hold) of one forward+backward, and the largest difference from SDPA-with-the-dense-mask's
output where that runs: an implementation beyond ``attention.TOLERANCE`` of it is reported as WRONG, not
timed, listed under "disagreements" in the JSON, and the run exits non-zero.

    python -m benchmarks.attention_gpu --sizes 4096,16384 --json benchmarks/results/gpu-attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import maskattn
from benchmarks.args import count, output_path, positive_int, positive_ints
from benchmarks.attention import MASKS, TOLERANCE, _sdpa_best, allowed_pairs, make_mask, provenance, wrong_outputs

IMPLS = ["auto", "blocked", "sdpa", "flex", "sdpa_best", "sdpa_mask"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_impls(names: list[str], mask, n: int, device: torch.device) -> dict:
    impls = {}
    for name in names:
        if name in ("auto", "blocked", "sdpa", "flex"):
            probe = torch.zeros(1, 1, 1, 64, device=device)
            if name == "auto" or maskattn.dispatch.can_run(name, probe, dropout_p=0.0, return_weights=False,
                                                           needs_grad=True):
                impls[name] = lambda q, k, v, name=name: maskattn.attention(q, k, v, mask, backend=name)
        elif name == "sdpa_best" and _sdpa_best(mask, n) is not None:  # SDPA's own: no mask, is_causal, key padding
            impls[name] = _sdpa_best(None if mask is None else mask.to(device), n)
        elif name == "sdpa_mask":
            dense = None if mask is None else mask.to_dense(n, n, device=device)
            impls[name] = lambda q, k, v, dense=dense: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    return impls


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_config(kind: str, n: int, args: argparse.Namespace, device: str = "cuda") -> tuple[dict, dict[str, float]]:
    """``{implementation: row}`` of the timed ones, and ``{implementation: largest difference}`` of those whose output
    differs from sdpa_mask's beyond ``TOLERANCE``: those are not timed."""
    device, dtype = torch.device(device), DTYPES[args.dtype]  # device: "cpu" in the tests
    mask = make_mask(kind, n)
    mask = None if mask is None else mask.to(device)  # as a GPU training loop builds it
    impls = make_impls(args.impls, mask, n, device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    outputs, fwd, bwd, peak = {}, {n_: [] for n_ in impls}, {n_: [] for n_ in impls}, {}
    for name, run in list(impls.items()):
        try:  # one untimed call: compile (flex), check it runs, keep the output, and its peak memory
            with torch.no_grad():
                outputs[name] = run(q, k, v)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run(qg, kg, vg).backward(grad)
            torch.cuda.synchronize()
            peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:  # e.g. the dense mask does not fit
            print(f"  {kind} N={n} {name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
            del impls[name]
        for x in (qg, kg, vg):
            x.grad = None
    ref = outputs.get("sdpa_mask")
    errors = {} if ref is None else {name: (out.float() - ref.float()).abs().max().item()
                                     for name, out in outputs.items() if name in impls}
    wrong = wrong_outputs(errors, dtype)
    for name, err in wrong.items():
        print(f"  {kind} N={n} {name}: WRONG: output differs from sdpa_mask's by {err:.2e} "
              f"(tolerance {TOLERANCE[dtype]:.0e}); not timed", flush=True)
        del impls[name]
    for rep in range(args.warmup + args.repeats):
        for name, run in impls.items():
            with torch.no_grad():
                t_fwd = _timed(lambda run=run: run(q, k, v))
            t_bwd = _timed(lambda run=run: run(qg, kg, vg).backward(grad))
            if rep >= args.warmup:
                fwd[name].append(t_fwd)
                bwd[name].append(t_bwd)
    pairs = allowed_pairs(mask, n) if n <= 16384 else None
    rows = {}
    for name in impls:
        f, b = statistics.median(fwd[name]), statistics.median(bwd[name])
        tflops = None if pairs is None else 4 * args.head_dim * pairs * args.batch * args.heads * 3.5 / b / 1e12
        rows[name] = {"forward_ms": f * 1e3, "fwd_bwd_ms": b * 1e3, "peak_mb": peak[name], "max_err": errors.get(name),
                      "fwd_bwd_tflops_allowed": tflops}
    return rows, wrong


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=positive_ints, default="4096,16384")
    p.add_argument("--masks", default="causal,window,document,prefix,padding")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=16)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--warmup", type=count, default=2)
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--json", type=output_path, default="attention_gpu.json")
    args = p.parse_args(argv)
    for name, allowed in (("masks", MASKS), ("impls", IMPLS)):
        bad = sorted(set(getattr(args, name).split(",")) - set(allowed))
        if bad:
            p.error(f"--{name}: unknown {bad}; expected some of {allowed}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    args.impls = [x for x in args.impls.split(",") if x]
    results = {"machine": provenance("benchmarks.attention_gpu", argv), "args": vars(args), "rows": {},
               "disagreements": []}
    for kind in args.masks.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            rows, wrong = run_config(kind, n, args)
            results["disagreements"] += [{"mask": kind, "n": n, "impl": name, "max_err": err}
                                         for name, err in wrong.items()]
            results["rows"][f"{kind}/{n}"] = rows
            base = rows.get("sdpa_mask", {}).get("fwd_bwd_ms")
            for name, r in rows.items():
                ratio = f"{base / r['fwd_bwd_ms']:6.2f}x" if base else "   -   "
                err = "-" if r["max_err"] is None else f"{r['max_err']:.1e}"
                print(f"{kind:9s} N={n:6d} {name:10s} fwd {r['forward_ms']:8.2f} ms  fwd+bwd {r['fwd_bwd_ms']:8.2f} ms "
                      f"({ratio} sdpa_mask)  peak +{r['peak_mb']:8.1f} MB  err {err}", flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"# wrote {args.json}")
    if results["disagreements"]:
        sys.exit(f"{len(results['disagreements'])} implementation(s) disagreed with sdpa_mask and were not timed "
                 "(see above)")


if __name__ == "__main__":
    main()
