"""Pictures with matplotlib (the viz layer: nothing below it imports matplotlib).

:func:`plot_curves` draws a training run's ``metrics.jsonl`` (written by
:class:`maskattn.training.Trainer`) as ``curves.png``; ``maskattn train`` and the demo call it once
training has finished.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(log: str | Path, out: str | Path | None = None) -> Path | None:
    """Plot training loss and evaluation metrics from a ``metrics.jsonl`` into a PNG.

    Args:
        log: the run's ``metrics.jsonl``.
        out: the PNG to write (default: ``curves.png`` beside ``log``).

    Returns:
        The PNG's path, or None when ``log`` does not exist (nothing was trained).
    """
    log = Path(log)
    out = Path(out) if out is not None else log.with_name("curves.png")
    if not log.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = sorted({k for r in records for k in r if k.startswith("eval_")})
    fig, axes = plt.subplots(1, 1 + bool(evals), figsize=(6 + 5 * bool(evals), 4), squeeze=False)
    if train:
        axes[0, 0].plot(*zip(*train, strict=True), label="train loss")
    axes[0, 0].set(xlabel="step", ylabel="loss", title="training loss")
    for key in evals:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes[0, -1].plot(*zip(*points, strict=True), marker="o", label=key)
    if evals:
        axes[0, -1].set(xlabel="step", title="evaluation")
        axes[0, -1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
