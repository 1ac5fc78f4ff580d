"""benchmarks/attention.py (and the flags every benchmark shares): bad flag values refused before any work, outputs
checked against a reference before anything is timed, the ratio columns the right way round, peak memory that is
the call's own."""

import importlib
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import attention

import maskattn


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


@pytest.mark.parametrize("kind", attention.MASKS)
def test_reference_rows_are_the_reference_backend_on_those_rows(kind):
    n = 100
    mask = attention.make_mask(kind, n)
    qkv = attention._inputs(n, False)
    expected = maskattn.attention(*(x.double() for x in qkv), mask, backend="reference")
    rows = attention.reference_rows(mask, n, qkv)
    assert sorted(rows) == [0, 18, 36]  # 64 rows at the start, middle and end
    for start, got in rows.items():
        torch.testing.assert_close(got, expected[:, :, start:start + 64])


def test_an_implementation_that_disagrees_is_reported_and_not_timed(monkeypatch, tmp_path, capsys):
    real = attention.make_impls

    def with_a_wrong_one(names, mask, n):
        impls = real([x for x in names if x != "naive"], mask, n)
        impls["naive"] = lambda q, k, v: impls["sdpa_mask"](q, k, v) * 1.001  # off by 0.1%
        return impls

    monkeypatch.setattr(attention, "make_impls", with_a_wrong_one)
    times, _, wrong = attention.time_config("causal", 64, ["auto", "sdpa_mask", "naive"], 0, 1, 8192)
    assert set(times) == {"auto", "sdpa_mask"} and set(wrong) == {"naive"} and 1e-4 < wrong["naive"] < 1e-2
    monkeypatch.setattr(attention, "_time_matmul", lambda a, b: 1.0)  # not the 4096^3 matmul
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_:
        attention.main(["--sizes", "64", "--masks", "causal", "--impls", "auto,sdpa_mask,naive", "--repeats", "1",
                        "--json", str(out)])
    assert "not timed" in str(exit_.value.code)
    result = json.loads(out.read_text())
    assert {row["impl"] for row in result["rows"]} == {"auto", "sdpa_mask"}
    assert [d["impl"] for d in result["disagreements"]] == ["naive"]
    assert "naive      WRONG" in capsys.readouterr().out


def test_ratios_are_baseline_time_over_implementation_time_of_medians(monkeypatch, tmp_path):
    # fwd+bwd seconds per repetition: auto 1, 2, 9 (median 2), sdpa_mask 6, 6, 6: "auto is 3x faster"
    seconds = {"auto": iter([1.0, 2.0, 9.0]), "sdpa_mask": iter([6.0, 6.0, 6.0])}
    monkeypatch.setattr(attention, "make_impls", lambda names, mask, n: {
        name: (lambda q, k, v, name=name: torch.zeros_like(q)) for name in names})
    monkeypatch.setattr(attention, "reference_rows", lambda mask, n, qkv: {})
    monkeypatch.setattr(attention, "disagreement", lambda run, qkv, ref: 0.0)
    monkeypatch.setattr(attention, "_time_forward", lambda run, qkv: 1.0)
    monkeypatch.setattr(attention, "_time_backward", lambda run, qkv, grad: next(seconds[run.__defaults__[0]]))
    monkeypatch.setattr(attention, "_time_matmul", lambda a, b: 1.0)
    out = tmp_path / "r.json"
    attention.main(["--sizes", "16", "--masks", "causal", "--impls", "auto,sdpa_mask", "--warmup", "0", "--repeats",
                    "3", "--json", str(out)])
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["auto"]["fwd_bwd_s"] == 2.0 and rows["auto"]["speedup_vs_sdpa_mask"] == 3.0
    assert rows["sdpa_mask"]["speedup_vs_sdpa_mask"] == 1.0 and math.isnan(rows["auto"]["speedup_vs_sdpa_best"])


