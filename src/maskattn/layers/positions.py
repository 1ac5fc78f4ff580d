"""Positional information: sinusoidal and learned absolute encodings, and rotary embeddings (RoPE).

Positions are absolute integer ids, (B, L): a full forward uses ``arange(L)``, incremental decoding
passes the positions of the new tokens (``q_offset + arange(Lq)`` when every row is aligned).
Absolute encodings are added to the token embeddings; RoPE instead rotates queries and keys inside
attention, so the score of (i, j) depends only on i - j.

Shape legend: B batch, L sequence length, E d_model, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maskattn.layers.embedding import value_range


def _check_positions(positions: Tensor, max_len: int) -> None:
    if not isinstance(positions, Tensor) or positions.dim() != 2 or positions.is_floating_point():
        got = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
        raise ValueError(f"positions must be a (B, L) integer tensor, got {got}")
    bounds = value_range(positions)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= max_len):
        raise ValueError(f"positions must be in [0, max_len={max_len}), got values in [{bounds[0]}, {bounds[1]}]")


def _check_sizes(owner: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/E)), PE[pos, 2i+1] = cos(same), (max_len, E)."""
    _check_sizes("sinusoidal positions", max_len=max_len, d_model=d_model)
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table.float()


class SinusoidalPositions(nn.Module):
    """The fixed encodings of Vaswani et al.; no parameters."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, positions: Tensor, *, check: bool = True) -> Tensor:
        """(B, L) positions -> (B, L, E) encodings, to add to the embeddings (``check``: as
        :class:`LearnedPositions`)."""
        if check:
            _check_positions(positions, self.max_len)
        return self.table[positions]  # (B, L, E)


class LearnedPositions(nn.Module):
    """One trained vector per absolute position (BERT, GPT-2)."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        _check_sizes("LearnedPositions", max_len=max_len, d_model=d_model)
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: Tensor, *, check: bool = True) -> Tensor:
        """(B, L) positions -> (B, L, E).

        ``check``: refuse positions outside [0, max_len) (they are read back: a wait for a GPU); False where the
        caller built them in range itself.
        """
        if check:
            _check_positions(positions, self.max_len)
        return nn.functional.embedding(positions, self.weight)  # (B, L, E)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.): the angles for given positions.

    Channels are paired as (x[..., i], x[..., i + D/2]) (the GPT-NeoX layout) and pair i is rotated
    by position * base^(-2i/D). Call it once per forward and pass the result to every attention
    layer as ``rope=``; :func:`apply_rope` does the rotation.
    """

    def __init__(self, head_dim: int, max_len: int, *, base: float = 10000.0) -> None:
        super().__init__()
        _check_sizes("RotaryEmbedding", head_dim=head_dim, max_len=max_len)
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        # base**-x of a base <= 0 (or inf, nan) is NaN or 0 for some pairs: every rotated score NaN or unrotated
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise ValueError(f"RotaryEmbedding: base must be a finite number > 0, got {base!r}")
        self.head_dim, self.max_len, self.base = head_dim, max_len, base

    def forward(self, positions: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
        """(B, L) positions -> ``(cos, sin)``, each (B, 1, L, D/2), broadcasting over heads (``check``: as
        :class:`LearnedPositions`)."""
        if check:
            _check_positions(positions, self.max_len)
        # Computed here in float32 rather than kept as a buffer, which model.half() would round.
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        angles = positions.unsqueeze(-1).float() * self.base**-exponents  # (B, L, D/2)
        return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor], *, check: bool = True) -> Tensor:
    """Rotate (B, H, L, D) queries or keys by the angles of :class:`RotaryEmbedding` (``check=False``: the caller
    checked the shapes itself, as MultiHeadAttention does once for its queries and keys).

    Raises:
        ValueError: unless ``rope`` is ``(cos, sin)``, each (B or 1, 1, L, D/2): angles of other rows, positions or
            widths would be broadcast into a rotation of nothing in particular (checked from shapes only).
    """
    if check and not torch.compiler.is_compiling():
        _check_rope_fits(x, rope)
    cos, sin = rope
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, H, L, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _check_rope_fits(x: Tensor, rope: tuple[Tensor, Tensor]) -> None:
    pair = isinstance(rope, tuple | list) and len(rope) == 2 and all(isinstance(a, Tensor) for a in rope)
    if not pair:
        raise ValueError(f"apply_rope: rope must be (cos, sin) from RotaryEmbedding, got {type(rope).__name__}")
    b, length, d = (x.shape[0], x.shape[2], x.shape[3]) if isinstance(x, Tensor) and x.dim() == 4 else (0, 0, 0)
    shapes = [tuple(a.shape) for a in rope]
    if not d or d % 2 or any(s[0] not in (1, b) or s[1:] != (1, length, d // 2) for s in shapes):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"apply_rope: x must be (B, H, L, D) with D even and rope (cos, sin) each (B or 1, 1, L, "
                         f"D/2); got x {got}, cos {shapes[0]}, sin {shapes[1]}")
