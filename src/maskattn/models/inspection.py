"""What a model declares about itself for inspection: the kind of each attention module, and how to
audit it.

:mod:`maskattn.viz`, :mod:`maskattn.audit` and the CLI read these declarations; they never switch on
model classes or guess from module names. Any model that provides ``attention_sites()`` and
``audit_probe()`` (:class:`Inspectable`) is inspected the same way, whatever its classes: the
declarations are plain frozen dataclasses of strings and ints, so an adapter for another library's
models can supply them too: such an adapter registers a lookup with :func:`register_adapter`, and
:func:`inspectable` finds it for any model of that library (``maskattn.hf_inspect`` does so for
Hugging Face ``transformers`` models).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

ATTENTION_KINDS = ("self-causal", "self-bidirectional", "cross")
PROBE_INPUTS = ("tokens", "lengths", "documents", "images", "image_sizes")
PROBE_CHECKS = ("layers", "causal", "window", "padding", "documents", "image_padding")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a model, named in ``attention_sites()`` by its ``named_modules`` name.

    ``kind`` is what its mask promises:

    * ``"self-causal"``: self-attention where a query sees itself and earlier positions (decoders);
    * ``"self-bidirectional"``: self-attention over the whole (unpadded) sequence (encoders);
    * ``"cross"``: queries attend to another sequence (the encoder output), passed as the keys.
    """

    kind: str  # one of ATTENTION_KINDS
    layer: int  # index of its layer within its stack, for titles

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, ATTENTION_KINDS)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")


def layer_sites(prefix: str, count: int, **kinds: str) -> dict[str, AttentionSite]:
    """The sites of a stack of ``count`` layers: ``{f"{prefix}.{i}.{attr}": AttentionSite(kind, i)}``
    for every layer ``i`` and every ``attr=kind``, layer by layer."""
    return {f"{prefix}.{i}.{attr}": AttentionSite(kind, i) for i in range(count) for attr, kind in kinds.items()}


@dataclass(frozen=True)
class ProbeInput:
    """One keyword argument of the model calls of an audit, drawn by the audit for ``B`` rows of length ``L``.

    ``kind``:

    * ``"tokens"``: (B, L - shorten) ids drawn at random from [4, vocab_size) (from 0 when
      vocab_size <= 8), clear of the usual special ids;
    * ``"lengths"``: (B,) real lengths of right-padded rows: row 0 full, row b shorter by 3 + b (at least 1);
    * ``"documents"``: (B, L) document ids of two packed documents, the second from position L // 2;
    * ``"images"``: (B, [channels,] R * P, K * P) canvases of standard-normal pixels, ``(R, K) = grid``
      patches of ``P = patch_size`` pixels (the channel axis only when ``channels`` > 1);
    * ``"image_sizes"``: (B, 2) real (height, width) in pixels of such canvases, at their top left: row 0
      the whole canvas, row b narrower by b + 1 patches (at least one patch) and, when R > 1, one patch lower.
    """

    name: str  # the keyword of the model call
    kind: str  # one of PROBE_INPUTS
    vocab_size: int = 0  # tokens: ids are below it
    shorten: int = 0  # tokens: this many fewer than L
    patch_size: int = 0  # images, image_sizes: pixels per patch side
    grid: tuple[int, int] = (0, 0)  # images, image_sizes: (rows, columns) of patches
    channels: int = 1  # images: colour channels

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, PROBE_INPUTS)
        if self.kind == "tokens" and self.vocab_size < 1:
            raise ValueError(f"tokens input {self.name!r} needs vocab_size >= 1, got {self.vocab_size}")
        if self.kind in ("images", "image_sizes") and (self.patch_size < 1 or min(self.grid) < 1 or self.channels < 1):
            raise ValueError(f"{self.kind} input {self.name!r} needs patch_size, both grid sizes and channels >= 1, "
                             f"got patch_size={self.patch_size}, grid={self.grid}, channels={self.channels}")


