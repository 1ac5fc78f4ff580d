"""The backend registry: one :class:`Backend` record per attention backend, and the signature they share.

A backend is a function with the signature of :class:`AttentionFn` plus what the rest of maskattn needs
to know about it without running it: which calls it refuses and why, what a call costs it, whether it
returns weights or the log-sum-exp, and where it runs. ``maskattn.dispatch`` (``can_run``, the
``auto`` rules), ``maskattn.explain``, the layers and the tests iterate :data:`REGISTRY`; nothing
else names a backend. Each backend module defines its record as ``BACKEND``; ``backends/__init__.py``
registers them in order of preference.

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim, Dv value dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from maskattn.masks import Mask

__all__ = ["REGISTRY", "AttentionFn", "Backend", "Call", "get", "register"]


class AttentionFn(Protocol):
    """The signature every backend shares (inputs already validated by ``maskattn.attention``).

    Args:
        q: queries (B, H, Lq, D); ``k``: keys (B, Hkv, Lk, D); ``v``: values (B, Hkv, Lk, Dv).
        mask: a :class:`maskattn.masks.Mask` (True = may attend) that fits the call, or None.
        scale: multiplier of the scores.
        dropout_p: dropout probability on the attention weights.
        q_offset: absolute position of the first query.
        return_weights: return the (B, H, Lq, Lk) weights (before dropout) as the second result.
        generator: random generator for dropout.
        return_lse: return the (B, H, Lq) log-sum-exp of each row's allowed scores as the second result.

    Returns:
        ``(output, second)``: the (B, H, Lq, Dv) output, and the weights, the log-sum-exp or None. A row
        that may attend nothing gives zeros and zero gradients.

    Raises:
        ValueError: for a feature the backend does not have (name the backend that has it).
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, *, scale: float,
                 dropout_p: float = 0.0, q_offset: int = 0, return_weights: bool = False,
                 generator: torch.Generator | None = None,
                 return_lse: bool = False) -> tuple[Tensor, Tensor | None]: ...


@dataclass(frozen=True)
class Call:
    """What a backend may look at, before running, to refuse a call or estimate its cost.

    ``k`` and ``mask`` are None where the caller asks about features only (``dispatch.can_run``).
    """

    q: Tensor  # (B, H, Lq, D)
    k: Tensor | None = None  # (B, Hkv, Lk, D)
    mask: Mask | None = None
    q_offset: int = 0
    dropout_p: float = 0.0
    return_weights: bool = False
    return_lse: bool = False
    generator: torch.Generator | None = None
    needs_grad: bool = False  # gradients will flow back through the call

    @property
    def scores(self) -> int:
        """B * H * Lq * Lk: the entries of the whole score matrix (needs ``k``)."""
        b, h, q_len, _ = self.q.shape
        return b * h * q_len * self.k.shape[2]


@dataclass(frozen=True)
class Backend:
    """One attention backend and what it can do."""

    name: str  # what backend="..." selects
    fn: AttentionFn  # the backend itself
    refuses: Callable[[Call], str | None]  # why it cannot run a call (beyond the flags below), or None
    cost: Callable[[Call, int], tuple[int, str]]  # (call, scores outside empty tiles) -> (scores it
    #                                               computes, a phrase on what else it costs, or "")
    returns_weights: bool = False  # honours return_weights=True
    returns_lse: bool = False  # honours return_lse=True
    devices: frozenset[str] | None = None  # device types it runs on (torch.device.type); None = any
    # why the backend runs this call without an Lq x Lk mask tensor, where the auto rules prefer it for that;
    # None (the field or its answer): no such path
    fast_path: Callable[[Call], str | None] | None = None

    def refusal(self, call: Call) -> str | None:
        """Why this backend cannot run ``call``, or None if it can."""
        if call.return_weights and not self.returns_weights:
            return (f"backend '{self.name}' does not return attention weights (return_weights); "
                    f"backends that do: {_those(lambda b: b.returns_weights)}")
        if call.return_lse and not self.returns_lse:
            return (f"backend '{self.name}' does not return the log-sum-exp (return_lse); "
                    f"backends that do: {_those(lambda b: b.returns_lse)}")
        if self.devices is not None and call.q.device.type not in self.devices:
            return f"backend '{self.name}' runs on {sorted(self.devices)}, not on {call.q.device.type}"
        return self.refuses(call)


REGISTRY: dict[str, Backend] = {}  # name -> record, in order of preference (explain lists them so)


def _those(has: Callable[[Backend], bool]) -> str:
    return ", ".join(f"backend='{name}'" for name, b in REGISTRY.items() if has(b)) or "none registered"


def register(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`REGISTRY`; raise ValueError if its name is taken."""
    if backend.name in REGISTRY or backend.name == "auto":
        raise ValueError(f"a backend named {backend.name!r} is already registered (or reserved)")
    REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The record of backend ``name``; raise ValueError naming the registered ones."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]
