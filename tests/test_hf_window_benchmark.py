"""Smoke run of benchmarks/hf_window.py at tiny sizes, compiled rows included (no timing checked)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="Hugging Face transformers not installed: pip install 'maskattn[hf]'")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import hf_window


def test_tiny_run_prints_every_row_compiled_ones_included(capsys):
    hf_window.main(["--n", "64", "--hidden", "32", "--layers", "1", "--heads", "4", "--window", "16", "--repeats", "1",
                    "--cases", "window,packed", "--compile", "aot_eager"])
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:2]) for line in lines[2:]}
    assert rows == {(case, impl) for case in ("window", "packed")
                    for impl in ("maskattn", "sdpa", "eager", "maskattn+compile", "sdpa+compile")}


def test_peak_memory_of_a_tiny_step_is_the_steps_own():
    # a step of this model on 64 tokens needs well under 5 MB; a fresh process's first step also sets up (~10 MB)
    argv = ["--n", "64", "--hidden", "32", "--layers", "1", "--heads", "4", "--window", "16"]
    assert hf_window.memory("window", "maskattn", argv) < 5


def test_a_row_whose_loss_differs_from_sdpas_is_reported_and_not_timed(monkeypatch, capsys):
    # maskattn's attention made to drop the mask (every key seen): its loss is not sdpa's, so its step is not timed
    from maskattn import hf

    real = hf.attention
    monkeypatch.setattr(hf, "attention", lambda q, k, v, mask, **kwargs: real(q, k, v, None, **kwargs))
    with pytest.raises(SystemExit) as exit_:
        hf_window.main(["--n", "64", "--hidden", "32", "--layers", "1", "--heads", "4", "--window", "16",
                        "--repeats", "1", "--cases", "window"])
    assert "not timed" in str(exit_.value.code)
    rows = {tuple(line.split()[:2]): line.split()[2] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows[("window", "maskattn")] == "WRONG:" and set(rows) == {("window", x) for x in hf_window.IMPLS}
    assert float(rows[("window", "sdpa")]) > 0 and float(rows[("window", "eager")]) > 0  # timed: step ms
