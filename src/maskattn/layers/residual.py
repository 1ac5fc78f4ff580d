"""Residual connection around a sublayer, with layer normalisation before (pre-LN) or after (post-LN).

Shape legend: B batch, L sequence length, E d_model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from maskattn.layers.arguments import check_layer_arguments
from maskattn.layers.norm import make_norm


class Residual(nn.Module):
    """post-LN (Vaswani et al., BERT): ``norm(x + dropout(f(x)))``; pre-LN (GPT-2): ``x + dropout(f(norm(x)))``.

    Args:
        d_model: width E.
        norm_first: pre-LN when True.
        dropout: dropout on the sublayer output, before the addition (the paper's residual dropout).
        eps: normalisation epsilon.
        norm: normalisation kind, ``layer`` (LayerNorm) or ``rms`` (RMSNorm).
    """

    def __init__(self, d_model: int, *, norm_first: bool, dropout: float = 0.0, eps: float = 1e-5,
                 norm: str = "layer") -> None:
        super().__init__()
        check_layer_arguments("Residual", switches={"norm_first": norm_first}, probabilities={"dropout": dropout},
                              positive={"eps": eps})
        self.norm_first = norm_first
        self.norm = make_norm(norm, d_model, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """(B, L, E) -> (B, L, E)."""
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))

    def extra_repr(self) -> str:
        return "pre-LN" if self.norm_first else "post-LN"
