"""maskattn inside Hugging Face transformers models: ``maskattn.hf.register()``.

After ``register()``, ``AutoModel.from_pretrained(..., attn_implementation="maskattn")`` (or
``model.set_attn_implementation("maskattn")``) sends every attention call through
:func:`maskattn.attention`, and the mask it receives is a **structured** maskattn mask::

    transformers masking_utils                         maskattn
    ---------------------------------------------      -----------------------------------------
    causal_mask_function                           ->  causal()
    bidirectional_mask_function                    ->  full()
    sliding_window_overlay(w)                      ->  sliding_window(w)
    2-D attention_mask (left or right padding)     ->  padding(lengths) / padding(valid)
    packed position_ids (resets)                   ->  document(ids)
    cache position / sliding-cache offset          ->  q_offset
    anything else (custom or / and functions)      ->  from_tensor(the dense mask), one log line

Transformers builds a mask by calling the function registered in ``AttentionMaskInterface`` with a
*mask function* (a closure tree of the predicates of ``transformers.masking_utils``) plus the 2-D
padding mask. :func:`build_mask` reads that tree through a registry of recognisers (one per known
predicate, keyed by its qualified name); a predicate it does not know makes it build the dense mask
that transformers' own ``sdpa_mask`` would build, so a mask is never dropped.

Under ``torch.compile`` dynamo can read neither the closure nor the ``__qualname__`` of a predicate made
inside the graph, so :func:`register` has dynamo trace the factories (``and_masks``, ``sliding_window_overlay``,
...) as makers of :class:`_Traceable` objects that keep their arguments; the same recognisers read those, and
no value is read on the host (the padding stays ``padding(valid)``). Outside compiled code nothing changes.

Positions: transformers gives keys the absolute positions ``kv_offset + j`` (a sliding-window cache
keeps only the last keys); maskattn counts keys from 0, so every part is shifted by ``kv_offset`` and
the queries start at ``q_offset - kv_offset``.

Observers (:func:`observe`) see every call's queries, keys, mask and log-sum-exp: that is how
:func:`maskattn.viz.capture_attention` draws cheap attention pictures of HF models.

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from maskattn import masks
from maskattn.dispatch import attention
from maskattn.masks import Mask

logger = logging.getLogger("maskattn.hf")

NAME = "maskattn"  # the attn_implementation name register() installs


@dataclass(frozen=True)
class HFMask:
    """What the mask function hands the attention function.

    Attributes:
        mask: the maskattn mask over the call's keys (key j is position j).
        q_offset: position of the call's first query on that scale.
        structured: False when the mask is a ``from_tensor`` fallback of a pattern not recognised.
    """

    mask: Mask | None
    q_offset: int = 0
    structured: bool = True

    @property
    def ndim(self) -> int:
        """4, as the (B, H, Lq, Lk) mask it stands for: transformers reads ``ndim`` of a mask that ``generate``
        built ahead (static caches) before asking for it again, and hands it back to :func:`build_mask`."""
        return 4


# --- reading transformers' mask-function tree ----------------------------------------------------
@dataclass(frozen=True)
class _Context:
    kv_offset: int  # absolute position of key 0
    kv_length: int


class _Traceable:
    """A predicate made by a ``transformers.masking_utils`` factory inside a ``torch.compile`` graph, with the
    factory's arguments kept where dynamo can read them: dynamo reads neither the closure nor the
    ``__qualname__`` of a function made in the graph. Calls go to the predicate the factory made."""

    def __init__(self, qualname: str, env: dict[str, Any], fn: Callable) -> None:
        self.qualname, self.env, self.fn = qualname, env, fn  # env: what the closure would hold

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


# factory -> the qualified name of the predicate it makes (a key of RECOGNISERS)
_FACTORIES = {
    "and_masks": "and_masks.<locals>.and_mask",
    "or_masks": "or_masks.<locals>.or_mask",
    "sliding_window_overlay": "sliding_window_overlay.<locals>.inner_mask",
    "padding_mask_function": "padding_mask_function.<locals>.inner_mask",
    "packed_sequence_mask_function": "packed_sequence_mask_function.<locals>.inner_mask",
    "remap_positions_for_packed_sequence": "remap_positions_for_packed_sequence.<locals>.inner_mask",
}
_SUBSTITUTED: set[Callable] = set()  # the factories substituted (a reloaded masking_utils has new ones)


def _trace_factories(mu) -> None:
    """Have dynamo trace the factories of ``_FACTORIES`` as :class:`_Traceable` makers (their eager behaviour is
    untouched: ``substitute_in_graph`` applies only while tracing). Once per process."""
    from torch._dynamo.decorators import substitute_in_graph

    for name, qualname in _FACTORIES.items():
        original = getattr(mu, name, None)
        if original is None or original in _SUBSTITUTED:
            continue
        code = original.__code__
        names = code.co_varnames[: code.co_argcount]
        star = code.co_varnames[code.co_argcount] if code.co_flags & inspect.CO_VARARGS else None
        # a copy of the factory that dynamo traces as it is (the original now stands for the substitute)
        copy = types.FunctionType(code, original.__globals__, name, original.__defaults__, original.__closure__)

        def substitute(*args, _qualname=qualname, _names=names, _star=star, _copy=copy, **kwargs):
            env = {_star: args} if _star else {**dict(zip(_names, args, strict=False)), **kwargs}  # the rest by keyword
            return _Traceable(_qualname, env, _copy(*args, **kwargs))

        substitute_in_graph(original, skip_signature_check=True)(substitute)
        _SUBSTITUTED.add(original)


Recogniser = Callable[[dict[str, Any], _Context], Mask | None]
_WARNED: set[str] = set()
_LOADED: Any = None  # masking_utils as the last eager call imported it; read by compiled calls (see _mu)
_COLLECTOR: Any = None  # transformers' record of the outputs a forward collects, set by register() (_weights_wanted)


def _masking_utils():
    try:
        from transformers import masking_utils
    except ImportError as err:  # pragma: no cover - exercised only without transformers
        raise ImportError("maskattn.hf needs Hugging Face transformers: pip install 'maskattn[hf]'") from err
    import transformers

    # 4.x calls the mask interface with cache_position instead of (q_length, q_offset) and names its predicates
    # otherwise; 5.17 and 5.24 are the releases the tests ran under
    if not supported(transformers.__version__):
        raise ImportError(f"maskattn.hf needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}: "
                          "pip install -U 'maskattn[hf]'")
    global _LOADED
    _LOADED = masking_utils
    return masking_utils


MIN_TRANSFORMERS = "5.17"


@functools.cache  # build_mask asks on every forward
def supported(version: str) -> bool:
    """Whether maskattn.hf runs under this transformers version (pre-releases of 5.17 are not 5.17)."""
    from packaging.version import InvalidVersion, Version  # a dependency of transformers

    try:
        return Version(version) >= Version(MIN_TRANSFORMERS)
    except InvalidVersion:
        return False


def _mu():
    """transformers.masking_utils; the version check runs in eager only (register() has run it). Compiled calls read
    the module register() imported: torch 2.11's dynamo cannot trace the import statement ("Bad import result")."""
    if torch.compiler.is_compiling() and _LOADED is not None:
        return _LOADED
    return _masking_utils()


