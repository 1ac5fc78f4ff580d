"""Generation from :class:`~maskattn.models.Transformer` and :class:`~maskattn.models.DecoderLM`:
greedy search, beam search and sampling (temperature, top-k, top-p), batched, with a KV cache.

A model takes part through two methods: ``begin_decoding(inputs, lengths, max_new_tokens=)`` returns
a :class:`~maskattn.models.DecodeState` and the (B, V) logits of the first new token (a Transformer
encodes its source and feeds BOS; a DecoderLM runs its right-padded prompts), and
``step(state, tokens)`` feeds (B, 1) tokens and returns (B, 1, V) logits. Rows of a batch may have
different lengths.

Every function returns the new tokens only, (B, T), with ``pad_id`` after a row's EOS.

Shape legend: B batch, K beams, V vocabulary, T new tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from maskattn.dispatch import check_generator

Lengths = Tensor | Sequence[int] | None
NO_EOS = -1  # eos_id=NO_EOS: rows never stop early, whatever the model's config says


MaxNew = int | Tensor | Sequence[int]


def greedy(model: nn.Module, inputs: Tensor, lengths: Lengths = None, *, max_new_tokens: MaxNew,
           eos_id: int | None = None, pad_id: int | None = None, compile: bool = False,
           min_new_tokens: int = 0) -> Tensor:
    """The most likely next token at every step.

    Args:
        model: a Transformer (``inputs`` = source ids) or a DecoderLM (``inputs`` = prompts).
        inputs: (B, L) right-padded token ids.
        lengths: (B,) real lengths; default from the model's ``pad_id``.
        max_new_tokens: at most this many new tokens per row: one int, or (B,) ints, one per row (a row's
            output is then what it would be alone, whatever the other rows' limits). A DecoderLM steps every
            row to the largest limit, so its longest prompt and its largest limit must fit its positions.
        eos_id: stops a row (default: ``model.config.eos_id``; a model without one, or ``NO_EOS``, never
            stops early).
        pad_id: fills a row after its EOS (default the model's pad id, else 0). The model's own pad id
            is never generated (the model reads it as padding, not as a token), nor an encoder-decoder's BOS
            (the ids its ``never_generated`` names).
        compile: run each one-token step as one ``torch.compile``'d graph (``fullgraph=True``) over a
            static KV cache, for a model whose ``begin_decoding`` takes ``static`` (DecoderLM). The first
            call compiles (seconds), a new batch size or prompt + limit once more with those sizes dynamic;
            later calls reuse the graphs whatever the sizes. Models of one class and config share the graphs;
            those of the ``COMPILED_KINDS`` kinds decoded last are kept.
        min_new_tokens: EOS cannot come before this many other new tokens (1: never an empty output); at most
            ``max_new_tokens`` when that is one int (a row whose own limit is lower stops at it).

    Returns:
        (B, T) new tokens, T <= max_new_tokens (its largest entry).
    """
    return _generate(model, inputs, lengths, max_new_tokens, eos_id, pad_id, lambda logits: logits.argmax(-1),
                     compile, min_new_tokens)


def sample(model: nn.Module, inputs: Tensor, lengths: Lengths = None, *, max_new_tokens: MaxNew,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_id: int | None = None, pad_id: int | None = None, generator: torch.Generator | None = None,
           compile: bool = False, min_new_tokens: int = 0) -> Tensor:
    """Draw each next token from softmax(logits / temperature), restricted by top-k and top-p.

    Args as in :func:`greedy`, and:
        temperature: > 0 and finite; below 1 sharpens, above 1 flattens the distribution (however small, it
            draws from the most likely tokens: the logits are shifted by their maximum before they are divided).
        top_k: keep the k most likely tokens.
        top_p: keep the smallest set of most likely tokens whose probability reaches p (nucleus).
        generator: random generator, for reproducible samples; a CPU generator with a model on a GPU draws on
            the CPU (the same tokens as on the CPU for the same probabilities).
    """
    if not _real(temperature) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a number > 0 and finite, got {temperature!r}")
    check_generator(generator)

    def choose(logits: Tensor) -> Tensor:
        logits = logits.float()
        scaled = (logits - logits.amax(-1, keepdim=True)) / temperature  # <= 0: no inf at a tiny temperature
        probs = torch.softmax(filter_logits(scaled, top_k=top_k, top_p=top_p), dim=-1)
        if generator is not None and generator.device.type != probs.device.type:
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return _generate(model, inputs, lengths, max_new_tokens, eos_id, pad_id, choose, compile, min_new_tokens)


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse generation settings that cannot mean what they say (temperature 0 is greedy; top-k and top-p
    are checked even then, so that a typo is not ignored), naming the argument."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not _real(temperature) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    _check_top(top_k, top_p)


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_top(top_k: int | None, top_p: float | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top k and outside the top-p nucleus: (B, V) -> (B, V)."""
    _check_top(top_k, top_p)
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1 or not logits.shape[-1]:
        got = f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"filter_logits: logits must be a floating-point tensor (..., V) with V >= 1, got {got}")
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # 1.0 keeps every token (the float cumsum would drop a tail)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # the most likely token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def beam_search(model: nn.Module, inputs: Tensor, lengths: Lengths = None, *, beam_size: int = 4,
                max_new_tokens: MaxNew, length_penalty: float = 0.0, eos_id: int | None = None,
                pad_id: int | None = None, min_new_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """The best continuation found by beam search, per row.

    A hypothesis ends at EOS or after ``max_new_tokens`` tokens. Hypotheses are ranked by
    ``log p(y) / lp(|y|)`` with Wu et al.'s (2016) ``lp(n) = ((5 + n) / 6) ** length_penalty``
    (0 = raw log-probability; larger values favour longer outputs). A row stops when it has
    ``beam_size`` finished hypotheses none of its live beams can beat.

    Args as in :func:`greedy`, and:
        beam_size: beams K kept per row.
        length_penalty: the exponent alpha of lp.
        min_new_tokens: no hypothesis ends before this many tokens besides EOS (fairseq's ``--min-len``;
            1 rules out the empty output, which short, uncertain sources can otherwise win).

    Returns:
        ``(tokens, scores)``: (B, T) best new tokens (EOS included, then ``pad_id``) and their (B,)
        length-normalised log-probabilities.
    """
    search, pad_id = _run_beams(model, inputs, lengths, beam_size, max_new_tokens, length_penalty, eos_id, pad_id,
                                min_new_tokens)
    return search.best(pad_id)


def beam_search_nbest(model: nn.Module, inputs: Tensor, lengths: Lengths = None, *, n: int, beam_size: int = 4,
                      max_new_tokens: MaxNew, length_penalty: float = 0.0, eos_id: int | None = None,
                      pad_id: int | None = None, min_new_tokens: int = 0) -> list[list[tuple[float, list[int]]]]:
    """The ``n`` best finished hypotheses of each row, best first, as ``(score, new tokens)`` pairs.

    The same search as :func:`beam_search` (whose result is the first entry of each row); ``n`` may be
    at most ``beam_size``, the number of finished hypotheses a row keeps.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= beam_size:
        raise ValueError(f"n must be an int in [1, beam_size={beam_size}], got {n!r}")
    search, _ = _run_beams(model, inputs, lengths, beam_size, max_new_tokens, length_penalty, eos_id, pad_id,
                           min_new_tokens)
    return [sorted(found, key=lambda x: -x[0])[:n] for found in search.finished]


def _run_beams(model: nn.Module, inputs: Tensor, lengths: Lengths, beam_size: int, max_new_tokens: MaxNew,
               length_penalty: float, eos_id: int | None, pad_id: int | None,
               min_new_tokens: int) -> tuple[_Beams, int]:
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    if not _real(length_penalty) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number (alpha; 0: none), got {length_penalty!r}")
    caps = _check_max_new(max_new_tokens, min_new_tokens, inputs)
    eos_id, pad_id = _ids(model, eos_id, pad_id)
    with _inference(model):
        state, logits = model.begin_decoding(inputs, lengths, max_new_tokens=max(caps))
        forbidden = _forbidden(_check_ids(model, eos_id, pad_id, logits.shape[-1]), eos_id, logits.device,
                               logits.shape[-1], min_new_tokens)
        search = _Beams(inputs.shape[0], beam_size, caps, length_penalty, eos_id)
        device = logits.device
        state.reorder(torch.arange(inputs.shape[0], device=device).repeat_interleave(beam_size))
        logits = logits.repeat_interleave(beam_size, dim=0)  # (B*K, V)
        for t in range(max(caps)):
            logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # f64 kept
            rows = search.advance(_forbid(logp, forbidden[t < min_new_tokens]), t)
            if search.all_done():
                break
            kept = search.drop_done()
            if kept is None:
                state.reorder(rows.to(device), same_memory=True)  # beams trade places within their row
            else:  # finished rows leave the batch: their beams are never computed again
                state.reorder(rows[kept].to(device))
            logits = model.step(state, search.last_tokens().to(device))[:, -1]
    return search, pad_id


class _Beams:
    """The bookkeeping of batched beam search: live beams as tensors, finished ones as lists.

    Only rows still searching are live: ``self.b`` of them, ``self.source[i]`` the input row of live row i;
    ``finished`` and ``done`` are indexed by input row.
    """

    def __init__(self, batch: int, beams: int, caps: list[int], alpha: float, eos_id: int | None) -> None:
        self.b, self.k, self.caps, self.alpha, self.eos_id = batch, beams, caps, alpha, eos_id
        self.source = list(range(batch))
        self.scores = torch.full((batch, beams), float("-inf"))
        self.scores[:, 0] = 0.0  # at first every beam is the same empty hypothesis: keep one
        self.seqs = torch.zeros(batch * beams, 0, dtype=torch.long)  # (B*K, t)
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    def lp(self, n: int) -> float:
        return ((5.0 + n) / 6.0) ** self.alpha

    def advance(self, logp: Tensor, t: int) -> Tensor:
        """Extend the live beams by one token from (B*K, V) log-probs; return the surviving rows (B*K,)."""
        v = logp.shape[-1]
        logp = logp.cpu()
        cand = (self.scores.unsqueeze(-1) + logp.view(self.b, self.k, v)).view(self.b, -1)  # (B, K*V)
        top, idx = cand.topk(min(2 * self.k, cand.shape[1]), dim=1)  # (B, 2K)
        beam, tok = idx // v, idx % v
        is_eos = (tok == self.eos_id) if self.eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
        # An EOS candidate finishes only among the K best (as in fairseq and transformers): one ranked below them
        # would not have survived as a beam, and with K = 1 beam search is then greedy search
        in_top = torch.arange(top.shape[1]) < self.k  # (2K,)
        self._finish(top, beam, tok, is_eos & in_top & top.isfinite(), t + 1)
        # The K best candidates that do not end at EOS live on.
        order = torch.where(is_eos, 2 * self.k + torch.arange(top.shape[1]), torch.arange(top.shape[1]))
        keep = order.argsort(dim=1)[:, : self.k]  # (B, K)
        self.scores = top.gather(1, keep)
        rows = (torch.arange(self.b)[:, None] * self.k + beam.gather(1, keep)).view(-1)  # (B*K,)
        self.seqs = torch.cat([self.seqs[rows], tok.gather(1, keep).view(-1, 1)], dim=1)
        capped = torch.tensor([t + 1 >= self.caps[src] for src in self.source])  # (B,) rows out of length
        if bool(capped.any()):  # their live beams finish as they are
            self._finish(self.scores, torch.arange(self.k).expand(self.b, -1), None,
                         self.scores.isfinite() & capped[:, None], t + 1)
        self._update_done(t + 1, capped.tolist())
        return rows

    def drop_done(self) -> Tensor | None:
        """Remove the rows that are done from the live beams; return the (B'*K,) positions of the beams
        kept, or None when every live row goes on."""
        live = [i for i, src in enumerate(self.source) if not self.done[src]]
        if len(live) == self.b:
            return None
        keep = torch.tensor(live, dtype=torch.long)
        self.source = [self.source[i] for i in live]
        self.b = len(live)
        self.scores = self.scores[keep]
        kept = (keep[:, None] * self.k + torch.arange(self.k)).view(-1)  # (B'*K,)
        self.seqs = self.seqs[kept]
        return kept

    def _finish(self, scores: Tensor, beam: Tensor, tok: Tensor | None, which: Tensor, n: int) -> None:
        for b, j in which.nonzero().tolist():
            src = self.source[b]
            if self.done[src]:
                continue
            seq = self.seqs[b * self.k + int(beam[b, j])].tolist() + ([int(tok[b, j])] if tok is not None else [])
            self.finished[src].append((float(scores[b, j]) / self.lp(n), seq))
            self.finished[src] = sorted(self.finished[src], key=lambda x: -x[0])[: self.k]

    def _update_done(self, n: int, capped: list[bool]) -> None:
        for b, src in enumerate(self.source):
            if capped[b]:
                self.done[src] = True
            if self.done[src] or len(self.finished[src]) < self.k:
                continue
            # Live scores only fall; with alpha > 0 dividing by the longest lp is their best case.
            best_live = float(self.scores[b].max()) / self.lp(self.caps[src] if self.alpha > 0 else n)
            self.done[src] = self.finished[src][-1][0] >= best_live

    def all_done(self) -> bool:
        return all(self.done)

    def last_tokens(self) -> Tensor:
        return self.seqs[:, -1:]  # (B*K, 1)

    def best(self, pad_id: int) -> tuple[Tensor, Tensor]:
        best = [max(f, key=lambda x: x[0]) for f in self.finished]
        width = max(len(seq) for _, seq in best)
        tokens = torch.full((len(best), width), pad_id, dtype=torch.long)
        for b, (_, seq) in enumerate(best):
            tokens[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return tokens, torch.tensor([score for score, _ in best], dtype=self.scores.dtype)  # float64 for float64


def _generate(model: nn.Module, inputs: Tensor, lengths: Lengths, max_new: MaxNew, eos_id: int | None,
              pad_id: int | None, choose: Callable[[Tensor], Tensor], compile: bool = False,
              min_new: int = 0) -> Tensor:
    caps = _check_max_new(max_new, min_new, inputs)
    eos_id, pad_id = _ids(model, eos_id, pad_id)
    if compile and "static" not in inspect.signature(model.begin_decoding).parameters:
        raise ValueError(f"compile=True needs a model whose begin_decoding takes static= (DecoderLM), "
                         f"got {type(model).__name__}")
    options, step = ({"static": True}, _compiled_step(model)) if compile else ({}, _last_logits)
    out = []
    with _inference(model):
        state, logits = model.begin_decoding(inputs, lengths, max_new_tokens=max(caps), **options)  # (B, V)
        forbidden = _forbidden(_check_ids(model, eos_id, pad_id, logits.shape[-1]), eos_id, logits.device,
                               logits.shape[-1], min_new)
        last = torch.tensor(caps, device=logits.device) - 1  # (B,) each row's last step
        done = torch.zeros(inputs.shape[0], dtype=torch.bool, device=logits.device)
        for t in range(max(caps)):
            tokens = choose(_forbid(logits, forbidden[t < min_new])).masked_fill(done, pad_id)  # (B,)
            out.append(tokens)
            done = done | (last == t)
            if eos_id is not None:
                done = done | (tokens == eos_id)
            # Before min_new tokens (or without an EOS) only the limits end rows, and every row's by the last step:
            # known on the host, so the device is read (a wait on a GPU) only where an EOS may end the search.
            if t == max(caps) - 1 or (eos_id is not None and t >= min_new and bool(done.all())):
                break
            logits = step(model, state, tokens[:, None])
    return torch.stack(out, dim=1)  # (B, T)


def _last_logits(model: nn.Module, state: object, tokens: Tensor) -> Tensor:
    """One decoding step: (B, 1) tokens -> (B, V) logits."""
    return model.step(state, tokens)[:, -1]


COMPILED_KINDS = 8  # compiled decoding steps kept, one per model class and config (each holds its graphs)
_COMPILED: OrderedDict[str, Callable[[nn.Module, object, Tensor], Tensor]] = OrderedDict()  # oldest first


def _compiled_step(model: nn.Module) -> Callable[[nn.Module, object, Tensor], Tensor]:
    """:func:`_last_logits` compiled for the models of ``model``'s class and config: a graph at the first shapes,
    then one whose batch and cache capacity are dynamic (reused whatever the lengths)."""
    # dynamo keeps graphs per code object and fails past its recompile limit (8) under fullgraph: one copy for
    # every model failed at the ninth depth in a process and held every graph for good. Each kind of model gets
    # its own copy of the code; the oldest is dropped past COMPILED_KINDS, its graphs with it.
    kind = f"{type(model).__module__}.{type(model).__qualname__}({getattr(model, 'config', None)!r})"
    # (the step is held here, never read back from the table: another thread may drop it from there meanwhile)
    step = _COMPILED.get(kind)
    if step is None:
        code = _last_logits.__code__.replace()  # a new code object: a cache and a recompile count of its own
        copy = types.FunctionType(code, _last_logits.__globals__, _last_logits.__name__)
        step = _COMPILED[kind] = _compile_step(copy)
        while len(_COMPILED) > COMPILED_KINDS:
            _COMPILED.popitem(last=False)
    else:
        with contextlib.suppress(KeyError):
            _COMPILED.move_to_end(kind)
    return step


def _compile_step(step: Callable[[nn.Module, object, Tensor], Tensor]) -> Callable[[nn.Module, object, Tensor], Tensor]:
    # The static caches are module buffers, whose shapes dynamo holds fixed by default: every new batch or
    # prompt + limit compiled a graph anew, and the ninth hit the recompile limit (an error under fullgraph).
    # (Only the settings this torch has: an older one, without them, keeps a graph per shape.)
    settings = ("force_nn_module_property_static_shapes", "force_parameter_static_shapes")
    dynamic_buffers = torch._dynamo.config.patch({name: False for name in settings
                                                  if hasattr(torch._dynamo.config, name)})
    return dynamic_buffers(torch.compile(step, fullgraph=True))


def _check_ids(model: nn.Module, eos_id: int | None, pad_id: int, vocab: int) -> list[int]:
    """Refuse ids outside the (V,) vocabulary; return the ids no step may choose: those the model's
    ``never_generated`` names (default its pad id; a Transformer's BOS too), but the EOS."""
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab):
            raise ValueError(f"{name} must be a token id in [0, {vocab}) (the model's vocabulary), got {value!r}")
    config = getattr(model, "config", None)
    ids = [getattr(config, name, None) for name in getattr(model, "never_generated", ("pad_id",))]
    return sorted({i for i in ids if isinstance(i, int) and i != eos_id and 0 <= i < vocab})


def _ids(model: nn.Module, eos_id: int | None, pad_id: int | None) -> tuple[int | None, int]:
    config = getattr(model, "config", None)
    if eos_id == NO_EOS:
        return None, _ids(model, None, pad_id)[1]
    eos_id = eos_id if eos_id is not None else getattr(config, "eos_id", None)
    pad_id = pad_id if pad_id is not None else getattr(config, "pad_id", None)
    return eos_id, pad_id if pad_id is not None else 0


def _check_max_new(max_new: MaxNew, min_new: int, inputs: Tensor) -> list[int]:
    """The (B,) per-row limits of ``max_new`` (one int for every row, or one per row), checked with
    ``min_new`` and the (B, L) ``inputs``."""
    if not isinstance(inputs, Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a batch of B >= 1 rows, (B, L) token ids or (B, ...) images, got {got}")
    batch = inputs.shape[0]
    if isinstance(max_new, Tensor):
        max_new = max_new.tolist() if max_new.dim() == 1 and not max_new.is_floating_point() else max_new
    if isinstance(max_new, int) and not isinstance(max_new, bool):
        caps = [max_new] * batch
    elif isinstance(max_new, Sequence) and len(max_new) == batch:
        caps = list(max_new)
    else:
        caps = []
    if not caps or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in caps):
        raise ValueError(f"max_new_tokens must be a positive int, or {batch} of them (one per row of inputs), "
                         f"got {max_new!r}")
    if isinstance(min_new, bool) or not isinstance(min_new, int) or min_new < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new!r}")
    if isinstance(max_new, int) and min_new > max_new:  # per-row limits: a short row's limit may come first
        raise ValueError(f"min_new_tokens ({min_new}) must be <= max_new_tokens ({max_new}): no row could end at EOS")
    return caps


def _forbidden(banned: list[int], eos_id: int | None, device: torch.device, vocab: int,
               min_new: int) -> tuple[Tensor | None, Tensor | None]:
    """The ids no step may choose, as index tensors built once per search: ``banned`` (the model's pad id, its
    BOS) at every step, and with EOS too while fewer than ``min_new_tokens`` tokens are out (index True).

    Raises:
        ValueError: when they are the whole (V,) vocabulary at some step (no token could be chosen).
    """
    early = banned + ([eos_id] if eos_id is not None else [])
    for ids, when, eos in ((banned, "at any step", ""), (early, f"before min_new_tokens ({min_new}) tokens",
                                                         f" and eos_id {eos_id}")):
        if len(ids) >= vocab and (ids is banned or min_new > 0):
            raise ValueError(f"no token may be chosen {when}: the model's vocabulary ({vocab}) holds only ids decoding "
                             f"never generates ({banned}){eos}")
    return tuple(torch.tensor(ids, device=device) if ids else None for ids in (banned, early))  # type: ignore


def _forbid(scores: Tensor, ids: Tensor | None) -> Tensor:
    """(N, V) scores with the ``ids`` set to -inf. The other tokens' scores stay as they are (log-probabilities
    are not renormalised), so a hypothesis keeps its model score, as in fairseq."""
    return scores if ids is None else scores.index_fill(-1, ids, float("-inf"))


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) and no autograd, restoring the model's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
