"""Smoke run of benchmarks/end_to_end.py at --tiny sizes: it runs and writes every figure (no timing checked)."""

import json
import sys
from pathlib import Path

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


def test_tiny_train_memory_children_run(tmp_path):
    out = tmp_path / "mem.json"
    end_to_end.main(["--tiny", "--parts", "train-memory", "--json", str(out)])
    peaks = json.loads(out.read_text())["train-memory"]
    assert set(peaks) == {"maskattn-logits", "maskattn-own", "hf-logits", "hf-own"}
    assert all(p >= 0 for p in peaks.values())


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
