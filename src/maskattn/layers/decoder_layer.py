"""Decoder layer: masked self-attention, cross-attention to the encoder, feed-forward.

Shape legend: B batch, Lq decoder length, Ls encoder (source) length, E d_model, Hkv key/value
heads, D head dim.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from maskattn.layers.encoder_layer import EncoderLayer, attend
from maskattn.layers.kv_cache import KVCache
from maskattn.layers.mha import MultiHeadAttention
from maskattn.layers.residual import Residual
from maskattn.masks import Mask


class DecoderLayer(EncoderLayer):
    """An :class:`EncoderLayer` with a cross-attention sublayer between self-attention and FFN.

    Takes the arguments of :class:`EncoderLayer`. The cross-attention has the same heads, dropouts
    and normalisation as the self-attention.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, d_ff, **kwargs)
        attn, block = self.self_attn, self.self_attn_block
        self.cross_attn = MultiHeadAttention(d_model, num_heads, num_kv_heads=attn.num_kv_heads,
                                             dropout=attn.dropout, bias=attn.q_proj.bias is not None,
                                             backend=attn.backend, head_dropout=attn.head_dropout)
        self.cross_attn_block = Residual(d_model, norm_first=block.norm_first, dropout=block.dropout.p,
                                         eps=block.norm.eps, norm=kwargs.get("norm", "layer"))

    def forward(self, x: Tensor, memory: Tensor | None = None, *, mask: Mask | None = None,
                memory_mask: Mask | None = None, memory_kv: tuple[Tensor, Tensor] | None = None,
                rope: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None,
                q_offset: int = 0, return_weights: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Decode (B, Lq, E) against the encoder output ``memory`` (B, Ls, E).

        Args:
            x: decoder input (B, Lq, E).
            memory: encoder output (B, Ls, E); or give ``memory_kv``.
            mask: self-attention mask (causal & target padding).
            memory_mask: cross-attention mask (source padding).
            memory_kv: ``cross_attn.project_kv(memory)``, two (B, Hkv, Ls, D), computed once when
                decoding step by step.
            rope: angles of the decoder positions (self-attention only).
            cache: self-attention KV cache.
            q_offset: absolute position of the first query.
            return_weights: also return ``{"self": (B, H, Lq, Lk), "cross": (B, H, Lq, Ls)}``.
        """
        if memory is None and memory_kv is None:
            raise ValueError("DecoderLayer needs memory (B, Ls, E) or memory_kv, got neither")
        x, self_w = attend(self.self_attn_block, self.self_attn, x, return_weights,
                           mask=mask, rope=rope, cache=cache, q_offset=q_offset)
        x, cross_w = attend(self.cross_attn_block, self.cross_attn, x, return_weights,
                            key=memory, mask=memory_mask, kv=memory_kv)
        x = self.ffn_block(x, self.ffn)
        return (x, {"self": self_w, "cross": cross_w}) if return_weights else x
