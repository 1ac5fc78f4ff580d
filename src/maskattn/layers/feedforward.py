"""Position-wise feed-forward network: Linear -> activation -> (dropout) -> Linear.

Shape legend: B batch, L sequence length, E d_model, F d_ff.
"""

from __future__ import annotations

from torch import Tensor, nn

from maskattn.layers.arguments import check_layer_arguments

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")


class FeedForward(nn.Module):
    """FFN(x) = down(act(up(x))), or down(silu(gate(x)) * up(x)) for SwiGLU (Shazeer, 2020).

    Args:
        d_model: input and output width E.
        d_ff: hidden width F.
        activation: one of ``relu`` (Vaswani et al.), ``gelu`` (exact, BERT), ``gelu_tanh`` (GPT-2),
            ``swiglu`` (LLaMA; adds a third, gate projection).
        dropout: dropout on the hidden activations (``nn.TransformerEncoderLayer`` has it; BERT
            does not).
        bias: whether the projections have biases.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu", dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        check_layer_arguments("FeedForward", sizes={"d_model": d_model, "d_ff": d_ff}, switches={"bias": bias},
                              probabilities={"dropout": dropout})
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, E) -> (B, L, E)."""
        h = self.up(x)  # (B, L, F)
        if self.gate is not None:
            h = nn.functional.silu(self.gate(x)) * h
        elif self.activation == "relu":
            h = nn.functional.relu(h)
        else:
            h = nn.functional.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down(self.dropout(h))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
