"""Compressed models against their originals, side by side: file size, linear-weight bytes, CPU
latency and quality (issue 18, part 1), as one table and a quality-against-size plot.

Run (the first model of each task is the baseline the others are compared with)::

    python -m benchmarks.compression \\
        --translation runs/multi30k/model runs/multi30k-int8 runs/multi30k-pruned \\
        --translation-data test2016.de.gz test2016.en.gz \\
        --classification runs/sst2-minilm/model runs/sst2-minilm-int8 --classification-data dev.tsv \\
        --plot docs/images/compression.png

Latency: translation beam-decodes the whole test file with each model's own decoding settings
(seconds; speed-up = baseline seconds / seconds); classification labels the whole file (examples per
second). Each is the best of ``--repeats`` runs after one warm-up on the first few inputs. Quality:
BLEU (translation) and accuracy (classification), and the change from the baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.args import output_path, positive_int, require_file, require_model
from benchmarks.attention import provenance
from maskattn.compression import heads, linear_weight_bytes
from maskattn.data import read_labelled
from maskattn.plotting import plot_tradeoff
from maskattn.tasks import classification, translation

MB = 1e6


def _best_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_translation(directory: str, src: str, ref: str, repeats: int) -> dict[str, Any]:
    model, tok, decode = translation.load(directory)
    pairs = translation.read_pairs(src, ref)
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    with torch.inference_mode():
        translation.translate(model, tok, sources[:8], decode)  # warm-up
        seconds, hyps = _best_time(lambda: translation.translate(model, tok, sources, decode), repeats)
    return {"latency": seconds, "latency_unit": "s", "quality": translation.score(hyps, refs)["bleu"],
            "metric": "BLEU", "model": model}


def measure_classification(directory: str, path: str, repeats: int) -> dict[str, Any]:
    model, tok, task = classification.load(directory)
    records = read_labelled(path, text_field=task["text_field"], label_field=task["label_field"])
    texts, gold = [t for t, _ in records], [label for _, label in records]
    with torch.inference_mode():
        classification.predict(model, tok, task["labels"], texts[:8], max_len=task.get("max_len"))  # warm-up
        seconds, predicted = _best_time(
            lambda: classification.predict(model, tok, task["labels"], texts, max_len=task.get("max_len")), repeats)
    return {"latency": len(texts) / seconds, "latency_unit": "ex/s",
            "quality": classification.score(predicted, gold)["accuracy"], "metric": "accuracy", "model": model}


def row(task: str, directory: str, measured: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    model = measured.pop("model")
    out = {"task": task, "model": directory, "heads": heads(model),
           "file_mb": (Path(directory) / "model.safetensors").stat().st_size / MB,
           "linear_mb": linear_weight_bytes(model) / MB, **measured}
    base = base or out
    out["linear_smaller"] = base["linear_mb"] / out["linear_mb"]
    faster = base["latency"] / out["latency"] if out["latency_unit"] == "s" else out["latency"] / base["latency"]
    out.update(faster=faster, quality_change=out["quality"] - base["quality"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--translation", nargs="+", default=[], metavar="MODEL",
                        help="translation model directories, the baseline first")
    parser.add_argument("--translation-data", nargs=2, metavar=("SRC", "REF"), help="test source and references")
    parser.add_argument("--classification", nargs="+", default=[], metavar="MODEL",
                        help="classification model directories, the baseline first")
    parser.add_argument("--classification-data", metavar="FILE", help="a labelled test file")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed runs per model; the best counts (default 3)")
    parser.add_argument("--plot", type=output_path, default="compression.png", help="the quality-against-size PNG")
    parser.add_argument("--json", type=output_path, help="also write the rows here")
    args = parser.parse_args()
    if (args.translation and not args.translation_data) or (args.classification and not args.classification_data):
        parser.error("each task's models need that task's data (--translation-data / --classification-data)")
    for task in ("translation", "classification"):  # before any model is loaded or timed
        for directory in getattr(args, task):
            require_model(parser, f"--{task}", directory, task)
    for path in args.translation_data or []:
        require_file(parser, "--translation-data", path)
    if args.classification_data:
        require_file(parser, "--classification-data", args.classification_data)
    rows: list[dict[str, Any]] = []
    for task, dirs, measure in (
            ("translation", args.translation, lambda d: measure_translation(d, *args.translation_data, args.repeats)),
            ("classification", args.classification,
             lambda d: measure_classification(d, args.classification_data, args.repeats))):
        base = None
        for directory in dirs:
            rows.append(row(task, directory, measure(directory), base))
            base = base or rows[-1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'task':15} {'model':40} {'heads':>5} {'file MB':>8} {'linear MB':>9} {'smaller':>7} "
          f"{'latency':>12} {'faster':>6} {'quality':>14} {'change':>7}")
    for r in rows:
        print(f"{r['task']:15} {r['model'][-40:]:40} {r['heads']:5d} {r['file_mb']:8.2f} {r['linear_mb']:9.2f} "
              f"{r['linear_smaller']:6.2f}x {r['latency']:8.2f} {r['latency_unit']:>4} {r['faster']:5.2f}x "
              f"{r['quality']:7.2f} {r['metric']:>6} {r['quality_change']:+7.2f}")
    panels: dict[str, list[tuple[str, float, float]]] = {}
    for r in rows:
        name = Path(r["model"])
        label = name.parent.name if name.name == "model" else name.name  # runs/NAME/model: NAME
        panels.setdefault(r["task"], []).append((label, r["file_mb"], r["quality"]))
    plot_tradeoff(panels, args.plot, xlabel="weight file (MB)",
                  ylabels={r["task"]: r["metric"] for r in rows})
    print(f"wrote {args.plot}")
    if args.json:
        record = {"machine": provenance("benchmarks.compression"), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
