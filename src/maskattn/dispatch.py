"""``maskattn.attention``: the one entry point to masked attention, and the one dispatch point.

It validates the inputs once, picks a backend, and calls it. Every backend has the signature of
:func:`maskattn.backends.reference.attention`.

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from maskattn.backends import REGISTRY, AttentionFn, Call, guards
from maskattn.backends import get as get_backend
from maskattn.backends.sdpa import band
from maskattn.masks import Mask, as_mask

logger = logging.getLogger("maskattn.attention")

# Below this many scores per (batch, head), SDPA with a dense mask beats the block-sparse path on the
# CPU (docs/performance.md, "small problems"): there are too few tiles to skip to pay for their bookkeeping.
SMALL_SCORES = 512 * 512


class _Functions(Mapping[str, AttentionFn]):
    """``name -> backend function``, read live from the registry (the mapping maskattn had before it)."""

    def __getitem__(self, name: str) -> AttentionFn:
        return REGISTRY[name].fn

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


BACKENDS: Mapping[str, AttentionFn] = _Functions()


def can_run(
    name: str, q: Tensor, *, dropout_p: float, return_weights: bool, needs_grad: bool = False,
    generator: torch.Generator | None = None, return_lse: bool = False,
) -> bool:
    """Whether backend ``name`` supports a call with these features (the others raise ValueError)."""
    call = Call(q, dropout_p=dropout_p, return_weights=return_weights, return_lse=return_lse, generator=generator,
                needs_grad=needs_grad)
    return get_backend(name).refusal(call) is None


def choose_backend(
    q: Tensor, k: Tensor, mask: Mask | None, *, dropout_p: float, return_weights: bool, q_offset: int = 0,
    generator: torch.Generator | None = None, return_lse: bool = False,
) -> str:
    """The backend ``backend="auto"`` runs for these inputs; the rules are those of docs/performance.md.

    * ``return_weights`` -> ``reference`` (the only backend that builds the weights);
    * ``return_lse`` -> ``blocked`` (it keeps the per-row log-sum-exp for its backward anyway);
    * dropout with a ``generator`` -> ``blocked`` (seeded per-tile dropout that backward reproduces);
      without one, dropout is SDPA's own (global RNG) wherever the rules below pick ``sdpa``;
    * no mask, pure causal (``q_offset == 0``, ``Lq == Lk``) or pure key padding -> ``sdpa``: PyTorch's
      fused kernel takes these without an Lq x Lk mask and is fastest on them;
    * any other mask on a small problem (Lq * Lk <= SMALL_SCORES) -> ``sdpa`` with the dense mask;
    * ``document(ids)`` or ``causal() & document(ids)`` over a few contiguous documents -> ``sdpa``,
      one call per document (``sdpa.segments``);
    * any other mask off the CPU -> ``sdpa`` (the band calls of a sliding window, else the dense mask while it
      has at most ``GPU_DENSE_ENTRIES`` entries): blocked's loop over tiles is 4x to 50x slower than PyTorch's
      fused GPU kernels (docs/performance.md, "On a GPU");
    * any other mask -> ``blocked``, which skips the tiles the mask hides.

    The rules are the data :data:`RULES`. While ``torch.compile`` traces, each rule decides from shapes and
    mask structure only (never tensor values): the per-document split is off, so on the CPU such calls go to
    ``blocked``, which then runs as one custom operator (``maskattn.backends.blocked_op``); on a GPU to ``sdpa``.
    """
    return decide(q, k, mask, dropout_p=dropout_p, return_weights=return_weights, q_offset=q_offset,
                  generator=generator, return_lse=return_lse)[0]


@dataclass(frozen=True)
class Rule:
    """One row of the table in docs/performance.md: ``why(call)`` says why ``backend`` runs the call, or None."""

    backend: str
    why: Callable[[Call], str | None]


def _fast_path(name: str) -> Callable[[Call], str | None]:
    """The rule "backend ``name`` runs the call without an Lq x Lk mask tensor" (its record's fast_path)."""

    def why(call: Call) -> str | None:
        backend = get_backend(name)
        return None if backend.fast_path is None or backend.refusal(call) else backend.fast_path(call)

    return why


def _small(call: Call) -> str | None:
    q_len, k_len = call.q.shape[2], call.k.shape[2]
    if q_len * k_len > SMALL_SCORES:
        return None
    sizes = "" if torch.compiler.is_compiling() else f" = {q_len} x {k_len}"  # a formatted symbolic size is fixed
    return f"Lq x Lk{sizes} is small: a dense mask is cheap and the fused kernel beats tile bookkeeping"


def _element_mask(call: Call) -> str:
    # while tracing, no repr: a combined mask's joins its parts' (str.join, which dynamo cannot trace)
    shown = "the mask" if torch.compiler.is_compiling() else repr(call.mask)
    return f"{shown} needs an element mask: blocked skips the tiles it hides and masks only partial ones"


# Off the CPU, sdpa with a dense mask only while the mask has at most this many entries (B|1 * H|1 * Lq * Lk):
# 256 MiB as bool, and SDPA makes an additive copy in q's dtype; larger masks keep blocked's O(tiles) memory.
GPU_DENSE_ENTRIES = 1 << 28


def _on_gpu(call: Call) -> str | None:
    if call.q.device.type == "cpu" or get_backend("sdpa").refusal(call):
        return None
    q_len, k_len = call.q.shape[2], call.k.shape[2]
    banded = band(call.mask, q_len, k_len, call.q_offset) is not None
    if not banded and call.mask.batch * call.mask.heads * q_len * k_len > GPU_DENSE_ENTRIES:
        return None
    how = "band calls for the window" if banded else "the dense mask"
    return (f"on {call.q.device.type}, PyTorch's fused kernel ({how}) beats blocked's loop over tiles "
            "(docs/performance.md, 'On a GPU')")


# The auto rules, first match wins; backend names appear here as policy, each rule being a measurement. sdpa's
# fast path includes the per-document split, which sdpa takes only above sdpa.MIN_SPLIT_SCORES == SMALL_SCORES,
# so it never competes with the small-problem rule that docs/performance.md lists before it.
RULES: tuple[Rule, ...] = (
    Rule("reference", lambda c: "return_weights=True: only the reference backend builds the (B, H, Lq, Lk) weights"
         if c.return_weights else None),
    Rule("blocked", lambda c: "return_lse=True: blocked keeps the per-row log-sum-exp (for its backward) and "
         "returns it" if c.return_lse else None),
    Rule("blocked", lambda c: f"dropout_p={c.dropout_p} from a generator: blocked applies seeded per-tile dropout"
         if c.dropout_p > 0.0 and c.generator is not None else None),
    Rule("sdpa", lambda c: "exporting: SDPA (with a dense mask where needed) is what ONNX and torch.export "
         "represent, and needs no branch on the symbolic lengths" if torch.compiler.is_exporting() else None),
    Rule("sdpa", _fast_path("sdpa")),  # no mask, aligned causal, key padding, a few contiguous documents
    Rule("sdpa", _small),
    Rule("sdpa", _on_gpu),
    Rule("blocked", _element_mask),
)


def decide(
    q: Tensor, k: Tensor, mask: Mask | None, *, dropout_p: float, return_weights: bool, q_offset: int = 0,
    generator: torch.Generator | None = None, return_lse: bool = False,
) -> tuple[str, str]:
    """``(backend, why)``: the choice of :func:`choose_backend` and the rule that made it (:data:`RULES`)."""
    call = Call(q, k, mask, q_offset=q_offset, dropout_p=dropout_p, return_weights=return_weights,
                return_lse=return_lse, generator=generator)
    for rule in RULES:
        why = rule.why(call)
        if why is not None:
            return rule.backend, why
    raise AssertionError("the last rule always applies")


def check_generator(generator: object) -> None:
    """TypeError naming ``generator`` unless it is a ``torch.Generator`` or None (for attention and sampling)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}")


def check_arguments(q: Tensor, k: Tensor, mask: Mask | None, *, q_offset: int, dropout_p: float, return_weights: bool,
                    return_lse: bool, generator: torch.Generator | None, scale: float | None) -> None:
    """The checks of :func:`attention`'s arguments other than q, k, v (:func:`check_inputs`), for it and for
    ``maskattn.explain``: ValueError / TypeError naming the argument."""
    if mask is not None:
        mask.check(q.shape[2], k.shape[2], q_offset=q_offset, batch=q.shape[0], heads=q.shape[1])
    elif isinstance(q_offset, bool) or not isinstance(q_offset, int | torch.SymInt) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")
    # A float is a number: the checks against numbers.Real (an ABC, slower than the rest of this function) are
    # left to the other types
    if not (type(dropout_p) is float and 0.0 <= dropout_p < 1.0) and (
            isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real | torch.SymFloat) or
            not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if return_weights and return_lse:
        raise ValueError("return_weights and return_lse cannot both be True: ask for one")
    check_generator(generator)
    if scale is None:
        return
    if type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, numbers.Real | torch.SymInt |
                                                                               torch.SymFloat)):
        raise TypeError(f"scale must be a number (the scores' multiplier) or None for 1/sqrt(D), got "
                        f"{type(scale).__name__} {scale!r}")
    if (type(scale) is float or isinstance(scale, numbers.Real)) and not math.isfinite(scale):  # NaN or +-inf scores
        raise ValueError(f"scale must be finite, got {scale!r}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_weights: bool = False,
    q_offset: int = 0,
    generator: torch.Generator | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Masked scaled dot-product attention.

    ``softmax(q @ k^T * scale + hidden) @ v`` where ``hidden`` is -inf wherever ``mask`` says the
    query may not attend the key. A query row that may attend nothing gives a zero output row and
    zero gradients, never NaN. A key or value the mask hides from a query never reaches its output, even
    when it holds NaN or inf; a row that may attend such a key is NaN (``maskattn.backends.guards``). Where the
    mask hides nothing (None, ``full()``, one decoding step under ``causal()``) no guard runs, and such a row
    gets what the kernel computes, as from PyTorch's own SDPA: NaN, or +-inf from an inf value.

    Args:
        q: queries, (B, H, Lq, D).
        k: keys, (B, Hkv, Lk, D); H must be a multiple of Hkv (grouped-query attention: query head
            h reads key/value head ``h // (H // Hkv)``).
        v: values, (B, Hkv, Lk, Dv).
        mask: a :class:`maskattn.masks.Mask` (True = may attend), a bool tensor broadcastable to
            (B, H, Lq, Lk) (wrapped with ``masks.from_tensor``), or None for full attention.
        scale: multiplier of the scores; default ``1 / sqrt(D)``.
        dropout_p: dropout probability on the attention weights. Pass 0 in evaluation.
        backend: ``"auto"`` or the name of a registered backend (:data:`maskattn.backends.REGISTRY`).
        return_weights: also return the (B, H, Lq, Lk) attention weights (before dropout).
        q_offset: absolute position of the first query (e.g. the KV-cache length when decoding).
        generator: random generator for dropout.
        return_lse: also return the (B, H, Lq) log-sum-exp of each row's allowed scores (float32, or
            float64 for float64 inputs; -inf on rows that may attend nothing). With it,
            :func:`maskattn.attention_weights` recomputes the weights of chosen heads and rows cheaply.

    Returns:
        The (B, H, Lq, Dv) output, or ``(output, weights)`` when ``return_weights`` is True, or
        ``(output, lse)`` when ``return_lse`` is True.

    Raises:
        ValueError: on shapes that do not fit together, a mask that does not fit the inputs, a scale that is
            not finite, or an unknown backend.
        TypeError: on non-floating or mismatched dtypes, a mask of the wrong type, or a generator that is not a
            ``torch.Generator``.
    """
    check_inputs(q, k, v)
    mask = as_mask(mask)
    check_arguments(q, k, mask, q_offset=q_offset, dropout_p=dropout_p, return_weights=return_weights,
                    return_lse=return_lse, generator=generator, scale=scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        options = {"dropout_p": dropout_p, "return_weights": return_weights, "q_offset": q_offset,
                   "return_lse": return_lse}
        backend = choose_backend(q, k, mask, generator=generator, **options)
        if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
            _, why = decide(q, k, mask, generator=generator, **options)
            logger.debug("attention %s %s on %s: backend=%s (%s)", tuple(q.shape), q.dtype, q.device, backend, why)
        run = get_backend(backend).fn
    else:  # a named backend: its record says what it cannot do, before it runs (a custom one may not check)
        record = get_backend(backend)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        why = record.refusal(Call(q, k, mask, q_offset=q_offset, dropout_p=dropout_p, return_weights=return_weights,
                                  return_lse=return_lse, generator=generator, needs_grad=needs_grad))
        if why is not None:
            raise ValueError(f"{why}; backend='auto' picks one that can run this call")
        run = record.fn
    # A NaN or inf in a hidden key or value must reach no output (0 x NaN is NaN): zero those rows, and
    # after the call set to NaN the rows that may attend them (backends/guards.py).
    k, v, seen = guards.hide_nonfinite(q, k, v, mask, q_offset)
    extra = {"return_lse": True} if return_lse else {}
    out, second = run(
        q,
        k,
        v,
        mask,
        scale=scale,
        dropout_p=dropout_p,
        q_offset=q_offset,
        return_weights=return_weights,
        generator=generator,
        **extra,
    )
    if seen is not None:
        out, second = guards.poison(out, second, seen)
    return (out, second) if return_weights or return_lse else out


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise TypeError or ValueError, naming the argument and its value, unless q, k, v fit together
    as (B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv) floating tensors on one device, H a multiple of Hkv."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            layout = "(B, H, Lq, D)" if name == "q" else "(B, Hkv, Lk, D)"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, h, _, d), (bk, hk, lk, dk), (bv, hv, lv, _) = q.shape, k.shape, v.shape
    if not b == bk == bv:
        raise ValueError(f"batch sizes differ: q has B={b}, k has B={bk}, v has B={bv}")
    if dk != d:
        raise ValueError(f"head dims differ: q has D={d}, k has D={dk}; expected equal")
    if d == 0:
        raise ValueError(f"q and k need a head dim D >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hk != hv or lk != lv:
        raise ValueError(
            f"k (B, Hkv, Lk, D)={tuple(k.shape)} and v={tuple(v.shape)} must agree on Hkv and Lk"
        )
    if hk == 0 or h % hk:
        raise ValueError(
            f"query heads H={h} must be a multiple of key/value heads Hkv={hk} (grouped-query)"
        )
