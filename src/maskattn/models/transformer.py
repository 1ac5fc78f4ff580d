"""The encoder-decoder Transformer of Vaswani et al. (2017), "Attention Is All You Need".

Shape legend: B batch, Ls source length, Lt target length, E d_model, V target vocabulary.

Masks are built inside from lengths or padding ids: source padding for encoder self-attention and
cross-attention, causal & target padding for decoder self-attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskattn import masks
from maskattn.layers import DecoderLayer, EncoderLayer, TokenEmbedding
from maskattn.masks import Mask
from maskattn.models.common import (
    DecodeState,
    Embedder,
    Stack,
    advance,
    default_positions,
    init_linears,
    kept_mask,
    key_valid,
    new_state,
)
from maskattn.models.config import TransformerConfig
from maskattn.models.inspection import AttentionSite, AuditProbe, ProbeCheck, ProbeInput, layer_sites
from maskattn.models.persistence import Persistent
from maskattn.models.summary import Summary


def padding_mask(valid: Tensor | None) -> Mask | None:
    return masks.padding(valid) if valid is not None else None


class Transformer(Persistent, Summary, nn.Module):
    """Encoder-decoder Transformer. ``forward(src, tgt)`` gives next-token logits (B, Lt, V)."""

    never_generated = ("pad_id", "bos_id")  # decoding never outputs these (BOS is only an input)

    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = c = self.checked_config(config)
        src_tokens = TokenEmbedding(c.vocab_size, c.d_model, scale=c.scale_embeddings)
        tgt_tokens = src_tokens if c.share_embeddings else TokenEmbedding(
            c.target_vocab_size, c.d_model, scale=c.scale_embeddings)
        self.src_embed = Embedder(c, src_tokens)
        self.tgt_embed = Embedder(c, tgt_tokens)
        kwargs = c.layer_kwargs()
        self.encoder = Stack([EncoderLayer(**kwargs) for _ in range(c.num_encoder_layers)], c.d_model,
                             final_norm=c.use_final_norm, eps=c.norm_eps, norm=c.norm)
        self.decoder = Stack([DecoderLayer(**kwargs) for _ in range(c.num_decoder_layers)], c.d_model,
                             final_norm=c.use_final_norm, eps=c.norm_eps, norm=c.norm)
        self.out_proj = nn.Linear(c.d_model, c.target_vocab_size, bias=False)
        init_linears(self.encoder)
        init_linears(self.decoder)
        if c.tie_output:
            self.out_proj.weight = tgt_tokens.weight

    def example_inputs(self) -> tuple[Tensor, ...]:
        """A (1, 8) source and a (1, 8) target batch, for :meth:`summary`."""
        (ids,) = super().example_inputs()
        return ids, ids.clamp(max=self.config.target_vocab_size - 1)

    def encode(self, src: Tensor, src_lengths: Tensor | Sequence[int] | None = None, *,
               return_weights: bool = False) -> tuple:
        """Encode (B, Ls) source ids.

        Returns:
            ``(memory, valid)``: the (B, Ls, E) encoder output and the (B, Ls) bool mask of real
            source tokens (None when there is no padding); with ``return_weights``, also the list of
            every layer's ``{"self": (B, H, Ls, Ls)}`` attention weights.
        """
        valid = key_valid(src, src_lengths, self.config.pad_id, "src")
        _check_length(src, "src", self.config.max_len)
        x, rope = self.src_embed(src, default_positions(src), positions_below=src.shape[1])  # (B, Ls, E)
        out = self.encoder(x, mask=padding_mask(valid), rope=rope, return_weights=return_weights)
        return (out[0], valid, out[1]) if return_weights else (out, valid)

    def decode(self, tgt: Tensor, memory: Tensor, memory_valid: Tensor | None, *,
               tgt_lengths: Tensor | Sequence[int] | None = None,
               return_weights: bool = False) -> Tensor | tuple[Tensor, list[dict[str, Tensor]]]:
        """Logits (B, Lt, V) for (B, Lt) target inputs given the encoder memory (B, Ls, E); with
        ``return_weights``, also every layer's ``{"self": ..., "cross": (B, H, Lt, Ls)}`` weights."""
        _check_memory(tgt, memory, memory_valid, self.config.d_model)
        if isinstance(tgt, Tensor) and tgt.dim() >= 1 and memory.shape[0] != tgt.shape[0]:
            raise ValueError(f"tgt and the source (memory) must share the batch size: tgt {tuple(tgt.shape)}, memory "
                             f"(B, Ls, E) {tuple(memory.shape)}")
        valid = key_valid(tgt, tgt_lengths, self.config.pad_id, "tgt")
        _check_length(tgt, "tgt", self.config.max_len)
        mask = masks.causal() if valid is None else masks.causal() & masks.padding(valid)
        x, rope = self.tgt_embed(tgt, default_positions(tgt), positions_below=tgt.shape[1])  # (B, Lt, E)
        out = self.decoder(x, memory=memory, mask=mask, memory_mask=padding_mask(memory_valid), rope=rope,
                           return_weights=return_weights)
        return (self.out_proj(out[0]), out[1]) if return_weights else self.out_proj(out)  # (B, Lt, V)

    def forward(self, src: Tensor, tgt: Tensor, *, src_lengths: Tensor | Sequence[int] | None = None,
                tgt_lengths: Tensor | Sequence[int] | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, dict[str, list[dict[str, Tensor]]]]:
        """Teacher-forced logits.

        Args:
            src: (B, Ls) source ids, right-padded.
            tgt: (B, Lt) decoder inputs (BOS y1 y2 ...), right-padded.
            src_lengths, tgt_lengths: (B,) lengths; default: positions whose id is not ``pad_id``.
            return_weights: also return ``{"encoder": [...], "decoder": [...]}``, per layer the
                attention weights ``{"self": ...}`` / ``{"self": ..., "cross": ...}``, (B, H, Lq, Lk).

        Returns:
            (B, Lt, V) logits of the next target token at every position.
        """
        if not return_weights:
            memory, memory_valid = self.encode(src, src_lengths)
            return self.decode(tgt, memory, memory_valid, tgt_lengths=tgt_lengths)
        memory, memory_valid, enc_w = self.encode(src, src_lengths, return_weights=True)
        logits, dec_w = self.decode(tgt, memory, memory_valid, tgt_lengths=tgt_lengths, return_weights=True)
        return logits, {"encoder": enc_w, "decoder": dec_w}

    # --- inspection -------------------------------------------------------------------------------
    def attention_sites(self) -> dict[str, AttentionSite]:
        """Bidirectional self-attention in the encoder; causal self- and cross-attention in the decoder."""
        return {**layer_sites("encoder.layers", len(self.encoder.layers), self_attn="self-bidirectional"),
                **layer_sites("decoder.layers", len(self.decoder.layers), self_attn="self-causal",
                              cross_attn="cross")}

    def audit_probe(self) -> AuditProbe:
        """Every attention call; no logit depends on a later target token, nor on source padding."""
        c, uses = self.config, ("src", "tgt", "src_lengths")
        return AuditProbe(
            inputs=(ProbeInput("src", "tokens", c.vocab_size),
                    ProbeInput("tgt", "tokens", c.target_vocab_size, shorten=2),
                    ProbeInput("src_lengths", "lengths")),
            checks=(ProbeCheck("layers", uses),
                    ProbeCheck("causal", uses, "Transformer decoder logits vs later target tokens", varies="tgt"),
                    ProbeCheck("padding", uses, "Transformer logits vs source padding", varies="src",
                               lengths="src_lengths", aligned=False)))

    # --- incremental decoding ---------------------------------------------------------------------
    def start(self, src: Tensor, src_lengths: Tensor | Sequence[int] | None = None, *, max_len: int) -> DecodeState:
        """Encode once, project the encoder keys/values of every layer, and allocate caches."""
        memory, memory_valid = self.encode(src, src_lengths)
        state = new_state(self.decoder, src.shape[0], max_len, memory)
        state.memory_kv = [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]
        state.memory_valid = memory_valid
        return state

    def step(self, state: DecodeState, tokens: Tensor, lengths: Tensor | None = None, *,
             ids_below: int | None = None) -> Tensor:
        """Feed (B, L) new target tokens; return their logits (B, L, V). Updates ``state``.

        ``ids_below``: the caller built ``tokens`` itself, all in [0, ids_below) (BOS): not read back to be checked.
        """
        positions, offset = advance(state, tokens, lengths)
        x, rope = self.tgt_embed(tokens, positions, positions_below=offset + tokens.shape[1],  # never past the slots
                                 ids_below=ids_below)
        # the same masks every step (padding reads only the call's Lk columns of the slots): built once
        mask = kept_mask(state, "causal & padding", state.key_valid,
                         lambda valid: masks.causal() & masks.padding(valid))
        memory_mask = kept_mask(state, "memory", state.memory_valid, padding_mask)
        h = self.decoder(x, mask=mask, memory_mask=memory_mask, memory_kv=state.memory_kv,
                         rope=rope, caches=state.caches, q_offset=offset)
        return self.out_proj(h)

    def begin_decoding(self, src: Tensor, src_lengths: Tensor | Sequence[int] | None = None, *,
                       max_new_tokens: int) -> tuple[DecodeState, Tensor]:
        """Start generation: the state after BOS and the (B, V) logits of the first target token."""
        if max_new_tokens > self.config.max_len:  # BOS and the new tokens but the last are fed at positions
            raise ValueError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens} target positions, more than "
                             f"the model's max_len ({self.config.max_len})")
        state = self.start(src, src_lengths, max_len=max_new_tokens + 1)
        bos = torch.full((src.shape[0], 1), self.config.bos_id, dtype=torch.long, device=src.device)
        return state, self.step(state, bos, ids_below=self.config.bos_id + 1)[:, -1]  # the config checked BOS < V


