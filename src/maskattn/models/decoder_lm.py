"""Decoder-only causal language model (GPT-style).

Shape legend: B batch, L sequence length, E d_model, V vocabulary.

Packed training rows pass ``doc_ids``: attention is then causal within each document only
(``causal() & document(doc_ids)``) and positions restart at 0 in every document, so a packed row
computes exactly what its documents would compute one by one.

A model with ``config.sliding_window = W`` attends to the last W positions only
(``causal() & sliding_window(W)``, in training, packed rows and decoding alike); decoding then keeps a
:class:`~maskattn.layers.SlidingWindowKVCache` of about W slots per layer instead of the whole history.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskattn import masks
from maskattn.layers import EncoderLayer, SlidingWindowKVCache, TokenEmbedding
from maskattn.layers.vocab_loss import linear_cross_entropy
from maskattn.models.common import (
    DecodeState,
    Embedder,
    Stack,
    advance,
    copy_head,
    default_positions,
    document_positions,
    fast_head,
    head_copy_pays,
    init_linears,
    kept_mask,
    key_valid,
    new_state,
    step_logits,
)
from maskattn.models.config import DecoderLMConfig
from maskattn.models.inspection import AttentionSite, AuditProbe, ProbeCheck, ProbeInput, layer_sites
from maskattn.models.persistence import Persistent
from maskattn.models.summary import Summary


class DecoderLM(Persistent, Summary, nn.Module):
    """GPT-style language model. ``forward(input_ids)`` gives next-token logits (B, L, V)."""

    config_class = DecoderLMConfig

    def __init__(self, config: DecoderLMConfig) -> None:
        super().__init__()
        self.config = c = self.checked_config(config)
        tokens = TokenEmbedding(c.vocab_size, c.d_model, scale=c.scale_embeddings)
        self.embed = Embedder(c, tokens)
        self.decoder = Stack([EncoderLayer(**c.layer_kwargs()) for _ in range(c.num_layers)], c.d_model,
                             final_norm=c.use_final_norm, eps=c.norm_eps, norm=c.norm)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_linears(self, std=0.02)
        for layer in self.decoder.layers:  # GPT-2: projections into the residual stream scaled by depth
            for proj in (layer.self_attn.out_proj, layer.ffn.down):
                nn.init.normal_(proj.weight, std=0.02 / (2 * c.num_layers) ** 0.5)
        if c.tie_output:
            self.lm_head.weight = tokens.weight

    def forward(self, input_ids: Tensor, *, lengths: Tensor | Sequence[int] | None = None,
                doc_ids: Tensor | None = None, return_weights: bool = False,
                targets: Tensor | None = None) -> Tensor | tuple[Tensor, list[dict[str, Tensor]]]:
        """Next-token logits, or with ``targets`` the summed loss (:meth:`loss`).

        Args:
            input_ids: (B, L) token ids, right-padded.
            lengths: (B,) real lengths; default: tokens that are not ``pad_id`` (all, if it is None).
            doc_ids: (B, L) document id of every token of packed rows.
            return_weights: also return every layer's ``{"self": (B, H, L, L)}`` attention weights.
            targets: (B, L) next tokens (-100: none): return ``self.loss(..., reduction="sum")`` instead of
                logits (nanoGPT's ``forward(idx, targets)``; through ``forward`` so that
                DistributedDataParallel sees the call).

        Returns:
            (B, L, V) logits, or the summed loss (a scalar) with ``targets``.
        """
        if targets is not None:
            if return_weights:
                raise ValueError("return_weights=True gives logits and weights; it cannot be combined with targets")
            return self.loss(input_ids, targets, lengths=lengths, doc_ids=doc_ids)
        out = self.features(input_ids, lengths=lengths, doc_ids=doc_ids, return_weights=return_weights)
        return (self.lm_head(out[0]), out[1]) if return_weights else self.lm_head(out)  # (B, L, V)

    def features(self, input_ids: Tensor, *, lengths: Tensor | Sequence[int] | None = None,
                 doc_ids: Tensor | None = None,
                 return_weights: bool = False) -> Tensor | tuple[Tensor, list[dict[str, Tensor]]]:
        """The last layer's (B, L, E) states, before the output projection (arguments as :meth:`forward`)."""
        valid = key_valid(input_ids, lengths, self.config.pad_id, "input_ids")
        mask = self._causal()
        positions = default_positions(input_ids)
        if valid is not None:
            mask = mask & masks.padding(valid)
        if doc_ids is not None:
            if not isinstance(doc_ids, Tensor) or doc_ids.shape != input_ids.shape:
                got = tuple(doc_ids.shape) if isinstance(doc_ids, Tensor) else type(doc_ids).__name__
                raise ValueError(f"doc_ids must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
            mask = mask & masks.document(doc_ids)
            positions = document_positions(doc_ids)
        x, rope = self.embed(input_ids, positions, positions_below=input_ids.shape[1])  # (B, L, E)
        return self.decoder(x, mask=mask, rope=rope, return_weights=return_weights)

    def loss(self, input_ids: Tensor, targets: Tensor, *, lengths: Tensor | Sequence[int] | None = None,
             doc_ids: Tensor | None = None, reduction: str = "sum") -> Tensor:
        """Cross-entropy of the next-token predictions at every position against ``targets``.

        Equals ``F.cross_entropy(self(input_ids, ...).flatten(0, 1).float(), targets.flatten(),
        reduction=reduction)`` but, beyond one chunk of rows, never holds the whole (B, L, V) logits:
        :func:`maskattn.layers.vocab_loss.linear_cross_entropy` projects a chunk of rows at a time with
        ``lm_head.weight`` (less memory, and fewer passes over the logits, at a large vocabulary; forward
        hooks and pre-hooks on ``lm_head`` do not run). An output projection that is not a plain bias-free
        ``nn.Linear`` (int8) takes the plain path.

        Args:
            input_ids, lengths, doc_ids: as :meth:`forward`.
            targets: (B, L) int64 next tokens (usually ``input_ids`` shifted left); -100 where there is
                nothing to predict.
            reduction: ``"sum"`` or ``"mean"`` over the positions with a target.
        """
        if not isinstance(targets, Tensor) or targets.shape != input_ids.shape:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        if targets.dtype != torch.int64:
            raise ValueError(f"targets must be int64 token ids, got dtype {targets.dtype}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        vocab = self.config.vocab_size
        # one host read a step (eager only); the message's range is computed only when it is raised
        if not torch.compiler.is_compiling() and bool(((targets >= vocab) | ((targets < 0) & (targets != -100))).any()):
            kept = targets[targets != -100]
            raise ValueError(f"targets must be in [0, {vocab}) or -100 (no target), got values in "
                             f"[{int(kept.min())}, {int(kept.max())}]")
        hidden = self.features(input_ids, lengths=lengths, doc_ids=doc_ids)  # (B, L, E)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets, reduction=reduction)
        logits = self.lm_head(hidden).flatten(0, 1).float()  # (B * L, V)
        return F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction=reduction)

    # --- inspection -------------------------------------------------------------------------------
    def attention_sites(self) -> dict[str, AttentionSite]:
        """Causal self-attention in every layer."""
        return layer_sites("decoder.layers", len(self.decoder.layers), self_attn="self-causal")

    def audit_probe(self) -> AuditProbe:
        """Every attention call (plain and packed rows); no logit depends on a later token, nor on a token of
        another packed document, nor (sliding windows) on a token beyond its receptive field."""
        tokens, packed = ("input_ids",), ("input_ids", "doc_ids")
        w = self.config.sliding_window
        reach = None if w is None else len(self.decoder.layers) * (w - 1)  # the receptive field of N windows
        window = () if reach is None else (ProbeCheck("window", tokens, "DecoderLM logits vs tokens outside the "
                                                      "sliding window", varies="input_ids", reach=reach),)
        return AuditProbe(
            inputs=(ProbeInput("input_ids", "tokens", self.config.vocab_size), ProbeInput("doc_ids", "documents")),
            checks=(ProbeCheck("layers", tokens),
                    ProbeCheck("causal", tokens, "DecoderLM logits vs later tokens", varies="input_ids"),
                    *window,
                    ProbeCheck("layers", packed),
                    ProbeCheck("documents", packed, "DecoderLM logits vs other packed documents", varies="input_ids",
                               documents="doc_ids")))

    # --- incremental decoding ---------------------------------------------------------------------
    def _causal(self) -> masks.Mask:
        w = self.config.sliding_window
        return masks.causal() if w is None else masks.causal() & masks.sliding_window(w)

    def start(self, batch: int, *, max_len: int, window_slots: int | None = None,
              static: bool = False) -> DecodeState:
        """Empty caches for ``batch`` rows of up to ``max_len`` tokens.

        Args:
            window_slots: keep only this many slots per cache (a sliding-window model needs at least
                its window plus the longest padding run of the prompts); None = every slot.
            static: one-token steps with fixed shapes (see :meth:`begin_decoding`); needs every slot.
        """
        w = self.config.sliding_window
        if window_slots is not None and (w is None or window_slots < w):
            raise ValueError(f"window_slots ({window_slots}) needs a sliding-window model with a window <= it, "
                             f"got sliding_window={w}")
        if static and window_slots is not None:
            raise ValueError(f"static decoding keeps every slot: window_slots must be None, got {window_slots}")
        table = self.embed.tokens
        like = table.weight if table.weight.is_floating_point() else table.weight_scale  # an int8 table: its scales
        return new_state(self.decoder, batch, max_len, like, window=window_slots, static=static)

    def step(self, state: DecodeState, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Feed (B, L) new tokens (the first ``lengths[b]`` real); return their logits (B, L, V).

        On a ``static`` state (see :meth:`begin_decoding`), one-token steps keep fixed shapes.
        """
        return step_logits(state, self.lm_head, self._hidden(state, tokens, lengths))  # (B, L, V)

    def _hidden(self, state: DecodeState, tokens: Tensor, lengths: Tensor | None) -> Tensor:
        """The last layer's (B, L, E) outputs of the new tokens, their keys and values cached."""
        if state.static and tokens.shape[1] == 1:
            return self._static_hidden(state, tokens)
        first = state.caches[0].first_key(tokens.shape[1])
        if first > 0 and state.gaps and isinstance(state.caches[0], SlidingWindowKVCache):
            self._check_window_slots(state, first)
        positions, offset = advance(state, tokens, lengths)
        end = offset + tokens.shape[1]
        x, rope = self.embed(tokens, positions, positions_below=end)  # a row's positions never outrun its slots
        if self.config.sliding_window is None or offset == 0:  # slots are positions: the training mask
            # Without padding in the cache the causal mask is all: no mask tensor, nothing hidden to guard.
            # The mask of every step (padding reads only the call's Lk columns of the slots): built once.
            if not state.gaps:
                mask = kept_mask(state, "causal", None, lambda _: self._causal())
            elif first == 0:
                mask = kept_mask(state, "causal & padding", state.key_valid,
                                 lambda valid: self._causal() & masks.padding(valid))
            else:
                mask = self._causal() & masks.padding(state.key_valid[:, first:end])
        else:  # right-padded prompts leave gaps: the window counts positions, not slots
            mask = window_mask(positions, state.key_pos[:, first:end], state.key_valid[:, first:end],
                               self.config.sliding_window, offset - first)
        return self.decoder(x, mask=mask, rope=rope, caches=state.caches, q_offset=offset - first)  # (B, L, E)

    def _check_window_slots(self, state: DecodeState, first: int) -> None:
        """A window cache shows a step only its slots from ``first`` on. Without padding those hold every key
        within the window; slots of padding (which positions skip) can push a real key within the window of
        this step's first query out of view: refuse rather than attend without it."""
        w = self.config.sliding_window
        gone = state.key_valid[:, :first] & (state.key_pos[:, :first] > (state.next_pos - w)[:, None])  # (B, first)
        if bool(gone.any()):
            rows = gone.any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"step: rows {rows} need keys that their window cache no longer holds (padding slots took "
                             f"the room of its {state.caches[0].max_len} slots for a window of {w} positions); decode "
                             "padded steps with begin_decoding(..., full_cache=True)")

    def _static_hidden(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """One token per row with fixed shapes: attend over all T slots of the static caches, the slots not
        written yet hidden by ``key_valid``. Reads no tensor value on the host (one graph for every step)."""
        if not torch.compiler.is_compiling() and state.length >= state.key_valid.shape[1]:
            raise ValueError(f"decoding past capacity: {state.length} slots used + 1 new > {state.key_valid.shape[1]}")
        slot = state.caches[0].pos.view(1)  # (1,) the slot of the new token in every row
        positions = state.next_pos[:, None].clone()  # (B, 1)
        state.key_valid.index_fill_(1, slot, True)
        state.key_pos.index_copy_(1, slot, positions)
        state.next_pos.add_(1)
        w = self.config.sliding_window
        mask = masks.padding(state.key_valid) if w is None else \
            window_mask(positions, state.key_pos, state.key_valid, w, 0)  # (B, T) keys
        x, rope = self.embed(tokens, positions, positions_below=state.key_valid.shape[1])  # (B, 1, E)
        return self.decoder(x, mask=mask, rope=rope, caches=state.caches)  # (B, 1, E)

    def begin_decoding(self, prompt: Tensor, lengths: Tensor | Sequence[int] | None = None, *,
                       max_new_tokens: int, full_cache: bool = False,
                       static: bool = False) -> tuple[DecodeState, Tensor]:
        """Run the (B, P) right-padded prompts; return the state and each row's next-token logits (B, V).

        A sliding-window model decodes with a :class:`~maskattn.layers.SlidingWindowKVCache` unless
        ``full_cache`` is True. With ``static``, the caches are full and one-token :meth:`step` calls attend
        over every slot with fixed shapes, reading no tensor on the host: what ``torch.compile`` needs to
        trace one graph for the whole generation (``maskattn.decoding.greedy(..., compile=True)``).
        """
        if prompt.dim() == 2 and prompt.shape[1] == 0:
            raise ValueError(f"prompt: {tuple(prompt.shape)}, no tokens; every prompt needs at least one token")
        if isinstance(lengths, Tensor) and lengths.dim() == 1 and lengths.numel() and not lengths.is_floating_point() \
                and lengths.dtype != torch.bool:
            lengths = lengths.tolist()  # the one read of given lengths: the checks and sizes below are the host's
        valid = key_valid(prompt, lengths, self.config.pad_id, "prompt")
        if valid is None:
            counts = None
        elif isinstance(lengths, (list, tuple)):  # right padding by construction
            counts = list(lengths)
        else:  # from pad_id (or lengths of another kind): each row's count and whether it is right-padded, one read
            count = valid.sum(dim=1)  # (B,)
            right = torch.arange(prompt.shape[1], device=prompt.device) < count[:, None]  # (B, P)
            counts, wrong = torch.stack([count, (valid != right).any(dim=1).long()]).tolist()
            if not torch.compiler.is_compiling() and 0 not in counts and any(wrong):
                raise ValueError(f"prompt: padding (pad_id={self.config.pad_id}) must be on the right, after each "
                                 "row's tokens; a row has it before or between its tokens (left padding is not "
                                 "supported)")
        if counts is not None and not torch.compiler.is_compiling() and 0 in counts:
            raise ValueError(f"prompt: row {counts.index(0)} has no tokens (all pad_id={self.config.pad_id}); every "
                             "prompt needs at least one token")
        longest = max(counts) if counts else prompt.shape[1]
        if not torch.compiler.is_compiling() and longest > self.config.max_len:
            raise ValueError(f"prompt: a row has {longest} tokens, more than the model's max_len "
                             f"({self.config.max_len}); no new token fits")
        if not torch.compiler.is_compiling() and longest + max_new_tokens - 1 > self.config.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens needs "
                             f"{longest + max_new_tokens - 1} positions, more than the model's max_len "
                             f"({self.config.max_len}): at most {max(self.config.max_len - longest + 1, 0)} new tokens "
                             "(rows of a batch are stepped together: its longest prompt and its largest limit)")
        if counts is not None and all(c == prompt.shape[1] for c in counts):
            counts = None  # no padding: the cache has no gaps to mask
        slots = None
        if self.config.sliding_window is not None and not (full_cache or static):
            gap = prompt.shape[1] - min(counts) if counts else 0
            slots = self.config.sliding_window + gap
        state = self.start(prompt.shape[0], max_len=prompt.shape[1] + max_new_tokens, window_slots=slots,
                           static=static)
        h = self._hidden(state, prompt, counts)  # (B, P, E); host lengths: advance reads nothing back
        last = torch.tensor(counts, device=prompt.device) - 1 if counts is not None else \
            prompt.new_full((prompt.shape[0],), prompt.shape[1] - 1)
        rows = torch.arange(prompt.shape[0], device=prompt.device)
        logits = step_logits(state, self.lm_head, h[rows, last])  # (B, V)
        # Only later one-row steps may copy the head (beam search widens a batch of one to K rows).
        state.head_copy_ok = head_copy_pays(prompt.shape[0], max_new_tokens)
        if static and fast_head(self.lm_head, prompt.device, self.lm_head.weight.dtype):
            copy_head(state, self.lm_head)  # now: a compiled step cannot make it
        return state, logits


def window_mask(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, window: int, q_offset: int) -> masks.Mask:
    """``causal & sliding_window(window)`` over position ids rather than slots, as a tensor mask.

    Args:
        q_pos: (B, L) positions of the queries; k_pos, k_valid: (B, Lk) positions and validity of the keys.
        window, q_offset: the window W and the slot of the first query among the keys.
    """
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # (B, L, Lk)
    allowed = k_valid[:, None, :] & (diff >= 0) & (diff < window)  # (B, L, Lk)
    if q_pos.shape[1] > 1:  # a tensor mask's rows are absolute: rows before q_offset are never read
        allowed = torch.cat([allowed.new_zeros(allowed.shape[0], q_offset, allowed.shape[2]), allowed], dim=1)
    return masks.from_tensor(allowed[:, None])  # (B, 1, Lq, Lk)
