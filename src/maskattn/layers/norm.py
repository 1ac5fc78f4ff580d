"""Normalisation layers: LayerNorm (BERT, GPT-2) and RMSNorm (LLaMA), chosen by name.

Shape legend: B batch, L sequence length, E d_model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskattn.layers.arguments import check_layer_arguments


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich, 2019): ``weight * x / sqrt(mean(x^2) + eps)``.

    No centring and no bias; computed in float32 and cast back, as LLaMA does.

    Args:
        d_model: width E.
        eps: added to the mean square.
    """

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        check_layer_arguments("RMSNorm", sizes={"d_model": d_model}, positive={"eps": eps})
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, E) -> (B, L, E)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORMS: dict[str, type[nn.Module]] = {"layer": nn.LayerNorm, "rms": RMSNorm}
"""Normalisation kind (the ``norm`` config field) -> its module class, built as ``cls(d_model, eps=eps)``."""


def make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    """The normalisation layer ``kind`` (a key of :data:`NORMS`) of width ``d_model``."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {kind!r}")
    check_layer_arguments("make_norm", sizes={"d_model": d_model}, positive={"eps": eps})  # nn.LayerNorm takes any
    return NORMS[kind](d_model, eps=eps)