def _last_line_of_a_fresh_process(code: str) -> str:
    """The last line ``code`` prints in a new Python process with glibc's default allocator settings: a peak read in
    this test process depends on the freed memory that earlier tests left its allocator to reuse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    return run.stdout.splitlines()[-1]


def test_extra_peak_memory_of_a_known_allocation():
    mb = float(_last_line_of_a_fresh_process(  # 100 MB, every page written
        "import torch\nfrom benchmarks import attention\nheld = []\n"
        "print(attention.extra_peak_mb(lambda: held.append(torch.ones(25 * 2**20))))"))
    assert 95 < mb < 110, mb


def test_peak_memory_in_a_fresh_process_is_the_calls_own():
    # a forward+backward at N = 16 needs ~0.2 MB; a fresh process's first one also sets libraries up (~40 MB)
    assert attention.measure_memory("causal", 16, "auto") < 5


def test_mask_stats_reports_the_median_of_an_even_number_of_repeats(monkeypatch, capsys):
    from benchmarks import mask_stats

    clock = iter([0.0, 1.0, 10.0, 13.0])  # two timed calls: 1 s and 3 s, median 2 s
    first = mask_stats.cases(256)[:1]
    monkeypatch.setattr(mask_stats, "cases", lambda n: first)
    monkeypatch.setattr(mask_stats.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(sys, "argv", ["mask_stats", "--length", "256", "--repeats", "2"])
    mask_stats.main()
    assert "2000.0 ms" in capsys.readouterr().out.splitlines()[-1]


def _saved_lm(directory: Path, task: str = "lm") -> Path:
    from maskattn.models import DecoderLM, DecoderLMConfig
    from maskattn.tasks.common import write_task
    from maskattn.tokenization import Tokenizer

    tok = Tokenizer.train_chars(["abcdef"])
    DecoderLM(DecoderLMConfig(vocab_size=tok.vocab_size, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                              max_len=16)).save(directory, tokenizer=tok)
    write_task(directory, {"task": task})
    return directory


@pytest.mark.parametrize("module, argv, flag, given", [
    ("nanogpt_val_estimate", ["{missing}"], "argument model",
     "{missing}: no such directory, expected a model directory"),
    ("nanogpt_val_estimate", ["{lm}", "--text", "{missing}"], "argument --text", "'{missing}' (no such file)"),
    ("compression", ["--translation", "{missing}", "--translation-data", "{lm}/task.json", "{lm}/task.json"],
     "argument --translation", "{missing}: no such directory, expected a model directory"),
    ("compression", ["--classification", "{lm}", "--classification-data", "{lm}/task.json"],
     "argument --classification", "holds a 'lm' model, not a 'classification' one"),
    ("compression", ["--translation-data", "{lm}/task.json", "{missing}"], "argument --translation-data",
     "'{missing}' (no such file)"),
    ("compression", ["--classification-data", "{missing}"], "argument --classification-data", "'{missing}'"),
])
def test_a_missing_model_or_file_is_one_error_naming_it_before_any_work(module, argv, flag, given, tmp_path,
                                                                         monkeypatch, capsys):
    names = {"missing": str(tmp_path / "missing"), "lm": str(_saved_lm(tmp_path / "lm"))}
    argv = [a.format(**names) for a in argv]
    from maskattn.tasks import classification, lm, translation

    for task in (lm, translation, classification):  # any work would start by loading a model
        monkeypatch.setattr(task, "load", lambda *a: pytest.fail("loaded a model"))
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"benchmarks.{module}").main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"{flag}: " in err and given.format(**names) in err, err


def test_attention_gpu_does_not_time_an_implementation_that_disagrees(monkeypatch, capsys):
    # run on CPU tensors, with torch.cuda's synchronisation and memory counters stubbed out
    from benchmarks import attention_gpu

    for name, stub in (("synchronize", lambda: None), ("reset_peak_memory_stats", lambda: None),
                       ("memory_allocated", lambda: 0), ("max_memory_allocated", lambda: 0)):
        monkeypatch.setattr(torch.cuda, name, stub)
    real = attention_gpu.make_impls

    def with_a_wrong_one(names, mask, n, device):
        impls = real([x for x in names if x != "blocked"], mask, n, device)
        impls["blocked"] = lambda q, k, v: impls["sdpa_mask"](q, k, v) * 1.001  # off by 0.1%
        return impls

    monkeypatch.setattr(attention_gpu, "make_impls", with_a_wrong_one)
    args = attention_gpu.argparse.Namespace(impls=["auto", "blocked", "sdpa_mask"], dtype="fp32", batch=1, heads=2,
                                            head_dim=16, warmup=0, repeats=1)
    rows, wrong = attention_gpu.run_config("causal", 64, args, device="cpu")
    assert set(rows) == {"auto", "sdpa_mask"} and rows["auto"]["max_err"] < 1e-5
    assert set(wrong) == {"blocked"} and 1e-4 < wrong["blocked"] < 1e-2
    assert "blocked: WRONG" in capsys.readouterr().out


def test_cheap_weights_peak_of_a_known_allocation():
    mb = float(_last_line_of_a_fresh_process(  # 2**16 floats are a quarter MB: 100 MB
        "import torch\nfrom benchmarks import cheap_weights\n"
        "print(cheap_weights.measure(lambda k: (lambda: torch.ones(k * 2**16).sum()), 400)[1])"))
    assert 95 < mb < 110, mb


def test_cheap_weights_measures_a_full_size_call_after_a_small_warm_up_only(monkeypatch):
    # a full-size warm-up leaves freed memory the allocator keeps and the measured call reuses: the peak read low
    from benchmarks import cheap_weights

    seen = []
    forward = cheap_weights.DecoderLM.forward
    monkeypatch.setattr(cheap_weights.DecoderLM, "forward", lambda self, x, *a, **k: (
        seen.append(x.shape[1]), forward(self, x, *a, **k))[1])
    monkeypatch.setattr(cheap_weights, "extra_peak_mb", lambda call, warmup: attention.extra_peak_mb(
        call, lambda: (warmup(), seen.append("measured:")) if warmup else None), raising=False)
    row = cheap_weights.child("plain", 128)
    # the figure itself may read 0 in a test process whose allocator already holds freed pages (CI did once);
    # that extra_peak_mb counts a real allocation is tested above with 100 MB written
    assert seen == [64, "measured:", 128, 128, 128, 128] and isinstance(row["peak_extra_mb"], float), seen


def test_provenance_is_the_machine_and_the_exact_command_line():
    got = attention.provenance("benchmarks.lm_head", ["--vocab", "8", "--json", "my results.json"])
    assert got["command"] == "python -m benchmarks.lm_head --vocab 8 --json 'my results.json'"
    assert got["torch"] == torch.__version__ and got["torch_threads"] == torch.get_num_threads()
    assert got["cores"] and "cpu" in got and "gpu" in got


def _skip_the_work(module, monkeypatch, tmp_path):
    """Patch out each benchmark's measurements (their own tests cover them): what is left writes the JSON."""
    if module.__name__.endswith(".attention"):
        monkeypatch.setattr(module, "_time_matmul", lambda a, b: 1.0)
    elif module.__name__.endswith("attention_gpu"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
        monkeypatch.setattr(module, "run_config", lambda kind, n, args: ({}, {}))
    elif module.__name__.endswith("end_to_end"):
        monkeypatch.setattr(module, "bench_long", lambda args: {})
        monkeypatch.setattr(module, "report", lambda results: None)
    elif module.__name__.endswith("cheap_weights"):
        row = json.dumps({"method": "plain", "n": 16, "seconds": 1.0, "peak_extra_mb": 1.0})
        monkeypatch.setattr(module.subprocess, "run", lambda *a, **k: type("Done", (), {"stdout": row})())
    elif module.__name__.endswith("compression"):
        model = _saved_lm(tmp_path / "model", "classification")
        monkeypatch.setattr(module, "measure_classification", lambda d, path, repeats: {})
        monkeypatch.setattr(module, "row", lambda task, d, measured, base: {
            "task": task, "model": d, "heads": 1, "file_mb": 1.0, "linear_mb": 1.0, "latency": 1.0,
            "latency_unit": "s", "quality": 1.0, "metric": "BLEU", "linear_smaller": 1.0, "faster": 1.0,
            "quality_change": 0.0})
        monkeypatch.setattr(module, "plot_tradeoff", lambda *a, **k: None)
        return ["--classification", str(model), "--classification-data", str(model / "task.json"), "--plot",
                str(tmp_path / "p.png")]
    return []


@pytest.mark.parametrize("module, argv", [
    ("attention", ["--sizes", "16", "--masks", "causal", "--impls", "auto", "--repeats", "1"]),
    ("attention_gpu", ["--sizes", "16", "--masks", "causal"]),
    ("end_to_end", ["--parts", "long"]),
    ("lm_head", ["--vocab", "16", "--width", "8", "--rows", "1", "--repeats", "1", "--inner", "1"]),
    ("cheap_weights", ["--sizes", "16"]),
    ("compression", []),
])
def test_every_benchmarks_json_records_the_command_line_torch_threads_and_machine(module, argv, tmp_path,
                                                                                   monkeypatch):
    mod = importlib.import_module(f"benchmarks.{module}")
    argv = [*argv, *_skip_the_work(mod, monkeypatch, tmp_path), "--json", str(tmp_path / "r.json")]
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *argv])  # the mains that read sys.argv
    mod.main(argv) if "argv" in inspect.signature(mod.main).parameters else mod.main()
    machine = json.loads((tmp_path / "r.json").read_text())["machine"]
    assert machine["command"] == " ".join(["python", "-m", f"benchmarks.{module}", *argv])
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == torch.get_num_threads()
    assert machine["cpu"] is not None and machine["cores"] == os.cpu_count()


