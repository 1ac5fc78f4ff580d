"""Pictures with matplotlib (the viz layer: nothing below it imports matplotlib).

:func:`plot_mask` draws a mask's (query, key) grid (:meth:`maskattn.masks.Mask.render` draws the same
grid as text); :func:`plot_curves` draws a training run's ``metrics.jsonl`` (written by
:class:`maskattn.training.Trainer`) as ``curves.png``; ``maskattn train`` and the demo call it once
training has finished; :func:`plot_tradeoff` draws quality against size, one panel per task
(``benchmarks/compression.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from maskattn.io import FormatError, atomic_write
from maskattn.masks import Mask

__all__ = ["plot_curves", "plot_mask", "plot_overlays", "plot_tradeoff", "save_figure"]


MAX_CELLS = 256  # cells plot_mask draws along an axis; a longer mask is drawn in blocks of positions


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """``fig.savefig`` to ``path`` whole or not at all (a kill while drawing keeps the previous picture), in the
    format its suffix names; a name without one gets ``.png``, as ``savefig`` gives it. Returns the file written."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if not fmt:  # the temporary name has no suffix to go by: name the format, and the file as savefig would
        fmt, path = "png", path.with_name(f"{path.name}.png")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def plot_mask(
    mask: Mask,
    q_len: int | None = None,
    k_len: int | None = None,
    *,
    q_offset: int = 0,
    batch: int = 0,
    head: int = 0,
    path: str | None = None,
    ax=None,
):
    """Draw the mask of one (batch, head) with matplotlib: dark = may attend. Beyond ``MAX_CELLS`` (256) positions
    along an axis, each cell is a block of positions, dark where any of them may attend (the title says so).

    Args:
        mask: the mask to draw.
        q_len: queries to draw (default: the mask's own length, else 16).
        k_len: keys to draw (default ``q_offset + q_len``).
        q_offset: absolute position of the first query drawn.
        batch: which batch item of a batch-dependent mask.
        head: which head of a head-dependent mask.
        path: write a PNG there.
        ax: draw into these matplotlib Axes instead of a new figure.

    Returns:
        The matplotlib Axes.
    """
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = mask.grid(q_len, k_len, q_offset=q_offset, batch=batch, head=head, default_len=16)  # (Lq, Lk)
    q_len, k_len = grid.shape
    if not q_len or not k_len:
        raise ValueError(f"plot_mask: q_len={q_len} and k_len={k_len}: a picture needs at least one query and one key")
    fig = None
    if ax is None:
        size = min(10.0, 2.0 + 0.25 * max(q_len, k_len))
        fig, ax = plt.subplots(figsize=(size, size * q_len / k_len + 0.5))
    # more positions than pixels: matplotlib's resampling would drop whole rows and columns (an allowed entry drawn
    # hidden), so draw blocks of positions, dark where any entry of the block may attend, and say so
    fq, fk = -(-q_len // MAX_CELLS), -(-k_len // MAX_CELLS)
    blocks = any_in_blocks(grid, fq, fk)  # (ceil(Lq / fq), ceil(Lk / fk))
    nq, nk = blocks.shape
    ax.imshow(blocks.float().cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              extent=(-0.5, nk * fk - 0.5, q_offset + nq * fq - 0.5, q_offset - 0.5))
    ax.set(xlim=(-0.5, k_len - 0.5), ylim=(q_offset + q_len - 0.5, q_offset - 0.5))  # a last block may run past
    title = repr(mask) + (f", batch {batch}" if mask.batch > 1 else "") + (f", head {head}" if mask.heads > 1 else "")
    if fq > 1 or fk > 1:
        title += f"\neach cell {fq} queries x {fk} keys: dark where any of them may attend"
    ax.set(xlabel="key position", ylabel="query position", title=title)
    if path is not None:
        save_figure(fig or ax.figure, path, dpi=100, bbox_inches="tight")
        if fig is not None:
            plt.close(fig)
    return ax


def any_in_blocks(grid: Tensor, fq: int, fk: int) -> Tensor:
    """A bool (Lq, Lk) grid pooled into blocks of ``fq x fk`` (the last ones may be smaller): True where any entry
    of the block is."""
    q_len, k_len = grid.shape
    padded = grid.new_zeros(-(-q_len // fq) * fq, -(-k_len // fk) * fk)
    padded[:q_len, :k_len] = grid
    return padded.unflatten(0, (-1, fq)).unflatten(2, (-1, fk)).any(3).any(1)


def plot_curves(log: str | Path, out: str | Path | None = None) -> Path | None:
    """Plot a ``metrics.jsonl`` into a PNG: training and validation loss on one panel, each other validation metric
    on a panel of its own, all against the step.

    Args:
        log: the run's ``metrics.jsonl``.
        out: the PNG to write (default: ``curves.png`` beside ``log``).

    Returns:
        The PNG's path, or None when ``log`` does not exist (nothing was trained).

    Raises:
        FormatError: naming the file and line, when a line is not a JSON object with a ``step``.
    """
    log = Path(log)
    out = Path(out) if out is not None else log.with_name("curves.png")
    if not log.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise FormatError(f"{log}, line {number}: not valid JSON ({e})") from None
        if record is not None and not (isinstance(record, dict) and "step" in record):
            raise FormatError(f"{log}, line {number}: expected a JSON object with a step, got {line[:80]!r}")
        records += [record] if record is not None else []

    def points(key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in records if key in r]

    # One panel for the loss, training and validation on one axis (overfitting shows as the two parting), then one
    # panel per other validation metric: their scales differ (an LM's loss ~4 beside its perplexity ~55).
    others = sorted({k[5:] for r in records for k in r if k.startswith("eval_")} - {"loss"})
    cols = min(1 + len(others), 3)
    rows = -(-(1 + len(others)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    loss_ax, *panels = axes.flat
    train, valid = points("loss"), points("eval_loss")
    if train:
        loss_ax.plot(*zip(*train, strict=True), label="training")
    if valid:
        loss_ax.plot(*zip(*valid, strict=True), marker="o", label="validation")
        loss_ax.legend()
    loss_ax.set(xlabel="step", ylabel="loss", title="training and validation loss" if valid else "training loss")
    for ax, name in zip(panels, others, strict=False):
        ax.plot(*zip(*points(f"eval_{name}"), strict=True), marker="o")
        ax.set(xlabel="step", ylabel=name, title=f"validation {name}")
    for ax in panels[len(others):]:  # the last row's empty places
        fig.delaxes(ax)
    fig.tight_layout()
    out = save_figure(fig, out, dpi=100)  # a run killed while drawing keeps its previous curves
    plt.close(fig)
    return out


def plot_overlays(overlays, out_dir: str | Path) -> list[Path]:
    """Draw each :class:`maskattn.tasks.base.Overlay` (a heat map over a grey image) as ``out_dir/<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for o in overlays:
        h, w = o.image.shape
        fig, ax = plt.subplots(figsize=(max(3.0, w / 6), max(2.0, h / 6)))
        ax.imshow(o.image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(o.heat, cmap="inferno", alpha=0.55, interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        ax.set_title(o.title)
        ax.axis("off")
        fig.tight_layout()
        written.append(out / f"{o.name}.png")
        save_figure(fig, written[-1], dpi=100)
        plt.close(fig)
    return written


def plot_tradeoff(panels: Mapping[str, Sequence[tuple[str, float, float]]], out: str | Path, *,
                  xlabel: str = "size", ylabels: Mapping[str, str] | None = None) -> Path:
    """Labelled points ``(label, x, y)`` in one panel per key of ``panels`` (e.g. quality against size
    per task), each point annotated with its label; written as a PNG to ``out``, which is returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("plot_tradeoff: panels is empty; give at least one panel of points")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items(), strict=True):
        for label, x, y in points:
            ax.scatter([x], [y])
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(title=title, xlabel=xlabel, ylabel=(ylabels or {}).get(title, "quality"))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out
