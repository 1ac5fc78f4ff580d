"""Export the models as deployable graphs: ONNX (for onnxruntime) or a ``torch.export`` program (``.pt2``).

Batch size and sequence lengths are dynamic. Every graph takes and returns tensors only; each model kind
is one :class:`Exporter` record in :data:`EXPORTERS` (its graphs and their signature), so a new model kind
adds a record, not a branch.

* ``DecoderLM``: ``logits = graph(input_ids)``: (B, L) int64 -> (B, L, V); padding from ``pad_id``.
* ``EncoderModel``: ``hidden = graph(input_ids, attention_mask[, token_type_ids])``: (B, L) int64, (B, L) bool
  (True = real token) and, for a model with token types (BERT's segments; QA's question and context),
  (B, L) int64 -> (B, L, E); a model with task heads also returns them: ``logits`` (B, C) of a classifier,
  ``start_logits`` and ``end_logits`` (B, L) of a span head (after ``hidden``, in that order).
* ``Transformer``: two graphs, written as ``<stem>.encoder<suffix>`` and ``<stem>.decoder_step<suffix>``:

  - encoder: ``memory = graph(src, src_valid)``: (B, Ls) int64, (B, Ls) bool -> (B, Ls, E);
  - decoder step (one new target token for every row, rows aligned, the cache as explicit tensors):
    ``logits, keys, values = graph(tokens, memory, src_valid, past_keys, past_values)`` with tokens (B, 1)
    int64 (BOS first), past_keys / past_values (N, B, Hkv, T, D) for N decoder layers and T tokens fed so
    far (T = 0 at the first step), returning the (B, V) logits of the next token and the caches grown to
    T + 1. Cross-attention keys and values are projected from ``memory`` inside every step. Hkv is the most
    key/value heads of a decoder layer: a layer pruned to fewer (``maskattn compress --prune-heads``) reads and
    returns its heads in the first slots, zeros in the others.

While exporting, ``backend="auto"`` runs PyTorch's SDPA (with a dense mask where one is needed), which
both formats represent; a model built with ``backend="blocked"`` exports to pt2 only (its custom operator).

Shape legend: B batch, L / Ls sequence / source length, E d_model, V vocabulary, N decoder layers, Hkv
key/value heads, T cached target tokens, D head dim.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.nn import functional as F

from maskattn import masks
from maskattn.io import check_output_file
from maskattn.layers import Int8Linear, MultiHeadAttention
from maskattn.layers.quantized import Int8TokenEmbedding
from maskattn.models import DecoderLM, EncoderModel, Transformer
from maskattn.models.common import default_positions

__all__ = ["EXPORTERS", "FORMATS", "ONNX_BACKENDS", "Exporter", "Graph", "export", "graphs"]

FORMATS = ("onnx", "pt2")


@dataclass(frozen=True)
class Graph:
    """One exported graph: a module whose ``forward`` takes and returns tensors, example inputs to trace
    it with, and which of their dims are dynamic."""

    module: nn.Module
    inputs: tuple[Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic: dict[str, dict[int, Dim]]


@dataclass(frozen=True)
class Exporter:
    """How one model kind is exported: ``graphs(model) -> {suffix: Graph}`` ("" for a single graph)."""

    model_class: type[nn.Module]
    graphs: Callable[[Any], dict[str, Graph]]


def _dims(model: nn.Module) -> tuple[Dim, Dim]:
    # the length is bounded as in eager (positions below max_len): a pt2 program then names a longer input
    return Dim("batch", min=1, max=1024), Dim("length", min=1, max=model.config.max_len)


def _ids(model: nn.Module, batch: int = 2, length: int = 5) -> Tensor:
    return torch.randint(1, model.config.vocab_size, (batch, length))  # (B, L), no padding id


class _LMLogits(nn.Module):
    def __init__(self, model: DecoderLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)  # (B, L, V)


class _EncoderOutputs(nn.Module):
    def __init__(self, model: EncoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        m = self.model  # the steps of classify / span_logits, on one pass of the encoder
        hidden = m(input_ids, attention_mask, token_type_ids=token_type_ids)  # (B, L, E)
        outputs = [hidden]
        if m.classifier is not None:
            valid = attention_mask if m.config.pooling == "mean" else None
            outputs.append(m.classifier(m.pool_dropout(m.pool(hidden, valid))))  # (B, C)
        if m.span_head is not None:
            outputs += m.span_head(hidden).unbind(dim=-1)  # (B, L) start, (B, L) end
        return hidden if len(outputs) == 1 else tuple(outputs)


class _Encode(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_valid: Tensor) -> Tensor:
        m = self.model  # the steps of Transformer.encode, with the padding mask read from src_valid as it is
        x, rope = m.src_embed(src, default_positions(src))  # (B, Ls, E)
        return m.encoder(x, mask=masks.padding(src_valid), rope=rope)  # (B, Ls, E)


class _GrowingCache:
    """The ``update(k, v)`` of :class:`maskattn.layers.KVCache`, over explicit tensors: returns and keeps
    the past keys with the new ones appended (no preallocated capacity, no host-side position)."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values = keys, values  # (B, Hkv, T, D)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys, self.values = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        return self.keys, self.values  # (B, Hkv, T + 1, D)