def test_cheap_weights_children_run_outside_the_repository(tmp_path, monkeypatch, capsys):
    # the child re-read the default --json (benchmarks/results/...) and refused it outside the repository root,
    # although the parent wrote elsewhere and the child writes nothing: a CalledProcessError traceback
    import subprocess
    from types import SimpleNamespace

    from benchmarks import cheap_weights

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cheap_weights, "child", lambda method, n: {"method": method, "n": n, "seconds": 1.0,
                                                                    "peak_extra_mb": 0.0})

    def run_child_here(cmd, **kwargs):  # the child's own command line, parsed in this directory
        assert cmd[:3] == [sys.executable, "-m", "benchmarks.cheap_weights"], cmd
        capsys.readouterr()
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", cmd[2:])
            try:
                cheap_weights.main()
            except SystemExit as e:
                raise subprocess.CalledProcessError(e.code, cmd, capsys.readouterr().out) from None
        return SimpleNamespace(stdout=capsys.readouterr().out)

    monkeypatch.setattr(cheap_weights.subprocess, "run", run_child_here)
    monkeypatch.setattr(sys, "argv", ["cheap_weights", "--sizes", "16", "--json", str(tmp_path / "out.json")])
    cheap_weights.main()
    assert [r["method"] for r in json.loads((tmp_path / "out.json").read_text())["results"]] == cheap_weights.METHODS


