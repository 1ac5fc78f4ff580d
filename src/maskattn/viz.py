"""Pictures of attention: capture the weights of every attention layer, and draw heatmaps.

Weights are captured with forward hooks that ask each :class:`~maskattn.layers.MultiHeadAttention`
call again with ``return_weights=True``; the model's own outputs are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from maskattn.layers import MultiHeadAttention


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Record the (B, H, Lq, Lk) weights of every attention module call, keyed by module name.

    Works for full forward passes; calls that append to a KV cache are refused (asking them again
    would append twice).
    """
    captured: dict[str, list[Tensor]] = {}
    handles = []
    active = {"inside": False}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output):
            if active["inside"]:
                return None
            if kwargs.get("cache") is not None:
                raise RuntimeError(f"capture_attention: {name} was called with a KV cache; capture a full forward")
            active["inside"] = True
            try:
                with torch.no_grad():
                    _, weights = module(*args, **{**kwargs, "return_weights": True})
            finally:
                active["inside"] = False
            captured.setdefault(name, []).append(weights.detach().cpu())
            return None

        return record

    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(weights: Tensor, path: str | Path, *, x_labels: Sequence[str] = (), y_labels: Sequence[str] = (),
            title: str = "", xlabel: str = "key", ylabel: str = "query") -> Path:
    """Draw one (Lq, Lk) weight matrix with token labels on the axes; write a PNG."""
    if weights.dim() != 2:
        raise ValueError(f"weights must be (Lq, Lk), got shape {tuple(weights.shape)}")
    plt = _pyplot()
    lq, lk = weights.shape
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.35 * lk), min(16, 1.5 + 0.35 * lq)))
    image = ax.imshow(weights.float().numpy(), cmap="viridis", vmin=0, aspect="auto", interpolation="nearest")
    _label(ax, x_labels, y_labels, lq, lk)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def head_grid(weights: Tensor, path: str | Path, *, x_labels: Sequence[str] = (), y_labels: Sequence[str] = (),
              title: str = "") -> Path:
    """Draw (H, Lq, Lk) weights as one panel per head; write a PNG."""
    if weights.dim() != 3:
        raise ValueError(f"weights must be (H, Lq, Lk), got shape {tuple(weights.shape)}")
    plt = _pyplot()
    h, lq, lk = weights.shape
    cols = min(h, 4)
    rows = -(-h // cols)
    cell = min(5.0, 1.5 + 0.2 * max(lq, lk))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.axis("off")
            continue
        ax.imshow(weights[i].float().numpy(), cmap="viridis", vmin=0, aspect="auto", interpolation="nearest")
        _label(ax, x_labels, y_labels, lq, lk)
        ax.set_title(f"head {i}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _label(ax, x_labels: Sequence[str], y_labels: Sequence[str], lq: int, lk: int) -> None:
    if x_labels:
        ax.set_xticks(range(lk), [repr(t)[1:-1] for t in x_labels], rotation=90, fontsize=7)
    if y_labels:
        ax.set_yticks(range(lq), [repr(t)[1:-1] for t in y_labels], fontsize=7)
