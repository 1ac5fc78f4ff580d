"""Pictures of attention: capture the weights of every attention layer, and draw heatmaps.

Weights are captured cheaply by default: forward hooks on the ``attend`` submodule of each chosen
:class:`~maskattn.layers.MultiHeadAttention` ask its fast backend for the log-sum-exp, and only the
chosen heads and query rows are recomputed from it (:func:`maskattn.attention_weights`).
``method="rerun"`` instead asks each call again with ``return_weights=True`` (the dense reference
path). The model's own outputs are untouched either way, up to float rounding between backends.
Models of other libraries are observed through their registered adapter
(:class:`maskattn.models.AttentionObserver`; ``maskattn.hf_inspect`` for Hugging Face models).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from maskattn.dispatch import attention
from maskattn.errors import UsageError
from maskattn.layers import MultiHeadAttention
from maskattn.models import AttentionObserver, inspectable
from maskattn.plotting import save_figure
from maskattn.weights import attention_weights, integer_indices, select


@contextmanager
def capture_attention(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
    method: str = "lse",
) -> Iterator[dict[str, list[Tensor]]]:
    """Record the attention weights of every call of the chosen attention modules, keyed by module name.

    Args:
        model: any module holding :class:`~maskattn.layers.MultiHeadAttention` layers, or a model of
            another library with a registered adapter (a Hugging Face model: its attention modules,
            weights from the log-sum-exp under ``attn_implementation="maskattn"``, from the module's
            output under ``"eager"``).
        layers: module names or glob patterns (``"decoder.layers.1.*"``) to capture; default all.
        heads: query heads to keep; default all.
        rows: query rows (indices into each call's queries) to keep; default all.
        method: ``"lse"`` recomputes the chosen heads and rows from a fast backend's log-sum-exp
            (cheap: no dense weights, works with a KV cache); ``"rerun"`` asks each call again with
            ``return_weights=True`` (the dense reference path; refuses KV-cache calls).

    Each recorded tensor is (B, len(heads), len(rows), Lk), detached, on the CPU.

    Raises:
        ValueError: when nothing would be captured: the model has no attention module it can observe,
            or ``layers`` matches none of them (the message lists them); when ``heads`` or ``rows`` are not
            integer indices.
    """
    if method not in ("lse", "rerun"):
        raise ValueError(f"method must be 'lse' or 'rerun', got {method!r}")
    heads, rows = _index_list("heads", heads), _index_list("rows", rows)
    view = inspectable(model)
    observer = view if isinstance(view, AttentionObserver) else None
    if observer is None:
        available = {n: m for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    else:
        available = {name: model.get_submodule(name) for name in view.attention_sites()}
    if not available:
        raise ValueError(f"{type(model).__name__} has no attention module that capture_attention can observe "
                         "(maskattn MultiHeadAttention layers, or a model with a registered adapter such as a "
                         "Hugging Face transformers model)")
    chosen = {name: module for name, module in available.items()
              if layers is None or any(fnmatchcase(name, pattern) for pattern in layers)}
    if not chosen:
        raise ValueError(f"layers={list(layers)} matches no attention module; the model has {list(available)}")
    captured: dict[str, list[Tensor]] = {}
    if observer is not None:
        if method != "lse":
            raise ValueError(f"method={method!r} needs maskattn layers; {type(model).__name__} is observed through "
                             "its adapter (method='lse')")
        handles = observer.observe_attention(
            chosen, lambda name, weights: captured.setdefault(name, []).append(weights.cpu()), heads=heads, rows=rows)
    else:
        handles = _layer_hooks(chosen, captured, heads, rows, method)
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _index_list(name: str, chosen: Sequence[int] | Tensor | None) -> tuple[int, ...] | None:
    """``chosen`` as a tuple of ints, read once (a generator serves every call); bools and floats are refused."""
    if chosen is None:
        return None
    values = integer_indices(chosen)
    if values is None:
        raise ValueError(f"{name} must be integer indices, got {chosen!r}")
    return values


def _layer_hooks(chosen: dict[str, nn.Module], captured: dict[str, list[Tensor]], heads, rows,
                 method: str) -> list[RemovableHandle]:
    """The hooks that record the chosen :class:`~maskattn.layers.MultiHeadAttention` layers."""
    handles = []
    for name, module in chosen.items():
        if method == "lse":
            handles += _observe_lse(module.attend, _lse_recorder(name, captured, heads, rows))
        else:
            handles.append(module.register_forward_hook(_rerun_hook(name, captured, heads, rows), with_kwargs=True))
    return handles


def _observe_lse(attend: nn.Module, record) -> list[RemovableHandle]:
    """Hooks on one attention call (:class:`~maskattn.layers.mha.Attend`): the pre-hook asks it for its
    log-sum-exp, the hook calls ``record(q, k, lse, mask, q_offset)`` and hands the caller the output
    alone. Calls that ask for weights are left alone."""

    def ask(module: nn.Module, args: tuple, kwargs: dict):
        return None if kwargs.get("return_weights") else (args, {**kwargs, "return_lse": True})

    def take(module: nn.Module, args: tuple, kwargs: dict, output):
        if kwargs.get("return_weights"):
            return None
        q, k, v, mask = (*args, kwargs.get("mask"))[:4]
        q_offset = kwargs.get("q_offset", 0)
        if isinstance(output, Tensor):  # a capture opened earlier on this layer took the log-sum-exp
            with torch.no_grad():
                output = output, attention(q, k, v, mask, backend="blocked", return_lse=True, q_offset=q_offset)[1]
        out, lse = output
        record(q, k, lse, mask, q_offset)
        return out

    return [attend.register_forward_pre_hook(ask, with_kwargs=True),
            attend.register_forward_hook(take, with_kwargs=True)]


def _lse_recorder(name: str, captured: dict[str, list[Tensor]], heads, rows):
    def record(q: Tensor, k: Tensor, lse: Tensor, mask, q_offset: int) -> None:
        with torch.no_grad():
            weights = attention_weights(q.detach(), k.detach(), lse, mask, q_offset=q_offset, heads=heads, rows=rows)
        captured.setdefault(name, []).append(weights.cpu())

    return record


_RERUNNING: set[int] = set()  # modules being run again for their weights: no capture records those runs


def _rerun_hook(name: str, captured: dict[str, list[Tensor]], heads, rows):
    def record(module: nn.Module, args: tuple, kwargs: dict, output):
        if id(module) in _RERUNNING:  # shared by every capture: nested captures each record the call once
            return None
        if kwargs.get("cache") is not None:
            raise RuntimeError(f"capture_attention: {name} was called with a KV cache; use method='lse' "
                               "or capture a full forward")
        _RERUNNING.add(id(module))
        try:
            with torch.no_grad():
                _, weights = module(*args, **{**kwargs, "return_weights": True})
        finally:
            _RERUNNING.discard(id(module))
        captured.setdefault(name, []).append(select(weights, heads, rows).detach().cpu())
        return None

    return record


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
    lq, lk = weights.shape
    _check_labels(x_labels, y_labels, lq, lk)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.35 * lk), min(16, 1.5 + 0.35 * lq)))
    image = ax.imshow(weights.float().numpy(), cmap="viridis", vmin=0, aspect="auto", interpolation="nearest",
                      extent=_extent(lq, lk))
    _label(ax, x_labels, y_labels, lq, lk)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def head_grid(weights: Tensor, path: str | Path, *, x_labels: Sequence[str] = (), y_labels: Sequence[str] = (),
              title: str = "") -> Path:
    """Draw (H, Lq, Lk) weights as one panel per head, on one colour scale (from 0 to the largest weight, shown
    beside them); write a PNG."""
    if weights.dim() != 3:
        raise ValueError(f"weights must be (H, Lq, Lk), got shape {tuple(weights.shape)}")
    h, lq, lk = weights.shape
    _check_labels(x_labels, y_labels, lq, lk)
    plt = _pyplot()
    cols = min(h, 4)
    rows = -(-h // cols)
    cell = min(5.0, 1.5 + 0.2 * max(lq, lk))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1, cell * rows), squeeze=False)
    # one colour scale for every head, drawn once; a NaN or infinite weight is drawn blank, as matplotlib's own
    # scale leaves it, not made the scale's top (a NaN one blanked every cell)
    finite = weights[weights.isfinite()]
    top = max(float(finite.max()), 1e-12) if finite.numel() else 1.0
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.axis("off")
            continue
        image = ax.imshow(weights[i].float().numpy(), cmap="viridis", vmin=0, vmax=top, aspect="auto",
                          interpolation="nearest", extent=_extent(lq, lk))
        _label(ax, x_labels, y_labels, lq, lk)
        ax.set_title(f"head {i}")
    fig.suptitle(title)
    fig.tight_layout()
    if h:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.04)
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _extent(lq: int, lk: int) -> tuple[float, float, float, float] | None:
    """imshow's extent of an (Lq, Lk) picture: its own (None), except that a side of no tokens (an empty input)
    spans one cell, where matplotlib would set equal low and high limits and warn that they are singular."""
    if lq and lk:
        return None
    return -0.5, max(lk, 1) - 0.5, max(lq, 1) - 0.5, -0.5


def _check_labels(x_labels: Sequence[str], y_labels: Sequence[str], lq: int, lk: int) -> None:
    """Labels (when given) must name every key and query: one each."""
    for name, labels, size, what, one in (("x_labels", x_labels, lk, "keys", "key"),
                                          ("y_labels", y_labels, lq, "queries", "query")):
        if labels and len(labels) != size:
            raise ValueError(f"{name}: {len(labels)} labels for {size} {what}; give one per {one} or none")


def _label(ax, x_labels: Sequence[str], y_labels: Sequence[str], lq: int, lk: int) -> None:
    if x_labels or not lk:  # (a side of no tokens: no ticks, not the -0.5 and 0.5 of its one blank cell)
        ax.set_xticks(range(lk), [repr(t)[1:-1] for t in x_labels], rotation=90, fontsize=7)
    if y_labels or not lq:
        ax.set_yticks(range(lq), [repr(t)[1:-1] for t in y_labels], fontsize=7)


# How the pictures show each declared attention kind (maskattn.models.AttentionSite.kind): the title
# in the explorer, and whether the queries and the keys are the source (input) or the target tokens.
VIEWS = {
    "self-bidirectional": ("encoder self-attention", "source", "source"),
    "self-causal": ("decoder masked self-attention", "target", "target"),
    "cross": ("cross-attention", "target", "source"),
}


def visualize(model: nn.Module, tokenizer, text: str, out_dir: str | Path, *, target: str | None = None) -> list[Path]:
    """Heatmaps of every attention layer and head for one input, a grid per layer, and the explorer page.

    ``model`` declares its attention sites (:class:`maskattn.models.Inspectable`, or through a registered
    adapter: Hugging Face models). For an
    encoder-decoder model (one with cross-attention) the decoder input is ``target`` (default: the
    model's own greedy translation), so the pictures show what the model attended to while producing
    its output.
    """
    from maskattn import decoding, explorer
    from maskattn.data import pad

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = tokenizer.encode(text)
    tokens = {"source": [tokenizer.backend.id_to_token(i) for i in ids]}
    src, _ = pad([ids], tokenizer.pad_id)
    model.eval()
    sites = inspectable(model).attention_sites()
    if any(site.kind == "cross" for site in sites.values()):
        if target is None:
            new = decoding.greedy(model, src, max_new_tokens=min(model.config.max_len - 1, 2 * len(ids) + 10))
            target_ids = [i for i in new[0].tolist() if i not in (tokenizer.eos_id, tokenizer.pad_id)]
        else:
            target_ids = tokenizer.encode(target)
            if len(target_ids) + 1 > model.config.max_len:  # BOS and the target are the decoder's input
                raise ValueError(f"--target: {len(target_ids)} tokens, more than the model's decoder reads "
                                 f"({model.config.max_len - 1} after BOS); shorten it")
        tgt_ids = [tokenizer.bos_id, *target_ids]
        tokens["target"] = [tokenizer.backend.id_to_token(i) for i in tgt_ids]
        run = lambda: model(src, torch.tensor([tgt_ids]))  # noqa: E731
    else:
        if target is not None:
            raise ValueError(f"target: {type(model).__name__} has no cross-attention, so there is no target to "
                             "draw; its attention is within the input")
        tokens["target"] = tokens["source"]  # decoder-only and encoder-only models attend within the input
        run = lambda: model(src)  # noqa: E731
    with torch.no_grad(), capture_attention(model, layers=list(sites)) as captured:
        run()
    written, records = [], []
    for name, calls in captured.items():
        layer = sites[name].layer
        kind, query_side, key_side = VIEWS[sites[name].kind]
        queries, keys = tokens[query_side], tokens[key_side]
        weights = calls[0][0]  # (H, Lq, Lk)
        stem = name.replace(".", "_")
        for h in range(weights.shape[0]):
            written.append(heatmap(weights[h], out / f"{stem}_head{h}.png", x_labels=keys, y_labels=queries,
                                   title=f"{kind}, layer {layer}, head {h}"))
        written.append(head_grid(weights, out / f"{stem}_grid.png", x_labels=keys, y_labels=queries,
                                 title=f"{kind}, layer {layer}"))
        records.append(explorer.attention_record(f"{kind}, layer {layer}", kind, layer, weights, queries, keys))
    written.append(explorer.write_page(records, out / "explorer.html"))
    return written


WRITTEN = "viz.json"  # the files the last viz wrote into its directory


def check_out_directory(out_dir: str | Path) -> None:
    """UsageError naming ``viz --out`` when it, or a folder above it, is a file (before any model is loaded)."""
    for path in (Path(out_dir), *Path(out_dir).parents):
        if path.exists() and not path.is_dir():
            where = "a file" if path == Path(out_dir) else f"{path} is a file"
            raise UsageError(f"viz --out {out_dir}: {where}, expected a directory to write the pictures into")


def replace_earlier_pictures(out_dir: str | Path, written: Sequence[Path]) -> None:
    """After a viz wrote ``written`` into ``out_dir``: remove the files an earlier viz of another model or
    input wrote there and this one did not (a 6-layer model's layer-5 pictures beside a 2-layer model's
    new ones), then list the new ones. Only files an earlier viz listed are ever removed."""
    from maskattn.io import FormatError, atomic_write_text, read_json_object

    out = Path(out_dir)
    new = sorted({p.name for p in written})
    try:
        old = read_json_object(out / WRITTEN).get("files", []) if (out / WRITTEN).is_file() else []
    except FormatError:
        old = []
    for name in old if isinstance(old, list) else []:
        path = out / name if isinstance(name, str) and Path(name).name == name else None
        if path is not None and name not in new and name != WRITTEN and path.is_file():
            path.unlink()
    atomic_write_text(out / WRITTEN, json.dumps({"files": new}, indent=1) + "\n")