def _closure(fn: Callable) -> dict[str, Any]:
    if isinstance(fn, _Traceable):
        return fn.env
    return dict(inspect.getclosurevars(fn).nonlocals)


def _keys(t: Tensor, ctx: _Context) -> Tensor:
    """The (B, Lk) slice of a per-position tensor that covers the call's keys."""
    return t[:, ctx.kv_offset : ctx.kv_offset + ctx.kv_length]


_FULL = masks.full()  # what bidirectional_mask_function stands for; dropped from conjunctions


def _conjunction(parts: list[Mask | None]) -> Mask:
    """``&`` of the parts, leaving out ``_FULL`` and None (no constraint): ``full() & padding`` would hide
    from the dispatcher that the mask is plain padding."""
    kept = [p for p in parts if p is not None and p is not _FULL]
    if not kept:
        return _FULL
    out = kept[0]
    for part in kept[1:]:
        out = out & part
    return out


def _and(env: dict[str, Any], ctx: _Context) -> Mask | None:
    functions = list(env["mask_functions"])
    packed = [f for f in functions if _name(f) == "packed_sequence_mask_function.<locals>.inner_mask"]
    parts = []
    for fn in functions:
        if _name(fn) == "remap_positions_for_packed_sequence.<locals>.inner_mask":
            part = _remapped(fn, packed, ctx)
        else:
            part = _interpret(fn, ctx)
        if part is None:
            return None
        parts.append(part)
    return _conjunction(parts)


