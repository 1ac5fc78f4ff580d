"""Leak audit: prove that no output depends on an input that the mask hides.

For one attention call (a layer with its mask) three independent checks (:data:`CALL_CHECKS`):

* **perturbation**: for every query position, replace the inputs at every position the mask hides
  from it and require its output to stay bit-identical;
* **Jacobian**: the gradient of each output position with respect to each hidden input position
  must be exactly zero;
* **non-finite**: NaN in every position hidden from a query must leave its output finite and
  bit-identical (``audit_nonfinite_call``).

A query's own position is never counted as hidden input in self-attention (its input is also its
query). A whole model is audited as it declares (:class:`maskattn.models.Inspectable`): its
``audit_probe()`` names the inputs to draw and the checks, its ``attention_sites()`` the attention
modules and their kinds. Every attention call of a forward pass is audited with the inputs and the
mask it really received (captured with hooks), and end-to-end checks test what the model promises:
decoder logits at step t must not change when the tokens after t change, nor when there are fewer of
them, nor (sliding windows) when tokens beyond the model's receptive field change; packed documents
must not see each other; encoder outputs must not change with the padding nor with another row's tokens,
nor a captioner's with the pixels outside an image's real size.
Models of other libraries are audited through a registered adapter
(:func:`maskattn.models.inspectable`; ``maskattn.hf_inspect`` for Hugging Face models).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from maskattn.masks import Mask, from_tensor
from maskattn.models import AuditProbe, Inspectable, ProbeCheck, ProbeInput, inspectable


@dataclass
class Verdict:
    """The result of auditing one attention call or one end-to-end property."""

    name: str
    ok: bool
    checked_pairs: int  # hidden (batch, query, key) triples checked
    leaks: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, query, key), first few
    how: str = ""  # which check found the leak

    def __str__(self) -> str:
        if self.ok:
            return f"PASS  {self.name}  ({self.checked_pairs} hidden pairs checked)"
        pairs = ", ".join(f"b{b} q{q}->k{k}" for b, q, k in self.leaks[:6])
        return f"LEAK  {self.name}  ({self.how}): {pairs}"


@dataclass
class Report:
    verdicts: list[Verdict]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def __str__(self) -> str:
        lines = [str(v) for v in self.verdicts]
        lines.append("no leak found" if self.ok else f"{sum(not v.ok for v in self.verdicts)} leak(s) found")
        return "\n".join(lines)


# --- one attention call ------------------------------------------------------------------------------
# A mask that differs per head is audited head by head: head h's output (a maskattn layer's ``attend``
# submodule, (B, H, Lq, D)) must not depend on the inputs hidden from head h. Otherwise the layer's own
# output is audited against the inputs hidden from every head. Either way the outputs are (B, Lq, U, X):
# U = H heads, or U = 1 (the whole output).
def _hidden(mask: Mask | Tensor | None, batch: int, q_len: int, k_len: int, q_offset: int, self_attn: bool) -> Tensor:
    """(B, U, Lq, Lk) True where the unit (a head, or all heads together) may not attend; the diagonal of
    self-attention excluded."""
    if mask is None:
        return torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool)
    mask = from_tensor(mask) if isinstance(mask, Tensor) else mask
    mask.check(q_len, k_len, q_offset=q_offset, batch=batch)  # a batch it does not fit: named, not expand's error
    allowed = mask.to_dense(q_len, k_len, q_offset=q_offset, device="cpu")  # (B|1, H|1, Lq, Lk)
    hidden = ~allowed.expand(batch, allowed.shape[1], q_len, k_len)
    if self_attn:
        hidden = hidden & ~torch.eye(q_len, k_len, dtype=torch.bool)
    return hidden


def _runner(layer: Callable[..., Tensor], mask: Mask | Tensor | None, heads: int, q_offset: int,
            kwargs: dict) -> Callable[[Tensor, Tensor | None, Tensor | None], Tensor]:
    """``run(query, key, value)`` -> (B, Lq, U, X): the layer's output, or per head its ``attend`` outputs."""
    extra = {"q_offset": q_offset} if q_offset else {}
    attend = getattr(layer, "attend", None)
    if heads > 1 and not isinstance(attend, nn.Module):
        raise ValueError(f"the mask differs per head ({heads} heads): auditing it needs the layer's per-head outputs, "
                         f"which a maskattn MultiHeadAttention gives (its attend submodule); {type(layer).__name__} "
                         "has none")

    def run(q_in: Tensor, k_in: Tensor | None, v_in: Tensor | None) -> Tensor:
        if heads == 1:
            return layer(q_in, k_in, v_in, mask=mask, **extra, **kwargs)[:, :, None]  # (B, Lq, 1, E)
        seen: list[Tensor] = []
        handle = attend.register_forward_hook(
            lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
        try:
            layer(q_in, k_in, v_in, mask=mask, **extra, **kwargs)
        finally:
            handle.remove()
        if not seen:
            raise ValueError(f"the mask differs per head: auditing it needs the per-head outputs of the layer's attend "
                             f"submodule, which {type(layer).__name__} did not call")
        return seen[-1].transpose(1, 2)  # (B, Lq, H, D)

    return run



def _with_autograd(fn: Callable) -> Callable:
    """Run ``fn`` with autograd on (the Jacobian check differentiates), also when called under ``no_grad`` or
    ``inference_mode``: the tensors it makes are then normal ones."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapped


def _in_eval_mode(fn: Callable) -> Callable:
    """Run ``fn(module, ...)`` with ``module`` (when an nn.Module) in eval mode, each of its submodules given back
    its own mode after: the checks compare outputs bit for bit, which dropout would move, and an audit must not
    change how training goes on."""

    @functools.wraps(fn)
    def wrapped(module: Any, *args: Any, **kwargs: Any) -> Any:
        modes = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
        if modes:
            module.eval()
        try:
            return fn(module, *args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training

    return wrapped


@_in_eval_mode
@_with_autograd
def audit_call(layer: Callable[..., Tensor], query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
               *, mask: Mask | Tensor | None = None, name: str = "attention", q_offset: int = 0,
               max_leaks: int = 10, **kwargs) -> Verdict:
    """Audit one call ``layer(query, key, value, mask=mask, **kwargs)`` -> (B, Lq, E).

    The inputs perturbed are ``query`` for self-attention (key and value omitted) and ``key`` and
    ``value`` for cross-attention. A mask that differs per head is audited head by head (see above).
    """
    self_attn = key is None
    source = query if self_attn else key
    batch, q_len, k_len = query.shape[0], query.shape[1], source.shape[1]
    hidden = _hidden(mask, batch, q_len, k_len, q_offset, self_attn)  # (B, U, Lq, Lk)
    run = _runner(layer, mask, hidden.shape[1], q_offset, kwargs)

    with torch.no_grad():
        base = run(query, key, value)
    gen = torch.Generator().manual_seed(1)
    noise = (torch.randn(source.shape, generator=gen, dtype=source.dtype) * 3).to(source.device)

    def moved(i: int, u: int, spot: Tensor) -> Tensor:
        """(B,) whether unit u's output at query i changes when the inputs at ``spot`` (B, Lk) are replaced."""
        spot = spot[..., None].to(source.device)
        with torch.no_grad():
            if self_attn:
                out = run(torch.where(spot, noise, source), None, None)
            else:
                out = run(query, torch.where(spot, noise, source),
                          None if value is None else torch.where(spot, noise.to(value.dtype), value))
        return (out[:, i, u] != base[:, i, u]).any(-1).cpu()

    leaks: list[tuple[int, int, int]] = []
    for u in range(hidden.shape[1]):
        for i in range(q_len):
            hide = hidden[:, u, i, :]  # (B, Lk)
            if not hide.any() or not moved(i, u, hide).any():
                continue
            for j in hide.any(0).nonzero().flatten().tolist():  # name the pairs: one hidden key at a time
                one = torch.zeros_like(hide)
                one[:, j] = hide[:, j]
                leaks += [(b, i, j) for b in moved(i, u, one).nonzero().flatten().tolist()]
            if len(leaks) >= max_leaks:
                break
        if len(leaks) >= max_leaks:
            break
    if leaks:
        return Verdict(name, False, int(hidden.sum()), leaks[:max_leaks], "perturbing hidden inputs changed the output")
    leaks = _jacobian_leaks(run, query, key, value, hidden, self_attn, max_leaks)
    if leaks:
        return Verdict(name, False, int(hidden.sum()), leaks, "non-zero gradient through a hidden position")
    return Verdict(name, True, int(hidden.sum()))


def _jacobian_leaks(run, query, key, value, hidden, self_attn, max_leaks) -> list[tuple[int, int, int]]:
    leaks: list[tuple[int, int, int]] = []
    source = (query if self_attn else key).detach().clone().requires_grad_(True)
    value_in = None if self_attn or value is None else value.detach().clone().requires_grad_(True)
    out = run(source, None, None) if self_attn else run(query, source, value_in)  # (B, Lq, U, X)
    gen = torch.Generator().manual_seed(2)
    inputs = [source] if value_in is None else [source, value_in]
    for u in range(hidden.shape[1]):
        for i in range(out.shape[1]):
            if not hidden[:, u, i].any():
                continue
            cotangent = torch.randn(out[:, i, u].shape, generator=gen, dtype=out.dtype).to(out.device)
            grads = torch.autograd.grad(out[:, i, u], inputs, cotangent, retain_graph=True, allow_unused=True)
            touched = sum((g.abs().sum(-1) != 0) for g in grads if g is not None)  # (B, Lk)
            bad = (hidden[:, u, i] & (touched > 0).cpu()).nonzero().tolist()
            leaks += [(b, i, j) for b, j in bad][: max_leaks - len(leaks)]
            if len(leaks) >= max_leaks:
                return leaks
    return leaks


@_in_eval_mode
def audit_nonfinite_call(layer: Callable[..., Tensor], query: Tensor, key: Tensor | None = None,
                         value: Tensor | None = None, *, mask: Mask | Tensor | None = None, name: str = "attention",
                         q_offset: int = 0, max_leaks: int = 10, **kwargs) -> Verdict:
    """Audit one call as :func:`audit_call` does, with NaN as the replacement: for every query, NaN in every
    input position hidden from it must leave its output finite and bit-identical (0 x NaN is NaN, so a
    hidden position that is multiplied by a zero weight, or masked by adding -inf, fails here). A leak is
    named by the hidden key that alone spoils the output (or the row's first hidden key, when only all
    together do)."""
    self_attn = key is None
    source = query if self_attn else key
    hidden = _hidden(mask, query.shape[0], query.shape[1], source.shape[1], q_offset, self_attn)  # (B, U, Lq, Lk)
    run = _runner(layer, mask, hidden.shape[1], q_offset, kwargs)

    def spoiled(spot: Tensor) -> Tensor:  # the output with NaN at spot (B, Lk)
        spot = spot[..., None].to(source.device)
        if self_attn:
            return run(torch.where(spot, torch.nan, source), None, None)
        return run(query, torch.where(spot, torch.nan, source),
                   None if value is None else torch.where(spot, torch.nan, value))

    leaks: list[tuple[int, int, int]] = []
    with torch.no_grad():
        base = run(query, key, value)
        for u in range(hidden.shape[1]):
            for i in range(query.shape[1]):
                hide = hidden[:, u, i]  # (B, Lk)
                if not hide.any():
                    continue
                moved = (spoiled(hide)[:, i, u] != base[:, i, u]).any(-1).cpu()  # (B,): NaN != NaN counts
                for b in moved.nonzero().flatten().tolist():
                    keys = hide[b].nonzero().flatten().tolist()
                    alone = [j for j in keys if (spoiled(_one(hide, b, j))[b, i, u] != base[b, i, u]).any()]
                    leaks.append((b, i, (alone or keys)[0]))
                if len(leaks) >= max_leaks:
                    break
            if len(leaks) >= max_leaks:
                break
    if leaks:
        return Verdict(f"{name}, NaN hidden", False, int(hidden.sum()), leaks[:max_leaks],
                       "NaN in hidden inputs reached the output")
    return Verdict(f"{name}, NaN hidden", True, int(hidden.sum()))


def _one(like: Tensor, b: int, j: int) -> Tensor:
    spot = torch.zeros_like(like)
    spot[b, j] = True
    return spot


@_in_eval_mode
@_with_autograd
def audit_layer(layer: nn.Module, mask: Mask | Tensor | None, *, length: int = 12, batch: int = 2,
                d_model: int | None = None, seed: int = 0, cross_length: int | None = None) -> Report:
    """Audit a stand-alone attention layer under ``mask`` on random inputs (self-attention, or
    cross-attention to a random memory of ``cross_length`` positions)."""
    for name, value in (("length", length), ("batch", batch), ("cross_length", cross_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"audit_layer: {name} must be an int >= 1, got {value!r}")
    width = d_model or getattr(layer, "d_model", None)
    if width is None:
        raise ValueError("d_model is required for a layer without a d_model attribute")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, width, generator=gen)
    if cross_length is None:
        name = f"{type(layer).__name__} self-attention"
        return Report([check(layer, x, mask=mask, name=name) for check in CALL_CHECKS])
    memory = torch.randn(batch, cross_length, width, generator=gen)
    name = f"{type(layer).__name__} cross-attention"
    return Report([check(layer, x, memory, memory, mask=mask, name=name) for check in CALL_CHECKS])


# The checks of one attention call, each (layer, query, key, value, *, mask, name, q_offset, **kwargs) -> Verdict.
CALL_CHECKS: tuple[Callable[..., Verdict], ...] = (audit_call, audit_nonfinite_call)


# --- whole models ------------------------------------------------------------------------------------
def _captured_calls(model: nn.Module, names: Iterable[str],
                    forward: Callable[[], Tensor]) -> list[tuple[str, nn.Module, tuple, dict]]:
    calls: list[tuple[str, nn.Module, tuple, dict]] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, kwargs, name=name: calls.append((name, m, args, dict(kwargs))), with_kwargs=True)
        for name in names
    ]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return calls