def _blocked_wrong_at_64_rows(monkeypatch):
    """benchmarks' ``blocked.attention`` off by 0.1% with 64-row tiles, right with the others."""
    from maskattn.backends import blocked

    real = blocked.attention

    def attention_(q, k, v, mask, *args, block_q=blocked.BLOCK_Q, **kwargs):
        out, *rest = real(q, k, v, mask, *args, block_q=block_q, **kwargs)
        return (out * 1.001 if block_q == 64 else out, *rest)

    monkeypatch.setattr(blocked, "attention", attention_)


def test_block_sizes_does_not_time_a_tiling_that_disagrees(monkeypatch, capsys):
    from benchmarks import block_sizes

    _blocked_wrong_at_64_rows(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["block_sizes", "--masks", "window", "--n", "64", "--repeats", "1"])
    with pytest.raises(SystemExit) as exit_:
        block_sizes.main()
    assert "not timed" in str(exit_.value.code)
    lines = {" ".join(line.split()[1:4]): line for line in capsys.readouterr().out.splitlines()[1:]}
    wrong = {tile for tile, line in lines.items() if "WRONG" in line}
    assert wrong == {"64 x 64", "64 x 128"} and len(lines) == 2 + len(block_sizes.TILES), lines


def test_blocked_window_does_not_time_a_tiling_that_disagrees(monkeypatch, capsys):
    from benchmarks import blocked_window

    _blocked_wrong_at_64_rows(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["blocked_window", "--n", "64", "--repeats", "1"])
    with pytest.raises(SystemExit) as exit_:
        blocked_window.main()
    assert "not timed" in str(exit_.value.code)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if "WRONG" in line] == ["64x64"]
    assert sum("vs SDPA + mask tensor" in line for line in lines) == len(blocked_window.SIZES) + 1  # timed: the rest


