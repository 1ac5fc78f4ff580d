"""BERT-style encoder, with heads for sequence classification and extractive span QA.

Shape legend: B batch, L sequence length, E d_model, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskattn import masks
from maskattn.layers import EncoderLayer, TokenEmbedding
from maskattn.models.common import Embedder, Stack, default_positions, init_linears, key_valid
from maskattn.models.config import EncoderConfig
from maskattn.models.inspection import AttentionSite, AuditProbe, ProbeCheck, ProbeInput, layer_sites
from maskattn.models.persistence import Persistent
from maskattn.models.summary import Summary


class EncoderModel(Persistent, Summary, nn.Module):
    """Bidirectional encoder. ``forward`` gives the last hidden states (B, L, E).

    ``classify`` gives (B, C) class logits from the pooled sequence, its first token or the mean of its
    real tokens (``config.pooling``; ``config.num_labels`` > 0);
    ``span_logits`` gives start and end logits over the positions (``config.span_head``).
    """

    config_class = EncoderConfig

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = c = self.checked_config(config)
        tokens = TokenEmbedding(c.vocab_size, c.d_model, scale=c.scale_embeddings)
        self.embed = Embedder(c, tokens, type_vocab_size=c.type_vocab_size, norm=c.embed_norm)
        self.encoder = Stack([EncoderLayer(**c.layer_kwargs()) for _ in range(c.num_layers)], c.d_model,
                             final_norm=c.use_final_norm, eps=c.norm_eps, norm=c.norm)
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.pooler else None
        self.pool_dropout = nn.Dropout(c.dropout)  # on the pooled state (config.head_dropout is DropHead)
        self.classifier = nn.Linear(c.d_model, c.num_labels) if c.num_labels else None
        self.span_head = nn.Linear(c.d_model, 2) if c.span_head else None
        init_linears(self, std=0.02)  # BERT's initialisation
        if self.embed.token_types is not None:
            nn.init.normal_(self.embed.token_types.weight, std=0.02)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                token_type_ids: Tensor | None = None, lengths: Tensor | Sequence[int] | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, list[dict[str, Tensor]]]:
        """Last hidden states.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) 1/True for real tokens, 0/False for padding (Hugging Face's
                meaning); default from ``lengths``, else from ``pad_id``.
            token_type_ids: (B, L) segment ids in [0, type_vocab_size); default 0; unread by a model without a
                token-type table (type_vocab_size=0).
            lengths: (B,) real lengths of right-padded rows.
            return_weights: also return every layer's ``{"self": (B, H, L, L)}`` attention weights.

        Returns:
            (B, L, E).
        """
        valid = self._valid(input_ids, attention_mask, lengths)
        x, rope = self.embed(input_ids, default_positions(input_ids), token_type_ids,
                             positions_below=input_ids.shape[1])  # (B, L, E)
        mask = masks.padding(valid) if valid is not None else None
        return self.encoder(x, mask=mask, rope=rope, return_weights=return_weights)

    def pool(self, hidden: Tensor, valid: Tensor | None = None) -> Tensor:
        """(B, L, E) -> (B, E): the first token's state, or the mean over the real tokens (``valid``,
        (B, L) bool; None = all) when ``config.pooling == "mean"``; through tanh(pooler) when there is one."""
        if self.config.pooling == "mean":
            weights = torch.ones_like(hidden[..., 0]) if valid is None else valid.to(hidden.dtype)  # (B, L)
            summary = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        else:
            summary = hidden[:, 0]
        return torch.tanh(self.pooler(summary)) if self.pooler is not None else summary

    def classify(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """(B, C) class logits; ``kwargs`` as in :meth:`forward`."""
        if self.classifier is None:
            raise ValueError("this EncoderModel has no classification head; build it with config.num_labels > 0")
        valid = self._valid(input_ids, attention_mask, kwargs.pop("lengths", None))  # (B, L) bool or None
        hidden = self(input_ids, valid, **kwargs)  # a bool mask: forward does not check its values again
        valid = valid if self.config.pooling == "mean" else None
        return self.classifier(self.pool_dropout(self.pool(hidden, valid)))  # (B, C)

    def span_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        """Start and end logits, each (B, L), for extractive QA; ``kwargs`` as in :meth:`forward`."""
        if self.span_head is None:
            raise ValueError("this EncoderModel has no span head; build it with config.span_head=True")
        hidden = self(input_ids, attention_mask, **kwargs)
        start, end = self.span_head(hidden).unbind(dim=-1)  # (B, L) each
        return start, end

    def attention_sites(self) -> dict[str, AttentionSite]:
        """Bidirectional self-attention in every layer."""
        return layer_sites("encoder.layers", len(self.encoder.layers), self_attn="self-bidirectional")

    def audit_probe(self) -> AuditProbe:
        """Every attention call; no hidden state of a real token depends on padding."""
        uses = ("input_ids", "lengths")
        return AuditProbe(
            inputs=(ProbeInput("input_ids", "tokens", self.config.vocab_size), ProbeInput("lengths", "lengths")),
            checks=(ProbeCheck("layers", uses),
                    ProbeCheck("padding", uses, "EncoderModel hidden states vs padding", varies="input_ids",
                               lengths="lengths")))

    def _valid(self, ids: Tensor, attention_mask: Tensor | None, lengths) -> Tensor | None:
        if attention_mask is None:
            return key_valid(ids, lengths, self.config.pad_id, "input_ids")
        if lengths is not None:
            raise ValueError("pass attention_mask or lengths, not both: each says which tokens are real")
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got {got}")
        # .bool() reads every non-zero as a real token: an additive mask (0 / -inf) would hide nothing. A host check
        # (it reads the values): eager only, a compiled graph cannot branch on tensor values.
        if attention_mask.dtype != torch.bool and not torch.compiler.is_compiling() and bool(
                ((attention_mask != 0) & (attention_mask != 1)).any()):
            found = attention_mask.unique().tolist()
            raise ValueError(f"attention_mask must hold 1 for real tokens and 0 for padding (Hugging Face's meaning), "
                             f"got values {found[:6]}{' ...' if len(found) > 6 else ''}; an additive mask is not one")
        return attention_mask.bool()
