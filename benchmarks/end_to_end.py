"""End to end, side by side in one process: maskattn's ``DecoderLM`` against Hugging Face's ``GPT2LMHeadModel``
of the same shape and the same weights (issue 15, items 3 and 4).

fp32 on the CPU by default; ``--device cuda`` runs ``train`` and ``generate`` on a GPU (timed with
``torch.cuda.synchronize``), ``--bf16`` runs both models' training steps under bfloat16 autocast.
A GPT-2 of ``--layers`` x ``--width`` (``--heads`` heads, ``--vocab`` tokens, no dropout) is built
with ``transformers`` (``attn_implementation="sdpa"``), saved with ``save_pretrained`` and loaded into maskattn with
``maskattn.from_pretrained``; their logits are compared first (plain and packed rows).

* ``train``: tokens/s of one training step (forward, cross-entropy, backward, AdamW step) on ``--batch`` rows of
  ``--block`` tokens (plain causal rows) and of ``--packed-block`` tokens holding ``--docs`` documents each
  (maskattn: ``doc_ids`` -> ``causal & document``; HF: position ids that restart and a 4-D bool mask, as HF users
  pack rows with SDPA), each model eager and ``torch.compile``'d (``--modes``).
* ``generate``: tokens/s of greedy decoding, ``maskattn.decoding.greedy`` against HF ``generate(do_sample=False)``,
  batch sizes ``--gen-batches``, ``--prompt`` random prompt tokens, exactly ``--new`` new tokens (no early stop);
  the share of equal tokens is printed beside the speed. With ``compiled`` in ``--modes``, also
  ``greedy(..., compile=True)`` (a static KV cache and one ``torch.compile``'d step) as ``maskattn-compiled``.
* ``long``: ``causal & sliding_window(--window)`` forward+backward on the blocked backend (benchmarks/attention.py's
  B=1, H=8, D=64) at each of ``--long-n``: seconds, T(largest) / T(smallest), and the extra peak RSS measured
  in a fresh subprocess as benchmarks/attention.py does.
* ``cache``: extra peak RSS and KV-cache bytes while a sliding-window ``DecoderLM`` (RoPE, window ``--window``)
  generates ``--cache-tokens`` tokens, with the sliding-window cache against the full cache, each in a fresh
  subprocess.

Timed calls are interleaved within each repetition, the median of ``--repeats`` taken after ``--warmup``
rounds (at least one where a compiled call is timed: it compiles at its first call).

    python -m benchmarks.end_to_end                       # the issue's sizes
    python -m benchmarks.end_to_end --tiny --modes eager  # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import attention as attn_bench
from benchmarks.args import count, output_path, positive_ints
from maskattn.cli import positive_int

PARTS = ("train", "generate", "long", "cache", "train-memory")
LOGITS_TOLERANCE = 1e-3  # largest |logit or loss difference| of the two fp32 models before they are timed
TINY = dict(layers=2, width=64, heads=2, vocab=512, block=64, batch=2, docs=4, packed_block=128, prompt=16, new=8,
            gen_batches="1,2", long_n="512,1024", window=16, cache_tokens=256, warmup=1, repeats=1)


# --- the two models ---------------------------------------------------------------------------------
def build_models(args: argparse.Namespace):
    """(maskattn DecoderLM, HF GPT2LMHeadModel) with the same weights, train mode, no dropout."""
    import transformers

    import maskattn

    positions = max(args.block, args.packed_block, args.prompt + args.new)
    config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=positions, n_embd=args.width,
                                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config)
    hf.set_attn_implementation("sdpa")
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = maskattn.from_pretrained(directory)
    ours.config.eos_id = None  # exactly --new tokens, as HF's min_new_tokens
    return ours.to(args.device).train(), hf.to(args.device).train()


def packed_rows(batch: int, length: int, docs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(doc_ids, position_ids, 4-D bool mask) of rows of ``docs`` equal documents: (B, L), (B, L), (B, 1, L, L)."""
    doc = (torch.arange(length) * docs // length).expand(batch, length)  # (B, L)
    from maskattn.models.common import document_positions

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (doc[:, None, :, None] == doc[:, None, None, :]) & causal  # (B, 1, L, L)
    return doc, document_positions(doc), mask


def check_logits(ours, hf, args: argparse.Namespace) -> dict:
    """Max |logit difference| on a plain and a packed row, and |loss difference| of the libraries' own loss
    paths on the plain row (eval mode, no grad)."""
    ids = torch.randint(0, args.vocab, (1, args.block), generator=torch.Generator().manual_seed(2)).to(args.device)
    doc, pos, mask = (x.to(args.device) for x in packed_rows(1, args.block, args.docs))
    with torch.no_grad():
        plain = (ours.eval()(ids) - hf.eval()(ids).logits).abs().max().item()
        packed = (ours(ids, doc_ids=doc) - hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
        ours_own, hf_own = loss_variants(ids)["own"]
        own = ours_own(ours) - hf_own(hf)
    ours.train(), hf.train()
    return {"plain": plain, "packed": packed.abs().max().item(), "own_loss": abs(own.item())}


# --- timing -----------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(calls: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls interleaved within every repetition (GPU work waited for)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(warmup + repeats):
        for name, call in calls.items():
            _sync()
            start = time.perf_counter()
            call()
            _sync()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model, optimizer, loss_of: Callable[[torch.nn.Module], torch.Tensor], ids: torch.Tensor,
               bf16: bool = False) -> Callable:
    def run() -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def logits_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of (B, L, V) logits, as both libraries' users write it by hand."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) targets of ``DecoderLM(ids, targets=...)``: ids shifted left, -100 at the end."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def loss_variants(ids: torch.Tensor, ours_kwargs: dict | None = None, hf_kwargs: dict | None = None) -> dict:
    """``{"logits": (ours, hf), "own": (ours, hf)}``: functions model -> mean next-token loss of the rows ``ids``,
    through logits + ``F.cross_entropy`` on both sides, or each library's own loss path (``targets=`` / ``labels=``).
    ``ours_kwargs`` / ``hf_kwargs``: the packed rows' extra inputs of each model."""
    ours_kwargs, hf_kwargs = ours_kwargs or {}, hf_kwargs or {}
    count = ids.shape[0] * (ids.shape[1] - 1)
    return {
        "logits": (lambda m: logits_loss(m(ids, **ours_kwargs), ids),
                   lambda m: logits_loss(m(input_ids=ids, **hf_kwargs).logits, ids)),
        "own": (lambda m: m(ids, targets=next_tokens(ids), **ours_kwargs) / count,
                lambda m: m(input_ids=ids, labels=ids, **hf_kwargs).loss),
    }


def bench_train(ours, hf, args: argparse.Namespace) -> dict:
    """Tokens/s of a training step, plain and packed rows, eager and compiled.

    ``--losses logits``: both models give logits and the loss is ``F.cross_entropy`` on them (the same
    code on both sides); ``own``: each library's own loss path, ``DecoderLM(ids, targets=...)`` (the
    chunked vocabulary loss, no whole logits) against HF's ``labels=`` (rows ``maskattn-own``, ``hf-own``).
    """
    gen = torch.Generator().manual_seed(3)
    plain = torch.randint(0, args.vocab, (args.batch, args.block), generator=gen).to(args.device)
    packed = torch.randint(0, args.vocab, (args.batch, args.packed_block), generator=gen).to(args.device)
    doc, pos, mask = (x.to(args.device) for x in packed_rows(args.batch, args.packed_block, args.docs))
    rows = {"plain": (plain, loss_variants(plain)),
            "packed": (packed, loss_variants(packed, {"doc_ids": doc}, {"attention_mask": mask, "position_ids": pos}))}
    result = {}
    for row, (ids, variants) in rows.items():
        calls = {}
        for mode in args.modes:
            for loss in args.losses:
                ours_loss, hf_loss = variants[loss]
                for name, model, loss_of in (("maskattn", ours, ours_loss), ("hf", hf, hf_loss)):
                    run = torch.compile(model) if mode == "compiled" else model
                    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
                    suffix = "" if loss == "logits" else "-own"
                    calls[f"{name}{suffix}-{mode}"] = train_step(run, optimizer, loss_of, ids, args.bf16)
        warmup = max(args.warmup, 1) if "compiled" in args.modes else args.warmup  # compiled in the warm-up
        seconds = interleaved(calls, warmup, args.repeats)
        result[row] = {name: ids.numel() / s for name, s in seconds.items()}  # tokens/s
    return result


def hf_greedy(hf, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """HF ``generate`` without sampling: exactly ``new`` tokens, (B, new)."""
    with torch.no_grad():
        tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0)
    return tokens[:, prompt.shape[1]:]


def bench_generate(ours, hf, args: argparse.Namespace) -> dict:
    """Tokens/s of greedy decoding, per batch size, and the share of tokens equal to HF's.

    ``maskattn`` is eager decoding; with ``compiled`` in ``--modes``, ``maskattn-compiled`` is
    ``greedy(..., compile=True)`` (static KV cache, one compiled step; compiled during the warm-up).
    """
    from maskattn import decoding

    ours.eval(), hf.eval()
    result = {}
    for batch in args.gen_batches:
        prompt = torch.randint(0, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(4))
        prompt = prompt.to(args.device)
        out: dict[str, torch.Tensor] = {}
        calls = {"maskattn": lambda p=prompt, o=out: o.update(
                     maskattn=decoding.greedy(ours, p, max_new_tokens=args.new))}
        if "compiled" in args.modes:
            calls["maskattn-compiled"] = lambda p=prompt, o=out: o.update(
                {"maskattn-compiled": decoding.greedy(ours, p, max_new_tokens=args.new, compile=True)})
        calls["hf"] = lambda p=prompt, o=out: o.update(hf=hf_greedy(hf, p, args.new))
        seconds = interleaved(calls, max(args.warmup, 1) if "compiled" in args.modes else args.warmup, args.repeats)
        same = {f"same_tokens{name[8:]}": (out[name] == out["hf"]).float().mean().item()
                for name in calls if name != "hf"}  # same_tokens, same_tokens-compiled
        result[str(batch)] = {**{name: batch * args.new / s for name, s in seconds.items()}, **same}
    return result


# --- long context and the sliding-window cache (peak memory in fresh subprocesses) ------------------------
def bench_long(args: argparse.Namespace) -> dict:
    """Seconds and extra peak RSS (MB) of ``causal & sliding_window`` forward+backward on the blocked backend."""
    attn_bench.WINDOW = args.window
    result = {}
    for n in args.long_n:
        run = attn_bench.make_impls(["blocked"], attn_bench.make_mask("window", n), n)["blocked"]
        qkv = attn_bench._inputs(n, True)
        grad = torch.randn(attn_bench.B, attn_bench.H, n, attn_bench.D)
        call = {"blocked": lambda r=run, x=qkv, g=grad: attn_bench._time_backward(r, x, g)}
        seconds = interleaved(call, args.warmup, args.repeats)["blocked"]
        result[str(n)] = {"seconds": seconds, "peak_mb": float(child(["long", str(n), str(args.window)]))}
    smallest, largest = str(min(args.long_n)), str(max(args.long_n))  # --long-n in any order
    result["time_ratio"] = result[largest]["seconds"] / result[smallest]["seconds"]
    return result


def long_memory_here(n: int, window: int) -> float:
    attn_bench.WINDOW = window
    return attn_bench.measure_memory_here("window", n, "blocked")


def cache_memory_here(kind: str, tokens: int, window: int, args: argparse.Namespace) -> str:
    """Generate ``tokens`` tokens with a sliding-window DecoderLM; JSON of extra peak MB and cache bytes."""
    from maskattn.models import DecoderLM, DecoderLMConfig

    config = DecoderLMConfig(vocab_size=args.vocab, d_model=args.width, num_heads=args.heads, d_ff=4 * args.width,
                             num_layers=args.layers, positions="rope", max_len=tokens + 1, sliding_window=window)
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    prompt = torch.randint(0, args.vocab, (1, 1))

    @torch.no_grad()
    def generate(tokens: int):
        state, logits = model.begin_decoding(prompt, max_new_tokens=tokens, full_cache=kind == "full")
        for _ in range(tokens - 1):
            logits = model.step(state, logits.argmax(-1)[:, None])[:, -1]
        return state

    states = []
    peak = attn_bench.extra_peak_mb(lambda: states.append(generate(tokens)), warmup=lambda: generate(2))
    state = states[0]
    cache_bytes = sum(c.k.nbytes + c.v.nbytes for c in state.caches)
    return json.dumps({"peak_mb": peak, "cache_mb": cache_bytes / 2**20, "slots": state.caches[0].k.shape[2]})


def train_memory_here(name: str, args: argparse.Namespace) -> float:
    """Extra peak RSS (MB) of one forward + backward on plain rows (after one on 8 tokens): ``name`` is
    ``{maskattn,hf}-{logits,own}``."""
    ours, hf = build_models(args)
    library, loss = name.split("-")
    model = ours if library == "maskattn" else hf
    ids = torch.randint(0, args.vocab, (args.batch, args.block), generator=torch.Generator().manual_seed(3))
    loss_of = loss_variants(ids)[loss][0 if library == "maskattn" else 1]

    def warmup() -> None:  # the libraries' one-time set-up, on a row of 8 tokens; no gradient left behind
        loss_variants(ids[:1, :8])[loss][0 if library == "maskattn" else 1](model).backward()
        model.zero_grad(set_to_none=True)

    return attn_bench.extra_peak_mb(lambda: loss_of(model).backward(), warmup=warmup)


def bench_train_memory(args: argparse.Namespace) -> dict:
    """Extra peak RSS of a forward + backward, each library with logits + F.cross_entropy and its own loss path."""
    return {name: float(child(["train", name], args))
            for name in ("maskattn-logits", "maskattn-own", "hf-logits", "hf-own")}


def bench_cache(args: argparse.Namespace) -> dict:
    return {kind: json.loads(child(["cache", kind, str(args.cache_tokens), str(args.window)], args))
            for kind in ("window", "full")}


def child(what: list[str], args: argparse.Namespace | None = None) -> str:
    """Run ``--memory-child what...`` in a fresh process and return its last line of output."""
    flags = ("layers", "width", "heads", "vocab", "block", "batch", "packed_block", "prompt", "new")  # the model's
    shape = [] if args is None else [x for name in flags  # position table: max(block, packed_block, prompt + new)
                                     for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    cmd = [sys.executable, "-m", "benchmarks.end_to_end", *shape, "--memory-child", *what]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


# --- command line -----------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small sizes for a smoke run (flags given beside it win)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--modes", default="eager,compiled", help="train: eager and/or compiled (torch.compile); generate: "
                   "compiled adds greedy(compile=True)")
    p.add_argument("--losses", default="logits,own", help="train: comma-separated subset of logits,own "
                   "(see bench_train)")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--width", type=positive_int, default=256)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--vocab", type=positive_int, default=50257)
    p.add_argument("--block", type=positive_int, default=1024, help="train: tokens per plain row")
    p.add_argument("--batch", type=positive_int, default=2, help="train: rows per step")
    p.add_argument("--docs", type=positive_int, default=16, help="train: documents per packed row")
    p.add_argument("--packed-block", type=positive_int, default=4096, help="train: tokens per packed row")
    p.add_argument("--prompt", type=positive_int, default=512, help="generate: prompt tokens")
    p.add_argument("--new", type=positive_int, default=256, help="generate: new tokens")
    p.add_argument("--gen-batches", type=positive_ints, default="1,8", help="generate: comma-separated batch sizes")
    p.add_argument("--long-n", type=positive_ints, default="8192,65536", help="long: comma-separated sequence lengths")
    p.add_argument("--window", type=positive_int, default=256, help="long and cache: the sliding window W")
    p.add_argument("--cache-tokens", type=positive_int, default=32768, help="cache: tokens generated")
    p.add_argument("--warmup", type=count, default=1, help="untimed rounds first (at least 1 with compiled in "
                   "--modes)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", default="cpu", help="train and generate on this device (e.g. cuda)")
    p.add_argument("--bf16", action="store_true", help="train: bfloat16 autocast for both models")
    p.add_argument("--json", type=output_path, default="end_to_end.json", help="where to write the results")
    p.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:  # small defaults: a flag given beside --tiny still counts
        p.set_defaults(**TINY)
        args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    args.modes = [x for x in args.modes.split(",") if x]
    args.losses = [x for x in args.losses.split(",") if x]
    for name, allowed in (("parts", PARTS), ("modes", ("eager", "compiled")), ("losses", ("logits", "own"))):
        bad = sorted(set(getattr(args, name)) - set(allowed))
        if bad:
            p.error(f"--{name}: unknown {bad}; expected some of {list(allowed)}")
    args.gen_batches, args.long_n = _ints(str(args.gen_batches)), _ints(str(args.long_n))
    if args.device != "cpu" and {"long", "cache", "train-memory"} & set(args.parts):
        p.error(f"--parts long, cache and train-memory measure CPU memory; with --device {args.device} give "
                "--parts train,generate")
    return args