def _remapped(fn: Callable, packed: list[Callable], ctx: _Context) -> Mask | None:
    """``remap(f)`` reads ``f`` at each token's position inside its document. Under the packed-document
    mask of the same position ids (transformers always pairs them) that equals ``f`` itself whenever ``f``
    depends only on ``q - k``, since positions rise by one inside a document."""
    env = _closure(fn)
    inner = _interpret(env["mask_function"], ctx)
    if inner is None or not inner.relative:
        return None
    if torch.compiler.is_compiling():  # comparing the ids reads them on the host; transformers pairs the two from
        return inner if packed else None  # the same position ids (create_causal_mask and its sliding variant)
    ids = _masking_utils().find_packed_sequence_indices(env["position_ids"])
    for other in packed:
        theirs = _closure(other)["packed_sequence_mask"]
        if ids is not None and theirs.shape == ids.shape and bool((theirs == ids).all()):
            return inner
    return None


def _window(size: int) -> Mask | None:
    """The overlay ``k > q - size``: ``sliding_window(size)``; for size 0 (Qwen2-MoE's config without sliding layers
    still asks for that mask, which no layer uses) only later keys, ``~causal()``; below 0, None (dense)."""
    if size >= 1:
        return masks.sliding_window(size)
    return ~masks.causal() if size == 0 else None


def _or(env: dict[str, Any], ctx: _Context) -> Mask | None:
    parts = [_interpret(fn, ctx) for fn in env["mask_functions"]]
    if any(p is None for p in parts):
        return None
    out = parts[0]
    for part in parts[1:]:
        out = out | part
    return out


RECOGNISERS: dict[str, Recogniser] = {
    "causal_mask_function": lambda env, ctx: masks.causal(),
    "bidirectional_mask_function": lambda env, ctx: _FULL,
    "sliding_window_overlay.<locals>.inner_mask": lambda env, ctx: _window(int(env["sliding_window"])),
    "padding_mask_function.<locals>.inner_mask": lambda env, ctx: _padding(_keys(env["padding_mask"], ctx)),
    "packed_sequence_mask_function.<locals>.inner_mask": (
        lambda env, ctx: masks.document(_keys(env["packed_sequence_mask"], ctx))
    ),
    "and_masks.<locals>.and_mask": _and,
    "or_masks.<locals>.or_mask": _or,
}
"""Qualified name of a ``transformers.masking_utils`` predicate -> the maskattn mask it stands for
(None: not expressible). A predicate absent from here makes :func:`build_mask` fall back to dense."""


def _name(fn: Callable) -> str | None:
    if isinstance(fn, _Traceable):
        return fn.qualname
    if torch.compiler.is_compiling():  # dynamo reads no __qualname__ of a function made in the graph
        mu = _mu()
        known = (mu.causal_mask_function, mu.bidirectional_mask_function)
        return next((f.__name__ for f in known if fn is f), None)
    if getattr(fn, "__module__", None) != "transformers.masking_utils":
        return None
    return getattr(fn, "__qualname__", None)