def _stack_heads(caches: list[Tensor], width: int) -> Tensor:
    """(N, B, width, T, D): the (B, Hkv_i, T, D) caches, zeros in the slots of heads a pruned layer lacks."""
    return torch.stack([F.pad(c, (0, 0, 0, 0, 0, width - c.shape[1])) for c in caches])


class _DecoderStep(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, memory: Tensor, src_valid: Tensor, past_keys: Tensor,
                past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        # a pruned layer keeps fewer key/value heads: its cache is the first Hkv_i of the Hkv (= the most) slots
        heads = [layer.self_attn.num_kv_heads for layer in m.decoder.layers]
        caches = [_GrowingCache(k[:, :h], v[:, :h])
                  for k, v, h in zip(past_keys.unbind(0), past_values.unbind(0), heads, strict=True)]
        x, rope = m.tgt_embed(tokens, default_positions(tokens, past_keys.shape[3]))  # (B, 1, E)
        memory_kv = [layer.cross_attn.project_kv(memory) for layer in m.decoder.layers]
        # the new token is the last position, and every earlier target token is real: self-attention sees all
        h = m.decoder(x, mask=None, memory_mask=masks.padding(src_valid), memory_kv=memory_kv, rope=rope,
                      caches=caches)
        keys = _stack_heads([c.keys for c in caches], past_keys.shape[2])  # (N, B, Hkv, T + 1, D)
        values = _stack_heads([c.values for c in caches], past_values.shape[2])
        return m.out_proj(h[:, -1]), keys, values  # (B, V)


def _lm_graphs(model: DecoderLM) -> dict[str, Graph]:
    batch, length = _dims(model)
    return {"": Graph(_LMLogits(model), (_ids(model),), ("input_ids",), ("logits",),
                      {"input_ids": {0: batch, 1: length}})}


def _encoder_graphs(model: EncoderModel) -> dict[str, Graph]:
    batch, length = _dims(model)
    ids = _ids(model)
    inputs = (ids, torch.ones_like(ids, dtype=torch.bool))
    names = ("input_ids", "attention_mask")
    if model.config.type_vocab_size:
        inputs, names = (*inputs, torch.zeros_like(ids)), (*names, "token_type_ids")
    outputs = ("hidden", *(("logits",) if model.classifier is not None else ()),
               *(("start_logits", "end_logits") if model.span_head is not None else ()))
    return {"": Graph(_EncoderOutputs(model), inputs, names, outputs, {name: {0: batch, 1: length} for name in names})}


def _transformer_graphs(model: Transformer) -> dict[str, Graph]:
    batch, length = _dims(model)
    past = Dim("past", min=0, max=model.config.max_len - 1)  # the new token sits at position past
    src = _ids(model)
    valid = torch.ones_like(src, dtype=torch.bool)
    attn = model.decoder.layers[0].self_attn
    kv_heads = max(layer.self_attn.num_kv_heads for layer in model.decoder.layers)  # layers pruned apart differ
    cache = torch.zeros(len(model.decoder.layers), src.shape[0], kv_heads, 3, attn.head_dim)
    tokens = torch.full((src.shape[0], 1), model.config.bos_id)
    memory = torch.zeros(src.shape[0], src.shape[1], model.config.d_model)
    cache_dims = {1: batch, 3: past}
    return {
        ".encoder": Graph(_Encode(model), (src, valid), ("src", "src_valid"), ("memory",),
                          {"src": {0: batch, 1: length}, "src_valid": {0: batch, 1: length}}),
        ".decoder_step": Graph(_DecoderStep(model), (tokens, memory, valid, cache, cache.clone()),
                               ("tokens", "memory", "src_valid", "past_keys", "past_values"),
                               ("logits", "keys", "values"),
                               {"tokens": {0: batch}, "memory": {0: batch, 1: length},
                                "src_valid": {0: batch, 1: length}, "past_keys": cache_dims,
                                "past_values": cache_dims}),
    }


EXPORTERS: tuple[Exporter, ...] = (
    Exporter(DecoderLM, _lm_graphs),
    Exporter(EncoderModel, _encoder_graphs),
    Exporter(Transformer, _transformer_graphs),
)


def graphs(model: nn.Module) -> dict[str, Graph]:
    """The graphs ``model`` exports as, by the file suffix each is written under ("" = the path itself)."""
    for exporter in EXPORTERS:
        if isinstance(model, exporter.model_class):
            return exporter.graphs(model.eval())
    names = [e.model_class.__name__ for e in EXPORTERS]
    raise ValueError(f"cannot export a {type(model).__name__}; exportable models: {names}")


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """Silence two messages of torch's ONNX exporter that say nothing about the model: on its first use in a
    process it warns once per torchvision operator it skips (torchvision is not installed; no maskattn graph
    uses it), and its own copying of pytree specs raises pytree's LeafSpec deprecation."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    skipped = logging.Filter()
    skipped.filter = lambda record: not str(record.msg).startswith("torchvision is not installed")
    logger.addFilter(skipped)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        logger.removeFilter(skipped)


def _path(out: Path, suffix: str) -> Path:
    return out if not suffix else out.with_name(out.stem + suffix + out.suffix)


# Backends whose calls the ONNX exporter converts (auto takes sdpa while exporting); others export to pt2 only.
ONNX_BACKENDS = frozenset({"auto", "sdpa", "reference"})


def export(model: nn.Module, out: str | os.PathLike, *, format: str = "onnx", overwrite: bool = True,
           inputs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write ``model``'s graphs (see the module docstring) to ``out``; return the files written.

    Args:
        model: a DecoderLM, EncoderModel or Transformer.
        out: the file to write; a Transformer writes ``<stem>.encoder<suffix>`` and
            ``<stem>.decoder_step<suffix>`` beside it.
        format: ``"onnx"`` (needs the ``onnx`` and ``onnxscript`` packages: ``pip install maskattn[onnx]``)
            or ``"pt2"`` (``torch.export.save``; load with ``torch.export.load(path).module()``).
        overwrite: replace files that exist (False: refuse them before any work).
        inputs: files and directories no graph may be written over or into (the model's own directory).

    Raises:
        ValueError: on an unknown format, a model kind that has no exporter, or an int8 model or one whose
            attention backend is not in ``ONNX_BACKENDS`` to ONNX.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "onnx" and any(isinstance(m, (Int8Linear, Int8TokenEmbedding)) for m in model.modules()):
        raise ValueError("an int8 model (maskattn compress --int8) exports to pt2 only: the ONNX exporter has no "
                         "conversion for its integer matmul (aten._int_mm); use --format pt2")
    named = sorted({m.backend for m in model.modules() if isinstance(m, MultiHeadAttention)} - ONNX_BACKENDS)
    if format == "onnx" and named:
        raise ValueError(f"a backend={named[0]!r} model exports to pt2 only: the ONNX exporter has no conversion for "
                         f"its operators (e.g. maskattn::blocked_attention, flex's sort); backends that export to "
                         f"ONNX: {sorted(ONNX_BACKENDS)}; use --format pt2")
    out = check_output_file(out, "--out", inputs)
    other = {".onnx": "pt2", ".pt2": "onnx"}.get(out.suffix.lower())
    if other == format:
        raise ValueError(f"--out {out}: a {out.suffix} name for a {format} file; name it {out.stem}.{format} or "
                         f"give --format {out.suffix[1:].lower()}")
    planned = {_path(out, suffix): graph for suffix, graph in graphs(model).items()}
    for path in planned:
        check_output_file(path, "--out", inputs, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged: dict[Path, Path] = {}  # final path -> its temporary: all graphs are in place, or none is replaced
    try:
        with torch.no_grad():
            for path, graph in planned.items():
                tmp = staged[path] = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
                graph.module.eval()
                dynamic = {name: graph.dynamic.get(name) for name in graph.input_names}
                if format == "pt2":
                    program = torch.export.export(graph.module, graph.inputs, dynamic_shapes=dynamic)
                    buffer = io.BytesIO()  # a file torch's zip writer cannot finish (disk full) aborts the process
                    torch.export.save(program, buffer)
                    tmp.write_bytes(buffer.getbuffer())
                else:
                    with _quiet_onnx_exporter():
                        torch.onnx.export(graph.module, graph.inputs, tmp, dynamo=True, dynamic_shapes=dynamic,
                                          input_names=list(graph.input_names),
                                          output_names=list(graph.output_names), external_data=False, verbose=False)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    return list(staged)
