import gzip
import json
import shutil
from pathlib import Path

import pytest

from maskattn.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
needs_multi30k = pytest.mark.skipif(not SHARED.is_dir(), reason=f"Multi30k not found at {SHARED}")


def _head(src: Path, dst: Path, n: int) -> Path:
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


@needs_multi30k
def test_train_translate_evaluate_and_resume_from_the_cli(tmp_path, capsys):
    files = {name: _head(SHARED / f"{name}.gz", tmp_path / name, 300 if name.startswith("train") else 20)
             for name in ("train.de", "train.en", "val.de", "val.en")}
    out = tmp_path / "run"
    args = ["train", "translation", "--train-src", str(files["train.de"]), "--train-tgt", str(files["train.en"]),
            "--valid-src", str(files["val.de"]), "--valid-tgt", str(files["val.en"]), "--out", str(out),
            "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.num_encoder_layers=1",
            "--set", "model.num_decoder_layers=1", "--set", "data.vocab_size=300", "--set", "train.steps=6",
            "--set", "train.checkpoint_every=3", "--set", "train.warmup=2",
            "--set", "train.log_every=1", "--set", "train.progress=false",
            "--set", "decode.beam_size=2"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"bleu", "chrf", "exact_match", "train_seconds"} <= set(result)
    assert (out / "curves.png").exists() and (out / "metrics.jsonl").exists()

    # prediction from arguments, twice (deterministic), and after a reload
    sentence = "Ein Mann fährt Fahrrad."
    assert main(["translate", str(out / "model"), sentence]) == 0
    first = capsys.readouterr().out
    copy = shutil.copytree(out / "model", tmp_path / "copy")
    assert main(["translate", str(copy), sentence]) == 0
    assert capsys.readouterr().out == first and first.count("\n") == 1

    assert main(["evaluate", str(out / "model"), "--data", str(files["val.de"]), "--ref", str(files["val.en"])]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0 <= scores["bleu"] <= 100 and 0 <= scores["chrf"] <= 100

    # resuming a finished run to more steps continues from its last checkpoint
    assert main([*args[:-4], "--set", "train.steps=8", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))


def test_bad_setting_is_named(capsys):
    assert main(["train", "translation", "--set", "train.lrr=1"]) == 2
    assert "unknown setting 'train.lrr'" in capsys.readouterr().err


def test_show_config_lists_settings(capsys):
    assert main(["train", "translation", "--show-config", "--set", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.001" in out and "model.d_model = 256" in out and "data.tokenizer = 'bpe'" in out