@_with_autograd
def audit_model_layers(model: nn.Module, forward: Callable[[], Tensor]) -> list[Verdict]:
    """Audit every call of the model's declared attention modules made by ``forward()``, with the
    inputs and masks it received; cross-attention perturbs the keys and values, self-attention the queries."""
    sites = _declared(model).attention_sites()
    verdicts = []
    for name, module, args, kwargs in _captured_calls(model, sites, forward):
        query, key, value = ([*list(args), None, None, None])[:3]
        key, value = kwargs.pop("key", key), kwargs.pop("value", value)
        mask = kwargs.pop("mask", None)
        q_offset = kwargs.pop("q_offset", 0)
        if kwargs.get("cache") is not None or kwargs.get("kv") is not None:
            continue  # incremental decoding calls are covered by the cache-equivalence tests
        kwargs.pop("return_weights", None)
        cross = sites[name].kind == "cross"
        verdicts += [check(module, query, key if cross else None, value if cross else None, mask=mask,
                           q_offset=q_offset, name=f"{name} ({'cross' if cross else 'self'}-attention)", **kwargs)
                     for check in CALL_CHECKS]
    return verdicts


def audit_causal_logits(logits_of: Callable[[Tensor], Tensor], tokens: Tensor, *, vocab: int, name: str,
                        atol: float = 1e-5) -> Verdict:
    """Logits at step t must not change when later tokens change (bit-identical) or are absent (atol), nor when
    the tokens of another row of the batch change (bit-identical; a leak named with key -1).

    ``atol`` allows for floating-point differences between matrix products of different lengths;
    a leak of the future (its tokens or its length) moves logits far more than that.
    """
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        base = logits_of(tokens)
        length = tokens.shape[1]
        for t in range(length - 1):
            changed = tokens.clone()
            changed[:, t + 1:] = torch.randint(0, vocab, changed[:, t + 1:].shape, generator=gen)
            moved = (logits_of(changed)[:, : t + 1] != base[:, : t + 1]).any(-1)  # (B, t+1)
            if moved.any():
                b, q = moved.nonzero()[0].tolist()
                return Verdict(name, False, 0, [(b, q, t + 1)], "changing later tokens changed earlier logits")
            prefix = logits_of(tokens[:, : t + 1])
            if not torch.allclose(prefix, base[:, : t + 1], atol=atol, rtol=0):
                worst = (prefix - base[:, : t + 1]).abs().amax(-1)  # (B, t+1)
                b, q = divmod(int(worst.argmax()), t + 1)
                return Verdict(name, False, 0, [(b, q, t + 1)], "the length of the future changed earlier logits")
        everywhere = torch.ones_like(tokens, dtype=torch.bool)  # nor on the tokens of another row
        leak = _other_rows_leak(tokens, everywhere, lambda x: (logits_of(x) != base).any(-1), vocab, gen)
        if leak is not None:
            return Verdict(name, False, 0, [(*leak, -1)], "changing another row's tokens changed this row's logits")
    return Verdict(name, True, length * (length - 1) // 2 * tokens.shape[0])


def audit_reach(logits_of: Callable[[Tensor], Tensor], tokens: Tensor, *, reach: int, vocab: int,
                name: str) -> Verdict:
    """Logits at step t must not change (bit-identical) when the tokens before t - ``reach`` change: a decoder of
    sliding windows W over N layers reaches ``N * (W - 1)`` positions back, and no further."""
    gen = torch.Generator().manual_seed(7)
    length = tokens.shape[1]
    with torch.no_grad():
        base = logits_of(tokens)
        for start in range(1, length - reach):  # tokens [0, start) redrawn: logits from start + reach on are blind
            moved = (logits_of(_redrawn(tokens, torch.arange(length) < start, vocab, gen))[:, start + reach:]
                     != base[:, start + reach:]).any(-1)  # (B, L - start - reach)
            if moved.any():
                b, q = moved.nonzero()[0].tolist()
                return Verdict(name, False, 0, [(b, start + reach + q, start - 1)],
                               f"changing tokens more than {reach} position(s) back changed logits")
    beyond = max(0, length - reach - 1)
    return Verdict(name, True, beyond * (beyond + 1) // 2 * tokens.shape[0])


def audit_padding(outputs_of: Callable[[Tensor], Tensor], tokens: Tensor, lengths: Tensor, *, vocab: int,
                  name: str, aligned: bool = True) -> Verdict:
    """Outputs must be bit-identical whatever the padding tokens are: at the real positions of ``tokens`` when
    the output is ``aligned`` with them (an encoder's (B, L, ...) states), else at every output position (a
    decoder's target logits, or one pooled (B, C) output per row); nor may a row's outputs change when the real
    tokens of another row do (a leak named with key -1)."""
    gen = torch.Generator().manual_seed(4)
    pad = torch.arange(tokens.shape[1])[None] >= lengths[:, None]  # (B, L)
    with torch.no_grad():
        base = outputs_of(tokens)
        # (B, C) pooled outputs: one per row; (B, L) aligned ones (e.g. span logits): one per position
        per_row = base.dim() == 2 and not (aligned and base.shape[1] == tokens.shape[1])
        checked = torch.ones(base.shape[0], 1 if per_row else base.shape[1], dtype=torch.bool)  # (B, Lout)
        if aligned and not per_row:
            checked = ~pad[:, : base.shape[1]]

        def moved_by(changed: Tensor) -> Tensor:  # (B, Lout): the checked output positions that changed
            moved = (outputs_of(changed) != base).reshape(base.shape[0], 1 if per_row else base.shape[1], -1)
            return moved.any(-1) & checked
        moved = moved_by(torch.where(pad, torch.randint(0, vocab, tokens.shape, generator=gen), tokens))
        if moved.any():
            b, q = moved.nonzero()[0].tolist()
            k = int(pad[b].nonzero()[0]) if pad[b].any() else -1  # -1: a row without padding moved (across the batch)
            return Verdict(name, False, 0, [(b, q, k)], "changing padding tokens changed a real position")
        leak = _other_rows_leak(tokens, ~pad, moved_by, vocab, gen)  # nor on the real tokens of another row
        if leak is not None:
            return Verdict(name, False, 0, [(*leak, -1)],
                           "changing another row's real tokens changed this row's outputs")
    return Verdict(name, True, int((checked.sum(1) * pad.sum(1)).sum()))  # (output position, padded input) pairs


@_with_autograd
@_in_eval_mode
def audit_model(model: nn.Module, *, length: int = 10, batch: int = 2, seed: int = 0) -> Report:
    """Audit a model as it declares (:class:`maskattn.models.Inspectable`): draw the inputs of its
    ``audit_probe()`` and run its checks in order (every attention layer, plus end-to-end checks: decoders
    depend on no later token nor on their number, encoders on no padding)."""
    model = _declared(model)  # a model of another library: its registered adapter's view
    probe = model.audit_probe()
    shortest = length - max((spec.shorten for spec in probe.inputs if spec.kind == "tokens"), default=0)
    if shortest < 2:  # a single position hides nothing from itself: every check would pass with nothing checked
        raise ValueError(f"audit length={length}: the shortest input would hold {shortest} token(s); "
                         f"use length >= {length - shortest + 2}")
    if batch < 2 and any(c.kind in ("padding", "image_padding") for c in probe.checks):
        raise ValueError(f"audit batch={batch}: the padding checks need rows of different lengths; use batch >= 2")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    inputs = {spec.name: _draw(spec, batch, length, gen) for spec in probe.inputs}
    verdicts: list[Verdict] = []
    for check in probe.checks:
        verdicts += CHECKS[check.kind](model, check, inputs, probe)
    return Report(verdicts)


def _declared(model: nn.Module) -> Inspectable:
    view = inspectable(model)
    if view is None:
        raise TypeError(f"audit_model takes a maskattn model, got {type(model).__name__}; use audit_layer")
    return view


def _draw(spec: ProbeInput, batch: int, length: int, gen: torch.Generator) -> Tensor:
    """The tensor a :class:`ProbeInput` describes: (B, L) / (B,) for tokens, images by their grid."""
    (rows, cols), p = spec.grid, spec.patch_size
    if spec.kind == "images":
        channels = (spec.channels,) if spec.channels > 1 else ()
        return torch.randn((batch, *channels, rows * p, cols * p), generator=gen)
    if spec.kind == "image_sizes":
        lower = rows - 1 if rows > 1 else rows
        return torch.tensor([[rows, cols]] + [[lower, max(1, cols - b - 1)] for b in range(1, batch)]) * p
    if spec.kind == "tokens":
        low = 4 if spec.vocab_size > 8 else 0  # keep clear of special ids
        return torch.randint(low, spec.vocab_size, (batch, length - spec.shorten), generator=gen)
    if spec.kind == "lengths":
        return torch.tensor([length] + [max(1, length - 3 - i) for i in range(batch - 1)])
    return (torch.arange(length) >= length // 2).long().expand(batch, length)  # documents


def _check_layers(model: nn.Module, check: ProbeCheck, inputs: dict[str, Tensor], probe: AuditProbe) -> list[Verdict]:
    return audit_model_layers(model, lambda: model(**{n: inputs[n] for n in check.uses}))


def _varying(model: nn.Module, check: ProbeCheck, inputs: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """The model's output as a function of input ``check.varies``, the other inputs held fixed."""
    return lambda x: model(**{n: x if n == check.varies else inputs[n] for n in check.uses})


def _vocab(probe: AuditProbe, name: str) -> int:
    return next(spec.vocab_size for spec in probe.inputs if spec.name == name)


def _check_causal(model: nn.Module, check: ProbeCheck, inputs: dict[str, Tensor], probe: AuditProbe) -> list[Verdict]:
    return [audit_causal_logits(_varying(model, check, inputs), inputs[check.varies],
                                vocab=_vocab(probe, check.varies), name=check.name)]


def _check_window(model: nn.Module, check: ProbeCheck, inputs: dict[str, Tensor], probe: AuditProbe) -> list[Verdict]:
    return [audit_reach(_varying(model, check, inputs), inputs[check.varies], reach=check.reach,
                        vocab=_vocab(probe, check.varies), name=check.name)]


def _check_padding(model: nn.Module, check: ProbeCheck, inputs: dict[str, Tensor], probe: AuditProbe) -> list[Verdict]:
    return [audit_padding(_varying(model, check, inputs), inputs[check.varies], inputs[check.lengths],
                          vocab=_vocab(probe, check.varies), name=check.name, aligned=check.aligned)]


def audit_image_padding(outputs_of: Callable[[Tensor], Tensor], images: Tensor, sizes: Tensor, *, patch_size: int,
                        name: str) -> Verdict:
    """Every output must be bit-identical whatever the pixels outside each image's real (height, width) are."""
    gen = torch.Generator().manual_seed(6)
    height, width = images.shape[-2:]
    outside = ((torch.arange(height)[None, :, None] >= sizes[:, :1, None])
               | (torch.arange(width)[None, None, :] >= sizes[:, 1:, None]))  # (B, Hc, Wc)
    if images.dim() == 4:
        outside = outside[:, None]  # (B, 1, Hc, Wc): every channel
    with torch.no_grad():
        base = outputs_of(images)
        moved = (outputs_of(torch.where(outside, torch.randn(images.shape, generator=gen), images)) != base)
        moved = moved.reshape(*moved.shape[:2], -1).any(-1)  # (B, Lq): (B, Lq, ...) or (B, C) outputs
    # hidden patches, in the row-major order of the patch grid
    hidden = outside.reshape(images.shape[0], -1, height // patch_size, patch_size, width // patch_size, patch_size)
    hidden = hidden.all(1).all(2).all(-1).flatten(1)  # (B, N)
    if moved.any():
        b, q = moved.nonzero()[0].tolist()
        k = int(hidden[b].nonzero()[0]) if hidden[b].any() else -1  # -1: the row has no hidden patch
        return Verdict(name, False, 0, [(b, q, k)], "changing pixels outside an image changed an output")
    return Verdict(name, True, int(hidden.sum()) * base.shape[1])


def audit_documents(outputs_of: Callable[[Tensor], Tensor], tokens: Tensor, documents: Tensor, *, vocab: int,
                    name: str, max_leaks: int = 10) -> Verdict:
    """No output position may depend on a token of another packed document (bit-identical outputs).

    For each document, the tokens of every other document are redrawn; each position of the document
    whose output moved is then tested against one foreign position at a time, to name the (batch,
    query, key) triples.
    """
    gen = torch.Generator().manual_seed(5)
    foreign_pairs = int((documents[:, :, None] != documents[:, None, :]).sum())
    leaks: list[tuple[int, int, int]] = []
    with torch.no_grad():
        base = outputs_of(tokens)
        for doc in documents.unique().tolist():
            mine = documents == doc  # (B, L)
            moved = outputs_of(_redrawn(tokens, ~mine, vocab, gen)) != base  # (B, L, ...) or (B, L)
            moved = moved.reshape(*moved.shape[:2], -1).any(-1) & mine  # (B, L)
            for b, q in moved.nonzero().tolist():
                for k in (~mine[b]).nonzero().flatten().tolist():
                    spot = torch.zeros_like(mine)
                    spot[b, k] = True
                    if (outputs_of(_redrawn(tokens, spot, vocab, gen))[b, q] != base[b, q]).any():
                        leaks.append((b, q, k))
                    if len(leaks) >= max_leaks:
                        return Verdict(name, False, foreign_pairs, leaks, "changing another document changed an output")
    if leaks:
        return Verdict(name, False, foreign_pairs, leaks, "changing another document changed an output")
    return Verdict(name, True, foreign_pairs)


def _other_rows_leak(tokens: Tensor, movable: Tensor, moved_of: Callable[[Tensor], Tensor], vocab: int,
                     gen: torch.Generator) -> tuple[int, int] | None:
    """For each row b, the ``movable`` (B, L) tokens of the other rows redrawn: the first (b, output position) of row
    b that ``moved_of`` (changed tokens -> (B, Lout) bool) says moved, or None. One row has no other row to change."""
    for b in range(tokens.shape[0]) if tokens.shape[0] > 1 else ():
        others = movable.clone()
        others[b] = False
        moved = moved_of(_redrawn(tokens, others, vocab, gen))[b]  # (Lout,)
        if moved.any():
            return b, int(moved.nonzero()[0])
    return None


def _redrawn(tokens: Tensor, where: Tensor, vocab: int, gen: torch.Generator) -> Tensor:
    """``tokens`` with the positions ``where`` (B, L) drawn anew, each different from before."""
    shift = torch.randint(1, max(2, vocab), tokens.shape, generator=gen)
    return torch.where(where, (tokens + shift) % vocab, tokens)


def _check_documents(model: nn.Module, check: ProbeCheck, inputs: dict[str, Tensor],
                     probe: AuditProbe) -> list[Verdict]:
    return [audit_documents(_varying(model, check, inputs), inputs[check.varies], inputs[check.documents],
                            vocab=_vocab(probe, check.varies), name=check.name)]


def _check_image_padding(model: nn.Module, check: ProbeCheck, inputs: dict[str, Tensor],
                         probe: AuditProbe) -> list[Verdict]:
    spec = next(spec for spec in probe.inputs if spec.name == check.varies)
    return [audit_image_padding(_varying(model, check, inputs), inputs[check.varies], inputs[check.lengths],
                                patch_size=spec.patch_size, name=check.name)]


# One audit per kind of ProbeCheck (maskattn.models.inspection.PROBE_CHECKS).
CHECKS: dict[str, Callable[[nn.Module, ProbeCheck, dict[str, Tensor], AuditProbe], list[Verdict]]] = {
    "layers": _check_layers, "causal": _check_causal, "window": _check_window, "padding": _check_padding,
    "documents": _check_documents, "image_padding": _check_image_padding,
}


def audit(target: nn.Module, mask: Mask | Tensor | None = None, **kwargs) -> Report:
    """Audit a model (its standard masks) or an attention layer (under ``mask``); see the module docstring.

    ``maskattn.audit(model)`` or ``maskattn.audit(layer, masks.causal())``; ``report.ok`` is the verdict
    and ``print(report)`` names the first offending (batch, query, key) triples.
    """
    if inspectable(target) is not None:
        if mask is not None:
            raise ValueError("models build their own masks; pass mask only when auditing a layer")
        return audit_model(target, **kwargs)
    return audit_layer(target, mask, **kwargs)
