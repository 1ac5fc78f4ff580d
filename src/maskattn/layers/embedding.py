"""Token embedding: ids to vectors, optionally scaled by sqrt(d_model) as in Vaswani et al.

Shape legend: B batch, L sequence length, E d_model, V vocabulary size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maskattn.layers.arguments import check_layer_arguments


class TokenEmbedding(nn.Module):
    """A lookup table of ``vocab_size`` vectors of width ``d_model``.

    Args:
        vocab_size: number of token ids V.
        d_model: embedding width E.
        scale: multiply by sqrt(E) (the Transformer paper does, BERT and GPT do not).
        init_std: standard deviation of the normal initialisation (default E ** -0.5 when scaled,
            so that scaled embeddings start near unit variance, else 0.02).
    """

    def __init__(self, vocab_size: int, d_model: int, *, scale: bool = False, init_std: float | None = None) -> None:
        super().__init__()
        check_layer_arguments("TokenEmbedding", sizes={"vocab_size": vocab_size, "d_model": d_model},
                              switches={"scale": scale})
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.vocab_size, self.d_model, self.scale = vocab_size, d_model, scale
        std = init_std if init_std is not None else (d_model**-0.5 if scale else 0.02)
        nn.init.normal_(self.weight, std=std)

    def forward(self, ids: Tensor, *, check: bool = True) -> Tensor:
        """(B, L) integer ids -> (B, L, E); ``check=False``: the caller built ``ids`` in [0, V) itself (not read)."""
        if isinstance(ids, Tensor) and ids.device != self.weight.device:  # before check_ids reads them there
            raise ValueError(f"ids are on {ids.device}, the embedding table on {self.weight.device}; move them with "
                             f".to('{self.weight.device}')")
        if check:
            check_ids(ids, self.vocab_size)
        x = nn.functional.embedding(ids, self.weight)  # (B, L, E)
        return x * math.sqrt(self.d_model) if self.scale else x

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.d_model}, scale={self.scale}"


def check_ids(ids: Tensor, vocab_size: int) -> None:
    """Raise a TypeError unless ``ids`` is an int64 or int32 tensor (what an embedding lookup reads), a ValueError
    unless its values are in [0, V)."""
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"ids must be an integer tensor of token ids (int64 or int32), got {got}")
    bounds = value_range(ids)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= vocab_size):
        raise ValueError(f"ids must be in [0, {vocab_size}), got values in [{bounds[0]}, {bounds[1]}]")


def value_range(x: Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of an integer tensor in one host read (a wait for a GPU, not one per bound), for the eager input
    checks; None when there is nothing to read or while compiling (a graph cannot branch on tensor values)."""
    if not x.numel() or torch.compiler.is_compiling():
        return None
    low, high = torch.stack(torch.aminmax(x)).tolist()
    return low, high
