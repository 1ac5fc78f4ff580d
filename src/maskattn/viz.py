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


def _kind(name: str) -> tuple[str, int]:
    layer = int(next((part for part in name.split(".") if part.isdigit()), 0))
    if "cross" in name:
        return "cross-attention", layer
    if name.startswith("encoder"):
        return "encoder self-attention", layer
    return "decoder masked self-attention", layer


def visualize(model: nn.Module, tokenizer, text: str, out_dir: str | Path, *, target: str | None = None) -> list[Path]:
    """Heatmaps of every attention layer and head for one input, a grid per layer, and the explorer page.

    For an encoder-decoder model the decoder input is ``target`` (default: the model's own greedy
    translation), so the pictures show what the model attended to while producing its output.
    """
    from maskattn import decoding, explorer
    from maskattn.data import pad
    from maskattn.models import Transformer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = tokenizer.encode(text)
    tokens = [tokenizer.backend.id_to_token(i) for i in ids]
    src, _ = pad([ids], tokenizer.pad_id)
    model.eval()
    if isinstance(model, Transformer):
        if target is None:
            new = decoding.greedy(model, src, max_new_tokens=min(model.config.max_len - 1, 2 * len(ids) + 10))
            target_ids = [i for i in new[0].tolist() if i not in (tokenizer.eos_id, tokenizer.pad_id)]
        else:
            target_ids = tokenizer.encode(target)
        tgt_ids = [tokenizer.bos_id, *target_ids]
        tgt_tokens = [tokenizer.backend.id_to_token(i) for i in tgt_ids]
        run = lambda: model(src, torch.tensor([tgt_ids]))  # noqa: E731
    else:
        tgt_tokens = tokens  # decoder-only and encoder-only models attend within the input
        run = lambda: model(src)  # noqa: E731
    with torch.no_grad(), capture_attention(model) as captured:
        run()
    written, records = [], []
    for name, calls in captured.items():
        kind, layer = _kind(name)
        weights = calls[0][0]  # (H, Lq, Lk)
        queries = tgt_tokens if kind != "encoder self-attention" else tokens
        keys = tokens if kind in ("cross-attention", "encoder self-attention") else tgt_tokens
        stem = name.replace(".", "_")
        for h in range(weights.shape[0]):
            written.append(heatmap(weights[h], out / f"{stem}_head{h}.png", x_labels=keys, y_labels=queries,
                                   title=f"{kind}, layer {layer}, head {h}"))
        written.append(head_grid(weights, out / f"{stem}_grid.png", x_labels=keys, y_labels=queries,
                                 title=f"{kind}, layer {layer}"))
        records.append(explorer.attention_record(f"{kind}, layer {layer}", kind, layer, weights, queries, keys))
    written.append(explorer.write_page(records, out / "explorer.html"))
    return written
