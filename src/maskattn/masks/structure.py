"""The public structure of a mask: what a consumer (a backend, the dispatcher, a converter) may read
instead of looking at private mask classes (read it with :func:`maskattn.masks.structure`).

A mask's structure is the conjunction (``&``) of the fields of :class:`MaskStructure` that are set and
of the masks in its ``rest``: ``causal() & sliding_window(4) & padding([5, 3])`` has ``causal=True``,
``window=4``, ``lengths=tensor([5, 3])`` and an empty ``rest``; ``causal() | padding([2])`` cannot be
split into fields, so it is all ``rest``. A consumer that takes a fast path for a field checks that
``kinds`` holds nothing else, and so never mistakes a mask for a simpler one.

Shape legend: B batch, L positions, Lk keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import Tensor

from maskattn.masks.tiles import MaskLike

__all__ = ["MaskStructure"]

_TENSORS = ("lengths", "valid", "doc_ids", "prefix")


@dataclass(frozen=True, eq=False)
class MaskStructure:
    """A mask as the ``&`` of these parts; unset fields (False / None / empty) restrict nothing.

    Compare fields one by one (tensors have no single truth value, so instances do not define ``==``).
    """

    causal: bool = False  # key k <= query q
    window: int | None = None  # q - k < window (keys ahead of the query are not restricted by it)
    lengths: Tensor | None = None  # (B|1,) int: key k is real for item b iff k < lengths[b]
    valid: Tensor | None = None  # (B|1, Lk) bool: key k is real for item b iff valid[b, k]
    doc_ids: Tensor | None = None  # (B|1, L) int: q may see k iff doc_ids[b, q] == doc_ids[b, k]
    prefix: Tensor | None = None  # (B|1,) int, prefix_lm: k <= q or k < prefix[b]
    rest: tuple[MaskLike, ...] = ()  # masks not expressed by the fields above (|, ~, from_tensor, repeats)
    relative: bool = True  # the whole mask depends only on q - k (see Mask.relative)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Names of the parts that are set, in field order, with ``"rest"`` last if anything is left over:
        ``("causal", "window")`` for ``causal() & sliding_window(4)``, ``()`` for full attention."""
        names = [name for name in _PARTS if getattr(self, name) is not None and getattr(self, name) is not False]
        return (*names, "rest") if self.rest else tuple(names)

    @property
    def is_full(self) -> bool:
        """True if nothing is hidden (no mask, ``full()``, or ``&`` of ``full()`` masks)."""
        return not self.kinds

    def conjoin(self, other: MaskStructure, part: MaskLike) -> MaskStructure:
        """The structure of ``self & part``, ``other`` being ``part``'s own structure.

        ``causal`` and windows merge exactly (two windows are the narrower one); a tensor part that is
        already set (two paddings, two document masks) keeps ``part`` whole in ``rest`` instead.
        """
        relative = self.relative and other.relative
        if any(getattr(self, name) is not None and getattr(other, name) is not None for name in _TENSORS):
            return replace(self, rest=(*self.rest, part), relative=relative)
        windows = [w for w in (self.window, other.window) if w is not None]
        tensors = {name: getattr(self, name) if getattr(self, name) is not None else getattr(other, name)
                   for name in _TENSORS}
        return MaskStructure(causal=self.causal or other.causal, window=min(windows) if windows else None,
                             rest=self.rest + other.rest, relative=relative, **tensors)


# The fields ``kinds`` names, in order; read once (``dataclasses.fields`` per call cost a tenth of a decoding step)
_PARTS = tuple(f.name for f in fields(MaskStructure) if f.name not in ("rest", "relative"))