def _interpret(fn: Callable, ctx: _Context) -> Mask | None:
    recogniser = RECOGNISERS.get(_name(fn) or "")
    return None if recogniser is None else recogniser(_closure(fn), ctx)


def _padding(valid: Tensor) -> Mask:
    """``padding(lengths)`` for right padding (cheapest for the backends), ``padding(valid)`` otherwise;
    ``_FULL`` when nothing is padding."""
    valid = valid.bool()  # (B, Lk)
    if torch.compiler.is_compiling():  # choosing the form reads values on the host
        return masks.padding(valid)
    if bool(valid.all()):
        return _FULL
    lengths = valid.sum(dim=1)
    if bool((valid == (torch.arange(valid.shape[1], device=valid.device) < lengths[:, None])).all()):
        return masks.padding(lengths)
    return masks.padding(valid)


def _function_name(function: Callable) -> str:
    """A mask function's name for a warning given once per name: its qualified name, the wrapped function's for a
    ``functools.partial``, else its class's. (Its repr holds arguments and addresses: each new partial or callable
    object warned anew and was kept in ``_WARNED`` for good.)"""
    while isinstance(function, functools.partial):
        function = function.func
    return getattr(function, "__qualname__", None) or f"{type(function).__qualname__} object"


def _once(reason: str) -> None:
    if torch.compiler.is_compiling():  # a log call would break the graph; the first eager call says it
        return
    if reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning("maskattn.hf: %s", reason)


# --- observers of the attention calls ----------------------------------------------------------------
@dataclass(frozen=True)
class ObservedCall:
    """One attention call seen by an observer (:func:`observe`).

    Attributes:
        module: the HF attention module that made the call.
        query: (B, H, Lq, D); key: (B, Hkv, Lk, D).
        lse: (B, H, Lq) log-sum-exp of the scores, for :func:`maskattn.attention_weights`.
        mask: what :func:`build_mask` handed over (its ``mask`` and ``q_offset``).
        scale: the score multiplier of the call (None: 1 / sqrt(D)).
    """

    module: torch.nn.Module
    query: Tensor
    key: Tensor
    lse: Tensor
    mask: HFMask
    scale: float | None


_OBSERVERS: OrderedDict[int, Callable[[ObservedCall], None]] = OrderedDict()  # RemovableHandle weakrefs it


def observe(observer: Callable[[ObservedCall], None]) -> RemovableHandle:
    """Call ``observer(ObservedCall)`` after every attention call through maskattn (soft-capped calls
    excepted: they run a dense path with no log-sum-exp); ``handle.remove()`` stops it. The outputs of the
    model are unchanged, up to the rounding of the backend that returns the log-sum-exp."""
    handle = RemovableHandle(_OBSERVERS)
    _OBSERVERS[handle.id] = observer
    return handle


# --- the two functions register() installs -------------------------------------------------------
def build_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> HFMask:
    """The ``AttentionMaskInterface`` function: transformers' mask request as a structured maskattn mask.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: the sizes transformers computed (keys at
            absolute positions ``kv_offset .. kv_offset + kv_length - 1``, queries from ``q_offset``).
        mask_function: transformers' predicate tree (default: causal).
        attention_mask: the 2-D (B, >= kv_offset + kv_length) bool padding mask, True = real token; or an
            :class:`HFMask` this function built ahead for the same call (``generate`` with a static cache),
            returned as it is.
        kwargs: the other arguments transformers passes (``use_vmap``, ``device``, ...), used by the
            dense fallback.

    Returns:
        An :class:`HFMask`; ``structured`` is False when the pattern fell back to ``from_tensor``.
    """
    if isinstance(attention_mask, HFMask):  # built ahead for this very call (generate with a static cache)
        return attention_mask
    mu = _mu()
    mask_function = mask_function or mu.causal_mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    ctx = _Context(kv_offset=kv_offset, kv_length=kv_length)
    pad = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    parts = [_interpret(mask_function, ctx)]
    if pad is not None and parts[0] is not None:
        parts.append(_padding(_keys(pad, ctx)))
    if parts[0] is not None and q_offset >= kv_offset:
        mask = _conjunction(parts)
        return HFMask(None if mask is _FULL else mask, q_offset - kv_offset)
    if not torch.compiler.is_compiling():  # (the f-string's repr of a traced predicate breaks torch 2.11's graph)
        _once(f"mask function {_function_name(mask_function)!r} has no maskattn structure; "
              "using the dense mask transformers would build (masks.from_tensor)")
    return _dense_mask(mu, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                       kwargs)


