"""Encoder layer: self-attention and feed-forward, each inside a residual connection with LayerNorm.

Shape legend: B batch, L sequence length, E d_model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from maskattn.layers.arguments import check_layer_arguments
from maskattn.layers.feedforward import FeedForward
from maskattn.layers.kv_cache import KVCache
from maskattn.layers.mha import MultiHeadAttention
from maskattn.layers.residual import Residual
from maskattn.masks import Mask


class EncoderLayer(nn.Module):
    """``x = block(x, self_attn)``, then ``x = block(x, ffn)``; with a causal mask it is a GPT block.

    Args:
        d_model: width E.
        num_heads: attention heads.
        d_ff: feed-forward hidden width.
        num_kv_heads: key/value heads (grouped-query attention; default ``num_heads``).
        dropout: residual dropout on each sublayer's output.
        attention_dropout: dropout on the attention weights.
        head_dropout: dropout of whole attention heads (see :class:`MultiHeadAttention`).
        activation: feed-forward activation (see :class:`FeedForward`).
        activation_dropout: dropout on the feed-forward hidden activations.
        norm_first: pre-LN when True, post-LN (the paper's) when False.
        norm_eps: normalisation epsilon.
        norm: normalisation kind, ``layer`` (LayerNorm) or ``rms`` (RMSNorm, LLaMA).
        bias: biases in the attention and feed-forward projections.
        backend: attention backend (see :func:`maskattn.attention`).
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, num_kv_heads: int | None = None,
                 dropout: float = 0.0, attention_dropout: float = 0.0, activation: str = "relu",
                 activation_dropout: float = 0.0, norm_first: bool = False, norm_eps: float = 1e-5,
                 bias: bool = True, backend: str = "auto", norm: str = "layer", head_dropout: float = 0.0) -> None:
        super().__init__()
        # by this layer's own names (a DecoderLayer's too), before the parts check theirs
        check_layer_arguments(type(self).__name__, sizes={"d_ff": d_ff}, switches={"norm_first": norm_first},
                              probabilities={"dropout": dropout, "activation_dropout": activation_dropout},
                              positive={"norm_eps": norm_eps})
        self.self_attn = MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads,
                                            dropout=attention_dropout, bias=bias, backend=backend,
                                            head_dropout=head_dropout)
        self.self_attn_block = Residual(d_model, norm_first=norm_first, dropout=dropout, eps=norm_eps, norm=norm)
        self.ffn = FeedForward(d_model, d_ff, activation=activation, dropout=activation_dropout, bias=bias)
        self.ffn_block = Residual(d_model, norm_first=norm_first, dropout=dropout, eps=norm_eps, norm=norm)

    def forward(self, x: Tensor, *, mask: Mask | None = None, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, q_offset: int = 0,
                return_weights: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """(B, L, E) -> (B, L, E); ``cache``/``q_offset`` for incremental decoding.

        With ``return_weights``, also ``{"self": (B, H, L, Lk) attention weights}``.
        """
        x, weights = attend(self.self_attn_block, self.self_attn, x, return_weights,
                            mask=mask, rope=rope, cache=cache, q_offset=q_offset)
        x = self.ffn_block(x, self.ffn)
        return (x, {"self": weights}) if return_weights else x


def attend(block: Residual, attn: MultiHeadAttention, x: Tensor, return_weights: bool,
           **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """Run ``attn`` as the sublayer of ``block``; also return its weights when asked."""
    seen = []

    def sublayer(h: Tensor) -> Tensor:
        out = attn(h, return_weights=return_weights, **kwargs)
        if return_weights:
            out, weights = out
            seen.append(weights)
        return out

    return block(x, sublayer), (seen[0] if seen else None)
