"""The blocked backend as one opaque operator for ``torch.compile`` and ``torch.export``.

:mod:`maskattn.backends.blocked` plans its tiles on the host: it reads the mask's block map (tensor
values) and loops over Python groups, which a tracer cannot follow without breaking the graph. While
compiling, :func:`attention` therefore runs it as the custom operator ``maskattn::blocked_attention``
(:func:`torch.library.custom_op`): the tracer sees one node whose output shapes its fake implementation
gives, and the planning runs inside the operator on real tensors, exactly as in eager. Its gradient is a
second operator, ``maskattn::blocked_attention_backward``, registered with ``register_autograd``. Eager
calls go straight to :func:`maskattn.backends.blocked.attention`, unchanged.

An operator takes tensors and plain values, not a :class:`~maskattn.masks.Mask`: the mask crosses it as
its tensors, its integers (which may be symbolic sizes) and a *spec*, a string that names the mask classes
and their other attributes, built from the mask's Python structure at trace time (:func:`flatten_mask`)
and read back with :func:`unflatten_mask` (``ast.literal_eval``, and only maskattn's own mask classes).

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim, Dv value
head dim, nq query blocks, R rows per block (H // Hkv * block_q), B' = B * Hkv.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
from typing import Any

import torch
from torch import Tensor

from maskattn.backends import blocked
from maskattn.backends.blocked import BLOCK_K, BLOCK_Q
from maskattn.masks import Mask

__all__ = ["BACKEND", "attention", "flatten_mask", "unflatten_mask"]


# --- a mask across an operator boundary ------------------------------------------------------------
def _encode(value: Any, tensors: list[Tensor], ints: list[int]) -> Any:
    if isinstance(value, Tensor):
        for i, seen in enumerate(tensors):  # the same tensor under two attribute names travels once
            if seen is value:
                return ("tensor", i)
        tensors.append(value)
        return ("tensor", len(tensors) - 1)
    if isinstance(value, Mask):
        cls = type(value)
        if not torch.compiler.is_compiling() and set(vars(value)) != set(cls._state):
            raise TypeError(f"{cls.__qualname__} holds the attributes {sorted(vars(value))} but its _state names "
                            f"{sorted(cls._state)}: a mask class lists what __init__ sets in _state (CONTRIBUTING.md)")
        attrs = tuple((name, _encode(getattr(value, name), tensors, ints)) for name in cls._state)
        return ("mask", cls.__module__, cls.__qualname__, attrs)
    if isinstance(value, tuple):
        return ("tuple", tuple(_encode(v, tensors, ints) for v in value))
    if isinstance(value, int | torch.SymInt) and not isinstance(value, bool):
        # every int travels as an operator argument: a size can be symbolic (dynamic shapes), and the tracer
        # shows a symbolic size as a plain int, so the two cannot be told apart here
        ints.append(value)
        return ("int", len(ints) - 1)
    return value


def flatten_mask(mask: Mask | None) -> tuple[str, list[Tensor], list[int]]:
    """``(spec, tensors, ints)``: ``mask`` as a string, the tensors it holds and its integers (sizes, windows,
    offsets: a batch size read from a tensor's shape is symbolic under ``torch.compile(dynamic=True)``);
    ``("", [], [])`` for None.

    Only Python structure is read (classes, attributes), never tensor values, so the tracer of
    ``torch.compile`` follows it and the spec is a constant of the graph.
    """
    tensors: list[Tensor] = []
    ints: list[int] = []
    if mask is None:
        return "", tensors, ints
    return repr(_encode(mask, tensors, ints)), tensors, ints


@functools.lru_cache(maxsize=256)
def _parse(spec: str) -> Any:
    return ast.literal_eval(spec)


def _decode(node: Any, tensors: list[Tensor], ints: list[int]) -> Any:
    if not isinstance(node, tuple):
        return node
    tag, *rest = node
    if tag == "tensor":
        return tensors[rest[0]]
    if tag == "int":
        return ints[rest[0]]
    if tag == "tuple":
        return tuple(_decode(v, tensors, ints) for v in rest[0])
    module, qualname, attrs = rest
    if not module.startswith("maskattn."):
        raise ValueError(f"mask spec names {module}.{qualname}, which is not a maskattn mask class")
    cls = getattr(importlib.import_module(module), qualname)
    if not (isinstance(cls, type) and issubclass(cls, Mask)):
        raise ValueError(f"mask spec names {module}.{qualname}, which is not a Mask subclass")
    mask = cls.__new__(cls)
    mask.__dict__.update({name: _decode(v, tensors, ints) for name, v in attrs})
    return mask


def unflatten_mask(spec: str, tensors: list[Tensor], ints: list[int] = ()) -> Mask | None:
    """The mask of :func:`flatten_mask`, rebuilt around ``tensors`` and ``ints``."""
    return _decode(_parse(spec), list(tensors), list(ints)) if spec else None


# --- the operators -----------------------------------------------------------------------------------
class _Context:
    """What ``blocked._BlockedAttention`` reads from and writes to an autograd context, outside autograd."""

    def __init__(self, saved: tuple[Tensor, ...] = ()) -> None:
        self.saved_tensors = saved

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        pass


def _plan(q: Tensor, k: Tensor, spec: str, mask_tensors: list[Tensor], ints: list[int], q_offset: int,
          block_q: int, block_k: int) -> blocked.Plan:
    return blocked.make_plan(unflatten_mask(spec, mask_tensors, ints), q, k, q_offset=q_offset, block_q=block_q,
                             block_k=block_k)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("maskattn::blocked_attention", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, mask_tensors: list[Tensor], spec: str, ints: list[int],
                seed: Tensor, scale: float, dropout_p: float, q_offset: int, block_q: int, block_k: int, kernel: str,
                want_lse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(output (B, H, Lq, Dv), exposed lse (B, H, Lq) or (0,), lse kept for backward (B', nq * R))``.

    The kept lse is flat: as (B', nq, R) its nq = ceil(Lq / block_q) can be 1, and the contiguity check of a
    dynamic-shape export then guards on it (Lq <= 128 only)."""
    plan = _plan(q, k, spec, mask_tensors, ints, q_offset, block_q, block_k)
    ctx = _Context()
    out, exposed = blocked._BlockedAttention.forward(ctx, q, k, v, plan, scale, dropout_p, int(seed), kernel,
                                                     want_lse)
    return out.contiguous(), exposed.contiguous(), ctx.saved_tensors[4].flatten(1).contiguous()


@_forward_op.register_fake
def _forward_fake(q, k, v, mask_tensors, spec, ints, seed, scale, dropout_p, q_offset, block_q, block_k, kernel,
                  want_lse):
    batch, heads, q_len, _ = q.shape
    kv_heads = k.shape[1]
    blocks = (q_len + block_q - 1) // block_q
    exposed = q.new_empty(batch, heads, q_len, dtype=_wide(q.dtype)) if want_lse else q.new_empty(0)
    rows = q.new_empty(batch * kv_heads, blocks * (heads // kv_heads * block_q), dtype=_wide(q.dtype))
    return q.new_empty(batch, heads, q_len, v.shape[-1]), exposed, rows


@torch.library.custom_op("maskattn::blocked_attention_backward", mutates_args=())
def _backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_rows: Tensor,
                 mask_tensors: list[Tensor], spec: str, ints: list[int], seed: Tensor, scale: float,
                 dropout_p: float, q_offset: int, block_q: int, block_k: int,
                 kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`_forward_op`, recomputed group by group as the eager backward does."""
    plan = _plan(q, k, spec, mask_tensors, ints, q_offset, block_q, block_k)
    out_rows = blocked._rows_layout(out.contiguous(), k.shape[1], block_q, plan.padded_q)  # (B', nq, R, Dv)
    lse_rows = lse_rows.unflatten(1, (-1, q.shape[1] // k.shape[1] * block_q))  # (B', nq, R)
    ctx = _Context((q, k, v, out_rows, lse_rows))
    ctx.plan, ctx.scale, ctx.dropout_p, ctx.seed, ctx.kernel = plan, scale, dropout_p, int(seed), kernel
    dq, dk, dv = blocked._gradients(ctx, grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_backward_op.register_fake
def _backward_fake(grad, q, k, v, out, lse_rows, mask_tensors, spec, ints, seed, scale, dropout_p, q_offset, block_q,
                   block_k, kernel):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask_tensors, spec, ints, seed, scale, dropout_p, q_offset, block_q, block_k, kernel, _ = inputs
    out, _, lse_rows = output
    ctx.save_for_backward(q, k, v, out, lse_rows, seed, *mask_tensors)
    ctx.options = (spec, ints, scale, dropout_p, q_offset, block_q, block_k, kernel)


def _backward(ctx, grad, _grad_lse, _grad_rows):
    q, k, v, out, lse_rows, seed, *mask_tensors = ctx.saved_tensors
    spec, ints, scale, dropout_p, q_offset, block_q, block_k, kernel = ctx.options
    dq, dk, dv = _backward_op(grad, q, k, v, out, lse_rows, mask_tensors, spec, ints, seed, scale, dropout_p,
                              q_offset, block_q, block_k, kernel)
    # torch.library flattens a list of non-tensors as one input, and an empty list as a list of no tensors
    no_grad_ints = None if ints else []
    return dq, dk, dv, [None] * len(mask_tensors), None, no_grad_ints, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --- the backend --------------------------------------------------------------------------------------
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    q_offset: int = 0,
    return_weights: bool = False,
    generator: torch.Generator | None = None,
    return_lse: bool = False,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """:func:`maskattn.backends.blocked.attention`, as one operator while ``torch.compile`` traces.

    Same arguments, results and errors; eager calls run the blocked backend itself.
    """
    options = {"scale": scale, "dropout_p": dropout_p, "q_offset": q_offset, "return_weights": return_weights,
               "generator": generator, "return_lse": return_lse, "block_q": block_q, "block_k": block_k,
               "kernel": kernel}
    if not torch.compiler.is_compiling() or return_weights:  # eager (return_weights: its error message)
        return blocked.attention(q, k, v, mask, **options)
    kernel = blocked._pick_kernel(kernel, q, v, dropout_p)
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu")
    else:
        seed = torch.zeros(1, dtype=torch.long)
    spec, tensors, ints = flatten_mask(mask)
    out, lse, _ = _forward_op(q, k, v, tensors, spec, ints, seed, scale, dropout_p, q_offset, block_q, block_k, kernel,
                              return_lse)
    return out, (lse if return_lse else None)


BACKEND = dataclasses.replace(blocked.BACKEND, fn=attention)