@dataclass(frozen=True)
class ProbeCheck:
    """One check of an audit; each calls ``model(**{name: inputs[name] for name in uses})``.

    ``kind``:

    * ``"layers"``: every declared attention call of that forward, with the inputs and the mask it
      received, leaks nothing its mask hides;
    * ``"causal"``: output position t depends on no later position of input ``varies``, nor on how
      many there are (logits of a decoder);
    * ``"window"``: output position t depends on no position of input ``varies`` before t - ``reach``
      (a decoder of sliding windows: ``reach`` = num_layers * (W - 1), its receptive field);
    * ``"padding"``: no real position of the output depends on the padding of input ``varies``,
      whose real lengths are input ``lengths``, nor a row of the output on another row's real tokens;
    * ``"documents"``: no position of the output depends on a position of input ``varies`` that
      belongs to another packed document, the documents being input ``documents``;
    * ``"image_padding"``: no output depends on the pixels of images ``varies`` outside their real sizes,
      input ``lengths`` (an ``image_sizes`` input).
    """

    kind: str  # one of PROBE_CHECKS
    uses: tuple[str, ...]  # the inputs passed to the model
    name: str = ""  # causal / padding: the verdict's title
    varies: str = ""  # causal / padding: the tokens input that is changed
    lengths: str = ""  # padding: the lengths input of ``varies``
    documents: str = ""  # documents: the document-ids input of ``varies``
    reach: int = 0  # window: how many earlier positions output position t may depend on
    aligned: bool = True  # padding: output position i is input position i (an encoder's); False: every output
    # position is checked (a decoder's target logits against its source padding)

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, PROBE_CHECKS)
        needed = {"layers": (), "causal": ("name", "varies"),
                  "window": ("name", "varies"), "padding": ("name", "varies", "lengths"),
                  "documents": ("name", "varies", "documents"),
                  "image_padding": ("name", "varies", "lengths")}[self.kind]
        for field in needed:
            if not getattr(self, field):
                raise ValueError(f"a {self.kind!r} check needs {field}, got {getattr(self, field)!r}")
        if isinstance(self.reach, bool) or not isinstance(self.reach, int) or self.reach < 0:
            raise ValueError(f"reach must be an int >= 0, got {self.reach!r}")


@dataclass(frozen=True)
class AuditProbe:
    """How to audit a model: the inputs to draw (in order, from one seeded generator) and the checks
    to run on them (in order; the report lists their verdicts in that order)."""

    inputs: tuple[ProbeInput, ...]
    checks: tuple[ProbeCheck, ...]

    def __post_init__(self) -> None:
        names = [i.name for i in self.inputs]
        for check in self.checks:
            unknown = [n for n in (*check.uses, check.varies, check.lengths, check.documents) if n and n not in names]
            if unknown:
                raise ValueError(f"check {check.kind!r} names inputs {unknown} that the probe does not draw {names}")


@runtime_checkable
class Inspectable(Protocol):
    """A model that declares its attention sites and its audit probe (the maskattn models do)."""

    def attention_sites(self) -> Mapping[str, AttentionSite]:
        """Every attention module, by its ``named_modules`` name."""
        ...

    def audit_probe(self) -> AuditProbe:
        """What the leak audit feeds the model and what the model promises."""
        ...


@runtime_checkable
class AttentionObserver(Protocol):
    """An adapted model whose attention weights are observed its own way (another library's modules)."""

    def observe_attention(self, names: Mapping[str, Any], record: Callable[[str, Any], None], *,
                          heads: Sequence[int] | None, rows: Sequence[int] | None) -> list[Any]:
        """Hooks that call ``record(name, weights)`` for every call of the modules ``names`` (``named_modules``
        name -> module), weights (B, len(heads), len(rows), Lk) of the chosen heads and query rows (default
        all); returns their removable handles."""
        ...


Adapter = Callable[[Any], "Inspectable | None"]
ADAPTERS: list[Adapter] = []
"""Lookups for models of other libraries: each returns an :class:`Inspectable` view of a model it knows,
None otherwise. Filled by :func:`register_adapter`."""


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` to :data:`ADAPTERS` (once); usable as a decorator."""
    if adapter not in ADAPTERS:
        ADAPTERS.append(adapter)
    return adapter


def inspectable(model: Any) -> Inspectable | None:
    """``model`` itself when it declares itself (:class:`Inspectable`), else the view of the first
    registered adapter that knows it, else None."""
    if isinstance(model, Inspectable):
        return model
    for adapter in ADAPTERS:
        view = adapter(model)
        if view is not None:
            return view
    return None
