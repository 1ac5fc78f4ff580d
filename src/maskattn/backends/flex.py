"""The flex backend: PyTorch's FlexAttention, with the mask's predicate as ``mask_mod``.

``mask.allows`` is FlexAttention's ``mask_mod`` contract, shifted by ``q_offset`` (FlexAttention
counts queries from 0); the ``BlockMask`` lets the kernel skip empty tiles. FlexAttention is meant
for GPUs: on CPU, PyTorch (2.13) runs its forward only (no backward), and only where
``torch.compile`` finds a C++ compiler. This backend raises a clear error where it cannot run; it
is never required, and ``backend="auto"`` picks it only where :func:`available` says it runs.

Not supported (ValueError): ``return_weights`` (use ``reference``) and dropout (use ``blocked``).

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from maskattn.backends.guards import empty_result
from maskattn.backends.registry import Backend, Call
from maskattn.masks import Mask

__all__ = ["BACKEND", "attention", "available"]

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # torch without FlexAttention
    _flex = None


_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available(device: torch.device, dtype: torch.dtype, needs_grad: bool) -> bool:
    """Whether FlexAttention can run here: installed, and on CPU only without gradients and in
    float32, float16 or bfloat16 (what its compiled CPU kernel accepts)."""
    if _flex is None:
        return False
    return device.type != "cpu" or (not needs_grad and dtype in _CPU_DTYPES)


@functools.cache
def _compiled():
    return torch.compile(_flex.flex_attention, dynamic=False)


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
    compiled: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Masked attention by ``torch.nn.attention.flex_attention``.

    Takes the arguments of :func:`maskattn.backends.reference.attention`, plus ``compiled``: run
    the ``torch.compile``-d kernel (the fast one), or FlexAttention's eager reference path.
    ``return_lse`` gives FlexAttention's own log-sum-exp (natural log; -inf on empty rows); on CPU, where the
    compiled kernel cannot return it (PyTorch 2.13), that call runs the eager path.

    Raises:
        ValueError: if ``return_weights`` is True or ``dropout_p`` > 0, or where FlexAttention cannot run (not
            installed; gradients or float64 on CPU).
    """
    if return_weights or dropout_p > 0.0:
        raise ValueError(
            f"backend 'flex' supports neither return_weights nor dropout (got return_weights={return_weights}, "
            f"dropout_p={dropout_p}); use backend='reference' for weights, 'blocked' for dropout"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:  # FlexAttention's compiled kernel divides by zero (SIGFPE) on these
        return empty_result(q, k, v, return_lse)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not available(q.device, q.dtype, needs_grad):
        raise ValueError(_unavailable(q.device, q.dtype, needs_grad))
    # PyTorch's compiled CPU kernel (2.13) reads a head dim of stride 0 (x[..., :1].expand(..., D)) as if it were
    # laid out: wrong numbers or NaN. Only such inputs are copied; the usual layouts (stride 1) are passed as given.
    q, k, v = (x.contiguous() if x.stride(-1) == 0 else x for x in (q, k, v))
    heads, q_len = q.shape[1], q.shape[2]
    block_mask = None
    if mask is not None:
        if not torch.compiler.is_compiling():  # a copy to the device inside the compiled kernel cannot be lowered
            mask = mask.to(q.device)

        def mask_mod(b, h, q_idx, kv_idx):
            return mask.allows(b, h, q_idx + q_offset, kv_idx)

        block_mask = _flex.create_block_mask(
            mask_mod,
            mask.batch if mask.batch > 1 else None,
            mask.heads if mask.heads > 1 else None,
            q_len,
            k.shape[2],
            device=q.device,
        )
    gqa = heads != k.shape[1]
    if not return_lse:
        run = _compiled() if compiled else _flex.flex_attention
        return run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa), None
    run = _compiled() if compiled and q.device.type != "cpu" else _eager_flex
    if hasattr(_flex, "AuxRequest"):  # torch >= 2.9; return_lse is deprecated there
        out, aux = run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                       return_aux=_flex.AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    return out, lse.float().detach()


def _eager_flex(*args, **kwargs):
    """FlexAttention's eager path, without its warning that it is not the compiled kernel (we know)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex.flex_attention(*args, **kwargs)


def _unavailable(device: torch.device, dtype: torch.dtype, needs_grad: bool) -> str:
    why = "is not in this torch" if _flex is None else \
        "has no backward on CPU" if needs_grad and dtype in _CPU_DTYPES else "does not take float64 on CPU"
    return (f"backend 'flex': FlexAttention {why} (device {device}, {dtype}, torch {torch.__version__}); "
            "use backend='blocked' or 'auto'")


def _refuses(call: Call) -> str | None:
    if call.dropout_p > 0.0:
        return f"backend 'flex' has no dropout (dropout_p={call.dropout_p})"
    if not available(call.q.device, call.q.dtype, call.needs_grad):
        return _unavailable(call.q.device, call.q.dtype, call.needs_grad)
    return None


def _cost(call: Call, kept: int) -> tuple[int, str]:
    return kept, "skips empty tiles"


BACKEND = Backend("flex", attention, refuses=_refuses, cost=_cost, returns_lse=True)