def _check_length(ids: Tensor, name: str, max_len: int) -> None:
    """(B, L) ids must fit the positions (the position table's error names neither argument); also the
    captioner's, whose ``decode`` is this module's."""
    if ids.shape[1] > max_len:
        raise ValueError(f"{name} has {ids.shape[1]} tokens, more than the model's max_len ({max_len})")


def _check_memory(tgt: Tensor, memory: Tensor, memory_valid: Tensor | None, width: int) -> None:
    """``memory`` and ``memory_valid`` must be what ``encode`` gives: a (B, Ls, E) tensor and None or a (B, Ls) bool
    tensor (masks.padding would broadcast a (1, Ls) mask over the batch and read a (B,) integer one as lengths)."""
    b = tgt.shape[0] if isinstance(tgt, Tensor) and tgt.dim() >= 1 else "B"
    if not isinstance(memory, Tensor) or memory.dim() != 3 or memory.shape[-1] != width:
        got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
        raise ValueError(f"memory must be a (B, Ls, E) = ({b}, Ls, {width}) tensor from encode, got {got}")
    if memory_valid is not None and (not isinstance(memory_valid, Tensor) or memory_valid.dtype != torch.bool
                                     or memory_valid.shape != memory.shape[:2]):
        got = f"{tuple(memory_valid.shape)} {memory_valid.dtype}" if isinstance(memory_valid, Tensor) \
            else type(memory_valid).__name__
        raise ValueError(f"memory_valid must be None or a (B, Ls) = {tuple(memory.shape[:2])} bool tensor from encode "
                         f"(one row per memory row), got {got}")
