"""benchmarks/attention.py (and the flags every benchmark shares): bad flag values refused before any work, outputs
checked against a reference before anything is timed, the ratio columns the right way round, peak memory that is
the call's own."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import attention


def test_extra_peak_memory_of_a_known_allocation():
    held = []
    mb = attention.extra_peak_mb(lambda: held.append(torch.ones(25 * 2**20)))  # 100 MB, every page written
    assert 95 < mb < 110, mb


def test_peak_memory_in_a_fresh_process_is_the_calls_own():
    # a forward+backward at N = 16 needs ~0.2 MB; a fresh process's first one also sets libraries up (~40 MB)
    assert attention.measure_memory("causal", 16, "auto") < 5
