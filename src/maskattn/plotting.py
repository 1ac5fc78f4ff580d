"""Pictures of masks with matplotlib (the viz layer: nothing below it imports matplotlib).

:meth:`maskattn.masks.Mask.render` draws the same grid as text.
"""

from __future__ import annotations

from maskattn.masks import Mask

__all__ = ["plot_mask"]


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
    """Draw the mask of one (batch, head) with matplotlib: dark = may attend.

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
    fig = None
    if ax is None:
        size = min(10.0, 2.0 + 0.25 * max(q_len, k_len))
        fig, ax = plt.subplots(figsize=(size, size * q_len / k_len + 0.5))
    ax.imshow(grid.float().cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              extent=(-0.5, k_len - 0.5, q_offset + q_len - 0.5, q_offset - 0.5))
    ax.set(xlabel="key position", ylabel="query position", title=repr(mask))
    if path is not None:
        (fig or ax.figure).savefig(path, dpi=100, bbox_inches="tight")
        if fig is not None:
            plt.close(fig)
    return ax
