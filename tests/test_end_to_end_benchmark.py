"""Smoke run of benchmarks/end_to_end.py at --tiny sizes: it runs and writes every figure (no timing checked)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import end_to_end


def test_tiny_run_writes_every_comparison(tmp_path):
    out = tmp_path / "e2e.json"
    end_to_end.main(["--tiny", "--modes", "eager", "--parts", "train,generate", "--json", str(out)])
    results = json.loads(out.read_text())
    assert max(results["logits"].values()) < 1e-5  # the same weights in both models
    assert set(results["train"]) == {"plain", "packed"}
    assert set(results["train"]["packed"]) == {"maskattn-eager", "hf-eager", "maskattn-own-eager", "hf-own-eager"}
    assert set(results["generate"]) == {"1", "2"} and results["generate"]["1"]["same_tokens"] == 1.0


def test_flags_given_beside_tiny_still_apply():
    args = end_to_end.parse(["--tiny", "--repeats", "3", "--layers", "3", "--long-n", "256"])
    assert (args.repeats, args.layers, args.long_n) == (3, 3, [256])
    assert (args.width, args.warmup, args.gen_batches) == (end_to_end.TINY["width"], 1, [1, 2])


def test_models_that_disagree_are_not_timed(monkeypatch, tmp_path):
    disagreeing = {"plain": 0.5, "packed": 0.0, "own_loss": 0.0}
    monkeypatch.setattr(end_to_end, "check_logits", lambda ours, hf, args: disagreeing)
    timed = []
    monkeypatch.setattr(end_to_end, "bench_train", lambda *a: timed.append("train"))
    monkeypatch.setattr(end_to_end, "bench_generate", lambda *a: timed.append("generate"))
    out = tmp_path / "e2e.json"
    with pytest.raises(SystemExit, match="disagree before anything is timed"):
        end_to_end.main(["--tiny", "--modes", "eager", "--parts", "train,generate", "--json", str(out)])
    assert timed == [] and not out.exists()


def test_tiny_train_memory_measures_each_case_and_a_child_reports_it():
    # each case here (a child per case costs ~7 s of imports), then two children: at the tiny sizes the own-loss
    # step needs well under 5 MB (a fresh process's first step also sets the libraries up: ~40 MB, not counted);
    # with GPT-2's vocabulary, the whole (2, 64, 50257) fp32 logits (25.7 MB) must show
    args = end_to_end.parse(["--tiny"])
    peaks = [end_to_end.train_memory_here(name, args) for name in ("maskattn-own", "hf-logits", "hf-own")]
    assert all(math.isfinite(p) for p in peaks)
    assert float(end_to_end.child(["train", "maskattn-own"], args)) < 5
    assert float(end_to_end.child(["train", "maskattn-logits"], end_to_end.parse(["--tiny", "--vocab", "50257"]))) > 25


def test_tiny_cache_child_keeps_the_window():
    args = end_to_end.parse(["--tiny"])
    row = json.loads(end_to_end.cache_memory_here("window", 64, 8, args))
    assert row["slots"] == 8 and row["peak_mb"] >= 0


def test_lm_head_benchmark_smoke_run(tmp_path):
    from benchmarks import lm_head

    out = tmp_path / "head.json"
    result = lm_head.main(["--vocab", "300", "--width", "16", "--rows", "1,3,9", "--repeats", "1", "--inner", "1",
                           "--json", str(out)])
    assert set(result["rows"]) == {"1", "3", "9"} and json.loads(out.read_text()) == result


def test_long_time_ratio_is_the_largest_n_over_the_smallest_in_any_order(monkeypatch):
    # the docstring's T(largest) / T(smallest): --long-n 1024,512 timed 3 s at 1024 and 1 s at 512 is 3.0, not 1/3
    monkeypatch.setattr(end_to_end.attn_bench, "WINDOW", end_to_end.attn_bench.WINDOW)  # bench_long sets it
    seconds = iter([3.0, 1.0])  # in the order the lengths are timed: 1024, then 512
    monkeypatch.setattr(end_to_end, "interleaved", lambda calls, warmup, repeats: {"blocked": next(seconds)})
    monkeypatch.setattr(end_to_end, "child", lambda what, args=None: "0")
    result = end_to_end.bench_long(end_to_end.parse(["--tiny", "--long-n", "1024,512"]))
    assert (result["1024"]["seconds"], result["512"]["seconds"]) == (3.0, 1.0)
    assert result["time_ratio"] == 3.0


@pytest.mark.parametrize("modes, warmup, expected", [("compiled", "0", 1), ("eager,compiled", "0", 1),
                                                     ("eager", "0", 0), ("compiled", "2", 2)])
def test_compiled_training_steps_are_compiled_in_a_warm_up_never_in_a_timed_round(monkeypatch, modes, warmup,
                                                                                   expected):
    # torch.compile compiles at a model's first call: with --warmup 0 that call was the timed one
    import torch

    rounds = []
    monkeypatch.setattr(end_to_end, "interleaved", lambda calls, warmup, repeats: (
        rounds.append(warmup), dict.fromkeys(calls, 1.0))[1])
    monkeypatch.setattr(torch, "compile", lambda model: model)
    args = end_to_end.parse(["--tiny", "--modes", modes, "--warmup", warmup])
    model = torch.nn.Linear(1, 1)  # nothing is called: interleaved is patched out
    end_to_end.bench_train(model, model, args)
    assert rounds == [expected, expected]  # plain and packed rows


def test_interleaved_alternates_the_calls_and_takes_the_median_after_the_warm_up(monkeypatch):
    clock, order = [0.0], []
    durations = {"a": iter([100.0, 1.0, 3.0, 2.5]), "b": iter([100.0, 5.0, 7.0, 9.0])}  # the warm-up round: 100 s

    def call(name):
        order.append(name)
        clock[0] += next(durations[name])

    monkeypatch.setattr(end_to_end.time, "perf_counter", lambda: clock[0])
    got = end_to_end.interleaved({"a": lambda: call("a"), "b": lambda: call("b")}, warmup=1, repeats=3)
    assert order == ["a", "b"] * 4
    assert got == {"a": 2.5, "b": 7.0}


def test_report_prints_maskattn_over_hf_speeds_above_one_when_maskattn_is_faster(capsys):
    end_to_end.report({"logits": {}, "train": {"plain": {"maskattn-eager": 300.0, "hf-eager": 100.0}},
                       "generate": {"1": {"maskattn": 50.0, "hf": 200.0, "same_tokens": 1.0}}})
    out = capsys.readouterr().out
    assert "maskattn-eager / hf-eager = 3.00x" in out and "hf 200.0 tok/s, 0.25x" in out, out


def test_lm_head_speedup_is_linear_time_over_step_logits_time(monkeypatch):
    from benchmarks import lm_head

    ms = iter([4.0, 1.0])  # one round: F.linear 4 ms, then step_logits 1 ms
    monkeypatch.setattr(lm_head, "time_ms", lambda call, inner: next(ms))
    result = lm_head.main(["--vocab", "300", "--width", "16", "--rows", "1", "--repeats", "1"])
    assert result["rows"]["1"] == {"linear": 4.0, "step_logits": 1.0, "speedup": 4.0}


def test_memory_children_build_the_model_the_parent_was_given(monkeypatch):
    # the GPT-2's position table is max(block, packed block, prompt + new) long: a child that fell back to the
    # defaults of the flags it was not given measured a model with another table (and its gradient)
    import subprocess
    from types import SimpleNamespace

    args = end_to_end.parse(["--tiny", "--block", "32", "--packed-block", "96", "--prompt", "8", "--new", "4"])
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: (seen.append(cmd), SimpleNamespace(stdout="0"))[1])
    end_to_end.child(["train", "maskattn-own"], args)
    child_args = end_to_end.parse(seen[0][3:])
    for name in ("layers", "width", "heads", "vocab", "block", "batch", "packed_block", "prompt", "new"):
        assert getattr(child_args, name) == getattr(args, name), name
