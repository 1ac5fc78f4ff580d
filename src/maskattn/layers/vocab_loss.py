"""Cross-entropy of a vocabulary projection computed a few rows at a time (a fused "linear + cross-entropy").

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`` (or ``"mean"``) but, for
more rows than one chunk, never holds the (N, V) logits whole:
with GPT-2's 50,257 tokens they are 412 MB per 2,048 tokens in float32, written once by the projection,
again by ``log_softmax``, and twice more in backward. Here each chunk of rows is projected, reduced to
its log-sum-exp and, when gradients are wanted, multiplied into the gradients of ``hidden`` and
``weight`` at once, while the chunk is fresh; the softmax's normalisation and the one-hot go onto the
small (c, E) operands, so the chunk itself is only exponentiated in place. Backward then only scales
the stored gradients by the incoming one (so a loss computed with gradients enabled costs its gradients
even if it is never backpropagated, and it cannot be differentiated twice). The matmuls are the same
three as the unfused version's, so this saves memory and elementwise passes, not FLOPs (under a half-type
autocast, the weight gradient is taken for ``HALF_GROUP`` chunks at a time). Rows that fit
one chunk (a small vocabulary) take PyTorch's own path, which is as fast there.

Shape legend: N rows (tokens), E hidden width, V vocabulary, c rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["CHUNK_ELEMENTS", "linear_cross_entropy"]

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB in float32): 166 rows at V = 50,257, everything at small V
HALF_GROUP = 4  # half types: chunks whose weight gradient is one matmul (a (4 c, V) buffer, 64 MB in bfloat16)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         reduction: str = "sum", chunk_rows: int | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=..., reduction=...)``
    without the whole (N, V) logits (beyond one chunk of rows); the default reduction is ``"sum"``.

    Args:
        hidden: (..., E) states, e.g. (B, L, E).
        weight: (V, E) output projection (e.g. tied to the token embedding); no bias.
        targets: (...) int64 token ids in [0, V), the shape of ``hidden`` without its last dim;
            ``ignore_index`` marks positions without a target. Ids out of range are not checked (that
            would cost a pass and a host sync): like ``F.cross_entropy``, indexing fails on them.
        reduction: ``"sum"`` or ``"mean"`` (over the positions with a target; NaN if there are none, as
            PyTorch's).
        chunk_rows: rows per chunk (default ``CHUNK_ELEMENTS // V``).

    Under autocast the projection runs in the autocast dtype and the softmax in float32, as
    ``F.linear(...).float()`` would; without it ``hidden`` and ``weight`` must have one dtype. Float64
    inputs stay float64 throughout (loss and gradients, as ``F.cross_entropy`` of float64 logits). Under
    ``torch.compile`` the float32 chunks are one opaque operator in the graph, and a half type takes the
    plain projection and loss, which Inductor fuses faster than the chunks (docs/performance.md, session 14).

    Raises:
        ValueError: naming the argument whose shape or dtype does not fit, or a bad reduction or chunk_rows.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., E) and weight (V, E) must share E; got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if targets.dtype != torch.int64 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must be int64 of shape {tuple(hidden.shape[:-1])} (hidden without E), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    device = hidden.device.type
    if not torch.is_autocast_enabled(device) and hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must have one dtype outside autocast, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, E), (N,)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    compiling = torch.compiler.is_compiling()
    # One chunk: the logits are small, and PyTorch's own path is as fast. Compiled in a half type: Inductor
    # fuses the plain version faster than the chunks.
    if hidden.shape[0] <= chunk_rows or (compiling and dtype in (torch.float16, torch.bfloat16)):
        logits = F.linear(hidden, weight)  # (N, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a half type widened, float64 kept
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    if compiling:  # in float32 the chunks are faster than Inductor's plain version: one opaque operator
        grads = torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad
        total, count, _, _ = _chunks_op(hidden, weight, targets, ignore_index, chunk_rows, dtype, *grads)
        if reduction == "sum":
            return total
        # NaN with nothing to predict, as PyTorch's; the gradients stay zero, as PyTorch's do
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not wants_grad:
        total, count = _chunks(hidden, weight, targets, ignore_index, chunk_rows, dtype, None)
        return total if reduction == "sum" else total / count
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, chunk_rows, dtype)


def _chunks(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int,
            dtype: torch.dtype, grads: tuple[Tensor | None, Tensor | None] | None) -> tuple[Tensor, Tensor]:
    """Summed loss and target count; with ``grads`` = (d hidden (N, E) or None, d weight (V, E) float32
    or None), also the gradients of the *summed* loss, written into them."""
    wide = torch.promote_types(dtype, torch.float32)  # the softmax's dtype: float32, or float64 for float64
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)  # (V, E)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        count = (targets != ignore_index).sum()
        grouped = None  # half types with gradients: a buffer of HALF_GROUP chunks of d loss / d logits
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].to(dtype)  # (c, E)
            t = targets[start : start + chunk_rows]
            hit = t == ignore_index  # (c,)
            ignored, safe = hit.unsqueeze(1), t.masked_fill(hit, 0)  # (c, 1), (c,)
            logits = (h @ w.T).to(wide)  # (c, V)
            top = logits.amax(-1, keepdim=True)  # (c, 1)
            picked = logits.gather(1, safe.unsqueeze(1)) - top  # shifted by the row max, as log_softmax is,
            e = logits.sub_(top).exp_()  # so that log(sum) - picked keeps small losses exact; in place
            sums = e.sum(-1, keepdim=True)  # (c, 1)
            total = total + (sums.log() - picked).masked_fill(ignored, 0.0).sum()
            if grads is None:
                continue
            # d loss / d logits = e / sums - one_hot(t), zero on ignored rows. In float32 the 1 / sums scaling
            # and the one-hot go onto the small (c, E) operands, so the (c, V) chunk is read only by the two
            # matmuls; in a half type they are applied to the chunk first (one more pass), as PyTorch's
            # softmax gradient is, so that the low-precision matmuls see bounded, already-subtracted values.
            inv = torch.where(ignored, 0.0, sums.reciprocal())  # (c, 1)
            kept = (~ignored).to(wide)  # (c, 1)
            grad_hidden, grad_weight = grads
            if dtype in (torch.float32, torch.float64):
                e = e.to(dtype)  # a no-op in float32
                if grad_hidden is not None:
                    rows = (e @ w) * inv.to(dtype) - w[safe] * kept.to(dtype)  # (c, E)
                    grad_hidden[start : start + chunk_rows] = rows.to(grad_hidden.dtype)
                if grad_weight is not None:
                    scaled = h * inv.to(dtype)  # (c, E)
                    if grad_weight.dtype == dtype:  # accumulated by the matmul itself: no (V, E) temporary
                        grad_weight.addmm_(e.T, scaled)
                    else:
                        grad_weight += (e.T @ scaled).to(grad_weight.dtype)  # (V, E)
                    grad_weight.index_add_(0, safe, (h * -kept.to(dtype)).to(grad_weight.dtype))
                continue
            probs = e.mul_(inv)  # (c, V), zero on ignored rows
            probs.scatter_add_(1, safe.unsqueeze(1), -kept)
            # The half-type chunks of a group are kept until the group's weight gradient is one matmul: each
            # (V, E) partial costs a widening copy and an add to the float32 gradient, more than its matmul.
            if grouped is None:  # without a weight gradient a group is one chunk
                group = HALF_GROUP * chunk_rows if grad_weight is not None else chunk_rows
                grouped = torch.empty((min(group, hidden.shape[0]), weight.shape[0]), dtype=dtype,
                                      device=hidden.device)  # (group rows, V)
            at = start % grouped.shape[0]
            g = grouped[at : at + probs.shape[0]].copy_(probs)  # (c, V) in the half type
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_rows] = (g @ w).to(grad_hidden.dtype)  # (c, E)
            end = start + probs.shape[0]
            if grad_weight is not None and (at + probs.shape[0] == grouped.shape[0] or end == hidden.shape[0]):
                rows = hidden[end - at - probs.shape[0] : end].to(dtype)  # (group rows, E)
                grad_weight += (grouped[: rows.shape[0]].T @ rows).to(grad_weight.dtype)  # (V, E)
    return total, count


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_rows, dtype):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        wide = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=wide) if ctx.needs_input_grad[1] else None
        total, count = _chunks(hidden, weight, targets, ignore_index, chunk_rows, dtype, (grad_hidden, grad_weight))
        if reduction == "sum":
            scale, value = torch.ones((), device=hidden.device), total
        else:  # NaN with nothing to predict, as PyTorch's; the gradients stay zero, as PyTorch's do
            scale, value = count.to(total.dtype).clamp(min=1).reciprocal(), total / count.to(total.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.weight_dtype = weight.dtype
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        return *_scaled(grad_hidden, grad_weight, grad * scale, ctx.weight_dtype), None, None, None, None, None


def _scaled(grad_hidden: Tensor | None, grad_weight: Tensor | None, factor: Tensor,
            weight_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """The stored gradients of the summed loss times the incoming gradient (``factor``)."""
    d_hidden = None if grad_hidden is None else grad_hidden * factor.to(grad_hidden.dtype)
    d_weight = None if grad_weight is None else (grad_weight * factor).to(weight_dtype)
    return d_hidden, d_weight


@torch.library.custom_op("maskattn::linear_cross_entropy_chunks", mutates_args=())
def _chunks_op(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int,
               dtype: torch.dtype, grad_hidden: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunks as one operator for torch.compile: (summed loss, target count, d hidden of the summed loss
    or an empty tensor, d weight (float32) or an empty tensor)."""
    gh = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    gw = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if grad_weight \
        else weight.new_empty(0)
    total, count = _chunks(hidden, weight, targets, ignore_index, chunk_rows, dtype,
                           (gh if grad_hidden else None, gw if grad_weight else None))
    return total, count, gh, gw


@_chunks_op.register_fake
def _(hidden, weight, targets, ignore_index, chunk_rows, dtype, grad_hidden, grad_weight):
    gh = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32)) if grad_weight \
        else weight.new_empty(0)
    return hidden.new_empty((), dtype=torch.promote_types(dtype, torch.float32)), targets.new_empty(()), gh, gw


def _setup_chunks_op(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.wants = inputs[6], inputs[7]
    ctx.weight_dtype = inputs[1].dtype


def _backward_chunks_op(ctx, grad, *_):
    grad_hidden, grad_weight = (g if want else None for g, want in zip(ctx.saved_tensors, ctx.wants, strict=True))
    return *_scaled(grad_hidden, grad_weight, grad, ctx.weight_dtype), None, None, None, None, None, None


_chunks_op.register_autograd(_backward_chunks_op, setup_context=_setup_chunks_op)