def _brute_force_mask(kind: str, n: int) -> torch.Tensor:
    """The benchmark's mask kinds written out from positions (docs/performance.md, Method): (n, n) bool."""
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    if kind == "none":
        return torch.ones(n, n, dtype=torch.bool)
    if kind == "causal":
        return k <= q
    if kind == "padding":  # the last quarter of the keys is padding
        return (k < 3 * n // 4).expand(n, n)
    if kind == "window":  # causal, the last 256 keys
        return (k <= q) & (k > q - 256)
    if kind == "document":  # documents of 10, 20, 30, 40% of n
        doc = sum((torch.arange(n) >= n * tenths // 10).long() for tenths in (1, 3, 6))
        return doc[:, None] == doc[None]
    assert kind == "prefix"
    return (k <= q) | (k < n // 4)


@pytest.mark.parametrize("n", [1, 7, 100, 4100])  # 4100: more than one chunk of rows
def test_allowed_pairs_counts_the_entries_each_mask_allows(n):
    for kind in attention.MASKS:
        assert attention.allowed_pairs(attention.make_mask(kind, n), n) == int(_brute_force_mask(kind, n).sum()), kind


def test_pct_matmul_is_allowed_flops_per_second_over_the_matmul_rate(monkeypatch, tmp_path, capsys):
    # causal N = 16: 136 allowed pairs per head, 8 heads; 4 * 64 flops a pair forward, 3.5 times that with backward
    monkeypatch.setattr(attention, "make_impls", lambda names, mask, n: {
        name: (lambda q, k, v: torch.zeros_like(q)) for name in names})
    monkeypatch.setattr(attention, "reference_rows", lambda mask, n, qkv: {})
    monkeypatch.setattr(attention, "disagreement", lambda run, qkv, ref: 0.0)
    monkeypatch.setattr(attention, "_time_forward", lambda run, qkv: 0.5)
    monkeypatch.setattr(attention, "_time_backward", lambda run, qkv, grad: 2.0)
    monkeypatch.setattr(attention, "_time_matmul", lambda a, b: 4.0)
    out = tmp_path / "r.json"
    attention.main(["--sizes", "16", "--masks", "causal", "--impls", "auto", "--warmup", "0", "--repeats", "1",
                    "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    matmul_flops_per_s = 2 * 4096**3 / 4.0
    flops = 4 * 64 * 8 * 136
    assert row["allowed_fraction"] == 136 / 256
    assert row["matmul_gflops"] == pytest.approx(matmul_flops_per_s / 1e9)
    assert row["fwd_pct_matmul"] == pytest.approx(100 * flops / 0.5 / matmul_flops_per_s)
    assert row["fwd_bwd_pct_matmul"] == pytest.approx(100 * 3.5 * flops / 2.0 / matmul_flops_per_s)
    printed = capsys.readouterr().out.splitlines()[2].split()  # the table row, as the JSON's figures
    assert printed[6:8] == [f"{row['fwd_pct_matmul']:.1f}%", f"{row['fwd_bwd_pct_matmul']:.1f}%"], printed


def test_attention_interleaves_implementations_and_leaves_the_warm_up_out(monkeypatch):
    order = []
    fwd = {"auto": iter([100.0, 1.0, 3.0, 2.0]), "sdpa_mask": iter([100.0, 6.0, 4.0, 5.0])}  # warm-up: 100 s
    bwd = {"auto": iter([100.0, 2.0, 2.0, 8.0]), "sdpa_mask": iter([100.0, 1.0, 9.0, 3.0])}
    monkeypatch.setattr(attention, "make_impls", lambda names, mask, n: {
        name: (lambda q, k, v, name=name: torch.zeros_like(q)) for name in names})
    monkeypatch.setattr(attention, "disagreement", lambda run, qkv, ref: 0.0)
    monkeypatch.setattr(attention, "_time_forward", lambda run, qkv: (
        order.append(run.__defaults__[0]), next(fwd[run.__defaults__[0]]))[1])
    monkeypatch.setattr(attention, "_time_backward", lambda run, qkv, grad: next(bwd[run.__defaults__[0]]))
    matmul = iter([1.0, 4.0, 2.0])  # timed rounds only: median 2 s
    monkeypatch.setattr(attention, "_time_matmul", lambda a, b: next(matmul))
    times, gflops, wrong = attention.time_config("causal", 16, ["auto", "sdpa_mask"], 1, 3, 8192)
    assert order == ["auto", "sdpa_mask"] * 4 and wrong == {}
    assert times == {"auto": (2.0, 2.0), "sdpa_mask": (5.0, 3.0)}
    assert gflops == pytest.approx(2 * 4096**3 / 2.0 / 1e9)
