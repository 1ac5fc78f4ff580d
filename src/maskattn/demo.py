"""The embedded default: train a small Transformer to turn written dates into ISO dates, on the CPU.

``maskattn demo`` generates the data (deterministic from a seed), trains, prints the exact match on
held-out dates and a few translations, and draws the cross-attention of one example.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from maskattn import metrics
from maskattn.data import pad
from maskattn.models import TransformerConfig
from maskattn.plotting import plot_curves
from maskattn.run_directory import prepare_run_directory
from maskattn.tasks import dates, translation
from maskattn.training import TrainConfig
from maskattn.viz import capture_attention, head_grid, heatmap


def demo_config(out: str, steps: int, seed: int) -> translation.TranslationConfig:
    """A pre-LN Transformer of 0.24M parameters, sized to reach >= 99% in well under three minutes on 2 cores."""
    return translation.TranslationConfig(
        data=translation.DataConfig(tokenizer="chars", max_tokens=2000, max_len=64, valid_limit=300),
        model=TransformerConfig.preset("tiny", d_model=64, num_heads=4, d_ff=256, num_encoder_layers=2,
                                       num_decoder_layers=2, max_len=64, dropout=0.0, norm_first=True),
        train=TrainConfig(steps=steps, lr=3e-3, warmup=100, schedule="cosine", eval_every=0,
                          checkpoint_every=200, metric="exact_match", higher_is_better=True, log_every=50,
                          seed=seed),
        decode=translation.DecodeConfig(beam_size=1),
        label_smoothing=0.0,
        out=out,
    )


def run(out: str = "runs/demo", steps: int = 2000, seed: int = 0, resume: bool = False,
        overwrite: bool = False) -> dict[str, Any]:
    """Train and report; ``resume`` continues the run in ``out``, ``overwrite`` deletes it first (a
    directory that is not empty needs one of them, see :func:`maskattn.run_directory.prepare_run_directory`)."""
    start = time.perf_counter()
    prepare_run_directory(out, resume=resume, overwrite=overwrite)
    train_pairs, valid_pairs, test_pairs = dates.splits(seed=seed)
    print(f"dates -> ISO: {len(train_pairs)} training pairs, {len(test_pairs)} held-out test pairs, e.g. "
          f"{train_pairs[0][0]!r} -> {train_pairs[0][1]!r}")
    cfg = demo_config(out, steps, seed)
    trained = translation.train(cfg, train_pairs, valid_pairs, resume=resume)
    plot_curves(Path(out) / "metrics.jsonl")  # curves.png beside it
    model, tok, decode = translation.load(trained["model"])
    sources = [s for s, _ in test_pairs]
    hypotheses = translation.translate(model, tok, sources, decode)
    exact = 100 * metrics.accuracy(hypotheses, [t for _, t in test_pairs])
    print(f"exact match: {exact:.1f}% on {len(test_pairs)} held-out dates")
    for (source, target), hyp in list(zip(test_pairs, hypotheses, strict=True))[:6]:
        print(f"  {source!r:>42} -> {hyp}  {'ok' if hyp == target else 'expected ' + target}")
    picture = cross_attention_picture(model, tok, sources[0], hypotheses[0], Path(out) / "cross_attention.png")
    print(f"cross-attention of {sources[0]!r}: {picture}")
    seconds = time.perf_counter() - start
    print(f"total wall time: {seconds:.0f} s (training {trained['train_seconds']:.0f} s); model in {trained['model']}")
    return {"exact_match": exact, "seconds": seconds, "picture": str(picture), "model": trained["model"]}


def cross_attention_picture(model, tok, source: str, output: str, path: Path) -> Path:
    """Heatmap of the last decoder layer's cross-attention, averaged over heads, plus one panel per head."""
    src_ids, out_ids = tok.encode(source), tok.encode(output)
    src, _ = pad([src_ids], tok.pad_id)
    tgt, _ = pad([[tok.bos_id, *out_ids]], tok.pad_id)
    model.eval()
    with torch.no_grad(), capture_attention(model) as weights:
        model(src, tgt)
    name = f"decoder.layers.{len(model.decoder.layers) - 1}.cross_attn"
    w = weights[name][0][0]  # (H, Lt, Ls)
    x_labels = [tok.backend.id_to_token(i) for i in src_ids]
    y_labels = [tok.backend.id_to_token(i) for i in [*out_ids, tok.eos_id]]  # what each row predicts
    heatmap(w.mean(0), path, x_labels=x_labels, y_labels=y_labels, xlabel="source character",
            ylabel="predicted character", title=f"cross-attention, last decoder layer, mean of {w.shape[0]} heads")
    head_grid(w, path.with_name(path.stem + "_heads.png"), x_labels=x_labels, y_labels=y_labels,
              title="cross-attention per head, last decoder layer")
    return path