def report(results: dict) -> None:
    """Print each comparison with its ratio (maskattn / HF; above 1 = maskattn faster)."""
    print(f"# logits |maskattn - HF|: {results['logits']}")
    for row, speeds in results.get("train", {}).items():
        print(f"train {row:6s} " + "  ".join(f"{k} {v:9.0f} tok/s" for k, v in speeds.items()))
        for mode in ("eager", "compiled"):
            for suffix in ("", "-own"):  # each maskattn row against HF's eager and same-mode rows of its kind
                ours = speeds.get(f"maskattn{suffix}-{mode}")
                refs = dict.fromkeys((f"hf{suffix}-eager", f"hf{suffix}-{mode}", "hf-eager"))
                ratios = [f"/ {ref} = {ours / speeds[ref]:.2f}x" for ref in refs
                          if ours is not None and ref in speeds]  # --modes compiled alone has no eager HF row
                if ratios:
                    print(f"  maskattn{suffix}-{mode} " + ", ".join(ratios))
    for batch, speeds in results.get("generate", {}).items():
        for name in ("maskattn", "maskattn-compiled"):
            if name in speeds:
                print(f"generate B={batch}: {name} {speeds[name]:.1f} tok/s, hf {speeds['hf']:.1f} tok/s, "
                      f"{speeds[name] / speeds['hf']:.2f}x, same tokens {speeds['same_tokens' + name[8:]]:.0%}")
    long = results.get("long")
    if long:
        for n, row in long.items():
            if n != "time_ratio":
                print(f"long N={n}: {row['seconds']:.3f} s, peak +{row['peak_mb']:.0f} MB")
        print(f"  T(largest N) / T(smallest N) = {long['time_ratio']:.2f}")
    for kind, row in results.get("cache", {}).items():
        print(f"cache {kind}: peak +{row['peak_mb']:.0f} MB, KV cache {row['cache_mb']:.1f} MB ({row['slots']} slots)")
    for name, peak in results.get("train-memory", {}).items():
        print(f"train memory {name}: forward + backward peak +{peak:.0f} MB")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.memory_child:
        what = args.memory_child
        if what[0] == "long":
            print(long_memory_here(int(what[1]), int(what[2])))
        elif what[0] == "train":
            print(train_memory_here(what[1], args))
        else:
            print(cache_memory_here(what[1], int(what[2]), int(what[3]), args))
        return
    results: dict = {"machine": attn_bench.provenance("benchmarks.end_to_end", argv),
                     "args": {k: v for k, v in vars(args).items() if k != "memory_child"}}
    if "train" in args.parts or "generate" in args.parts:
        ours, hf = build_models(args)
        results["logits"] = check_logits(ours, hf, args)
        if not max(results["logits"].values()) <= LOGITS_TOLERANCE:  # NaN fails too
            sys.exit(f"maskattn and HF disagree before anything is timed: |difference| {results['logits']} "
                     f"(plain and packed logits, own loss), above {LOGITS_TOLERANCE:g}; not timing them")
        if "train" in args.parts:
            results["train"] = bench_train(ours, hf, args)
        if "generate" in args.parts:
            if "train" in args.parts:  # the training steps moved the two models apart (bf16 rounding differs)
                ours, hf = build_models(args)
            results["generate"] = bench_generate(ours, hf, args)
    else:
        results["logits"] = "not checked (no train or generate part)"
    if "long" in args.parts:
        results["long"] = bench_long(args)
    if "cache" in args.parts:
        results["cache"] = bench_cache(args)
    if "train-memory" in args.parts:
        results["train-memory"] = bench_train_memory(args)
    report(results)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