def _dense_mask(mu, batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor, kv_offset: int,
                mask_function: Callable, attention_mask: Tensor | None, kwargs: dict[str, Any]) -> HFMask:
    """The (B, 1, Lq, Lk) mask transformers' own ``sdpa_mask`` builds, as ``from_tensor`` (not structured)."""
    dense = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                         use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))
    return HFMask(masks.from_tensor(dense), 0, structured=False)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: HFMask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function: one HF attention call through :func:`maskattn.attention`.

    Args:
        module: the HF attention module (read for ``is_causal`` when no mask was built).
        query: (B, H, Lq, D); key, value: (B, Hkv, Lk, D) (grouped-query attention handled by maskattn).
        attention_mask: what :func:`build_mask` returned, a 4-D mask the caller built itself (bool keep or
            additive float, read with ``masks.from_hf``), or None.
        dropout: dropout probability on the weights (transformers passes 0 in eval).
        scaling: score multiplier (default 1 / sqrt(D)).
        is_causal: overrides ``module.is_causal`` when no mask was built.
        softcap: Gemma-2 logit soft-capping ``tanh(s / softcap) * softcap``: not a maskattn backend feature,
            so it runs a dense soft-capped attention over the same mask (one log line).
        kwargs: ``s_aux`` / ``sinks`` (GPT-OSS): one learned "attention sink" logit per head that joins every
            row's softmax and takes weight without a value; like ``softcap``, a dense attention over the same
            mask (one log line); ``output_attentions``: also return the attention weights. Other keyword arguments
            of transformers' call are not used.

    Returns:
        ``(output (B, Lq, H, D), weights)``, as transformers expects: the (B, H, Lq, Lk) attention weights when the
        model was called with ``output_attentions=True`` (the reference backend builds them, as eager does; an
        observer (:func:`observe`) is handed the log-sum-exp of a second call, without gradients), else None.

    Raises:
        NotImplementedError: for an additive ``position_bias`` (T5-style relative bias).
    """
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("maskattn.hf: attention with an additive position_bias (T5-style) is not "
                                  "supported; use attn_implementation='eager' for this model")
    spec = _spec(module, attention_mask, is_causal, kwargs.get("sliding_window"), query.shape[2])
    sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
    weights = None
    if softcap is not None or sinks is not None:
        feature = f"softcap={softcap}" if softcap is not None else "attention sinks"
        _once(f"{feature}: not a feature of maskattn's backends; running a dense attention over the same mask")
        out, weights = _dense(query, key, value, spec, scaling, dropout, softcap=softcap, sinks=sinks)
        weights = weights if _weights_wanted(kwargs) else None
    elif _weights_wanted(kwargs):  # the model was asked for its attention weights: the reference builds them
        out, weights = attention(query, key, value, spec.mask, q_offset=spec.q_offset, scale=scaling,
                                 dropout_p=dropout, return_weights=True)  # (B, H, Lq, D), (B, H, Lq, Lk)
        if _OBSERVERS:  # observed too: the log-sum-exp from a second call, unrecorded (the weights keep their graph)
            with torch.no_grad():
                _, lse = attention(query, key, value, spec.mask, q_offset=spec.q_offset, scale=scaling,
                                   return_lse=True)  # (B, H, Lq)
            _notify(ObservedCall(module, query.detach(), key.detach(), lse, spec, scaling))
    elif _OBSERVERS:
        out, lse = attention(query, key, value, spec.mask, q_offset=spec.q_offset, scale=scaling, dropout_p=dropout,
                             return_lse=True)  # (B, H, Lq, D), (B, H, Lq)
        _notify(ObservedCall(module, query.detach(), key.detach(), lse.detach(), spec, scaling))
    else:
        out = attention(query, key, value, spec.mask, q_offset=spec.q_offset, scale=scaling,
                        dropout_p=dropout)  # (B, H, Lq, D)
    return out.transpose(1, 2).contiguous(), weights  # (B, Lq, H, D), (B, H, Lq, Lk) or None


def _notify(call: ObservedCall) -> None:
    for observer in list(_OBSERVERS.values()):
        observer(call)


def _weights_wanted(kwargs: dict[str, Any]) -> bool:
    """Whether this call's attention weights are asked for: by the ``output_attentions`` kwarg, or by transformers'
    output collector (``config.output_attentions``, and GPT-2, which drops the kwarg before its attention modules)."""
    if kwargs.get("output_attentions"):
        return True
    collected = None if _COLLECTOR is None else _COLLECTOR.get()  # what the running forward records, by name
    return bool(collected) and any(name.endswith("attentions") for name in collected)


def _spec(module: torch.nn.Module, mask: HFMask | Tensor | None, is_causal: bool | None,
          window: int | None, q_len: int) -> HFMask:
    if isinstance(mask, HFMask):
        return mask
    if isinstance(mask, Tensor):
        _once("a 4-D attention_mask built by the caller reaches maskattn as a dense tensor (masks.from_hf)")
        return HFMask(masks.from_hf(mask), 0, structured=False)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or q_len == 1:  # as transformers' sdpa_attention_forward: one query (a cached step) sees every key
        return HFMask(None)
    return HFMask(masks.causal() & masks.sliding_window(window) if window else masks.causal())


def _dense(q: Tensor, k: Tensor, v: Tensor, spec: HFMask, scale: float | None, dropout: float, *,
           softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Attention with Gemma-2's soft-capped scores and/or GPT-OSS's per-head sink logits (H,), dense, and its
    weights; zero output on rows that may attend nothing (as maskattn everywhere)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Lk, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, Lq, Lk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = None
    if spec.mask is not None:
        allowed = spec.mask.to_dense(q.shape[2], k.shape[2], q_offset=spec.q_offset, device=q.device)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if sinks is not None:  # one more logit per row, which takes weight but has no value
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)  # (B, H, Lq, 1)
        weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(scores, dim=-1)
    if allowed is not None:
        weights = weights * allowed.any(dim=-1, keepdim=True)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    return weights @ v, weights  # (B, H, Lq, D), (B, H, Lq, Lk)


def register(name: str = NAME) -> str:
    """Install ``name`` (default ``"maskattn"``) in transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface``, so ``attn_implementation=name`` runs maskattn with structured masks.

    Returns:
        The name, to pass as ``attn_implementation``.

    Raises:
        ImportError: when transformers is not installed, or older than ``MIN_TRANSFORMERS`` (5.17).
    """
    mu = _masking_utils()
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_forward)
    mu.AttentionMaskInterface.register(name, build_mask)
    _trace_factories(mu)
    global _COLLECTOR
    try:  # imported here: dynamo cannot trace an import inside the attention call
        from transformers.utils.output_capturing import _active_collector as _COLLECTOR
    except ImportError:  # pragma: no cover - a release without the collector hands output_attentions down
        _COLLECTOR = None
    return name
