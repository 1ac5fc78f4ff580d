"""Image patches as tokens: each square patch projected linearly, plus learned 2-D positions (ViT).

Shape legend: B batch, C channels, Hc x Wc canvas pixels, P patch side, R x K patch grid (rows x
columns), N = R * K patches (row-major), E d_model.

A batch holds canvases of different sizes padded at the bottom and right to the largest; ``sizes``
(B, 2) gives each canvas's real (height, width) and :func:`patch_valid` the patches that are real,
for a key padding mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskattn.layers.positions import sinusoidal_table

PATCH_POSITIONS = ("learned", "sinusoidal")


class PatchEmbedding(nn.Module):
    """(B, Hc, Wc) or (B, C, Hc, Wc) images -> (B, N, E) patch tokens with their 2-D positions.

    Args:
        patch_size: side P of the square patches; Hc and Wc must be multiples of it.
        d_model: width E of the tokens.
        channels: colour channels C.
        max_rows, max_cols: the largest patch grid the row and column embeddings cover.
        positions: ``"learned"`` (a trained vector per row and per column, added) or ``"sinusoidal"``
            (fixed: the first E/2 channels encode the row, the last E/2 the column, as in
            Vaswani et al.'s table; E must be a multiple of 4).
    """

    def __init__(self, patch_size: int, d_model: int, *, channels: int = 1, max_rows: int, max_cols: int,
                 positions: str = "learned") -> None:
        super().__init__()
        if positions not in PATCH_POSITIONS:
            raise ValueError(f"positions must be one of {PATCH_POSITIONS}, got {positions!r}")
        if positions == "sinusoidal" and d_model % 4:
            raise ValueError(f"sinusoidal 2-D positions need d_model divisible by 4, got {d_model}")
        self.patch_size, self.channels = patch_size, channels
        self.proj = nn.Linear(channels * patch_size * patch_size, d_model)
        self.rows = nn.Embedding(max_rows, d_model)
        self.cols = nn.Embedding(max_cols, d_model)
        if positions == "learned":
            for table in (self.rows, self.cols):
                nn.init.normal_(table.weight, std=0.02)
        else:  # fixed tables, in the same two places (so a model's state_dict has the same keys either way)
            half = d_model // 2
            for table, pad in ((self.rows, (0, d_model - half)), (self.cols, (half, 0))):
                table.weight.requires_grad_(False)
                with torch.no_grad():
                    table.weight.copy_(nn.functional.pad(sinusoidal_table(table.num_embeddings, half), pad))

    def grid(self, images: Tensor) -> tuple[int, int]:
        """The (R, K) patch grid of a batch of images; ValueError naming the shape when it does not fit."""
        p = self.patch_size
        fits = isinstance(images, Tensor) and ((images.dim() == 3 and self.channels == 1)
                                               or (images.dim() == 4 and images.shape[1] == self.channels))
        if not fits:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            expected = "(B, Hc, Wc) or (B, 1, Hc, Wc)" if self.channels == 1 else f"(B, {self.channels}, Hc, Wc)"
            raise ValueError(f"images must be {expected}, got {got}")
        if images.dtype == torch.bool or not (images.is_floating_point() or images.is_complex()):
            raise TypeError(f"images must be floating point (pixels scaled to [0, 1]), got {images.dtype}")
        # the model's dtype and device (the position tables': an int8 projection, compress --int8, takes any float)
        dtype, device = self.rows.weight.dtype, self.rows.weight.device
        if images.device != device:
            raise ValueError(f"images are on {images.device}, the model on {device}; move them with .to('{device}')")
        autocast = images.device.type != "meta" and torch.is_autocast_enabled(images.device.type)  # meta: none
        if not autocast and images.dtype != dtype:
            raise ValueError(f"images ({images.dtype}) and the model ({dtype}) must have one dtype outside autocast")
        h, w = images.shape[-2:]
        rows, cols = h // p, w // p
        largest = f"{self.rows.num_embeddings * p}x{self.cols.num_embeddings * p}"
        if h % p or w % p or not rows or not cols:
            raise ValueError(f"images of {h}x{w} pixels: height and width must be non-zero multiples of patch_size "
                             f"({p}), up to {largest}")
        if rows > self.rows.num_embeddings or cols > self.cols.num_embeddings:
            raise ValueError(f"images of {h}x{w} pixels: larger than the model's {largest} (its patch positions)")
        return rows, cols

    def forward(self, images: Tensor) -> Tensor:
        """(B, [C,] Hc, Wc) -> (B, N, E), patches in row-major order."""
        rows, cols = self.grid(images)
        p, b = self.patch_size, images.shape[0]
        x = images.reshape(b, self.channels, rows, p, cols, p)  # (B, C, R, P, K, P)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, self.channels * p * p)  # (B, N, C*P*P)
        positions = self.rows.weight[:rows, None] + self.cols.weight[None, :cols]  # (R, K, E)
        return self.proj(x) + positions.reshape(rows * cols, -1)  # (B, N, E)


def patch_valid(sizes: Tensor | Sequence[Sequence[int]] | None, grid: tuple[int, int], patch_size: int, *,
                batch: int, device: torch.device | str = "cpu") -> Tensor | None:
    """Which patches of each (R, K) grid lie inside its canvas, (B, N) bool; None when ``sizes`` is None.

    Args:
        sizes: (B, 2) real (height, width) of each canvas in pixels, multiples of ``patch_size``.
        grid: the batch's patch grid (R, K).
        patch_size: P.
        batch: B, to check ``sizes`` against.

    Raises:
        ValueError: naming ``sizes`` and its values when they are not (B, 2) multiples of P inside the grid.
    """
    if sizes is None:
        return None
    given = sizes
    sizes = torch.as_tensor(sizes, device=device)
    rows, cols = grid
    if sizes.shape != (batch, 2) or sizes.is_floating_point() or sizes.dtype == torch.bool:
        raise ValueError(f"sizes must be {batch} integer (height, width) pairs (B, 2), got {tuple(sizes.shape)}")
    # A host check: one read of a tensor (a wait for a GPU), not one per condition; none for sizes given as lists
    if batch:
        host = [[int(n) for n in pair] for pair in given] if isinstance(given, (list, tuple)) else sizes.tolist()
        high, wide = rows * patch_size, cols * patch_size
        if any(h % patch_size or w % patch_size or not (patch_size <= h <= high and patch_size <= w <= wide)
               for h, w in host):
            raise ValueError(f"sizes must be multiples of patch_size ({patch_size}) within the batch's "
                             f"{high}x{wide} canvas, got {host}")
    r = torch.arange(rows, device=sizes.device)[:, None] < (sizes[:, 0] // patch_size)[:, None, None]  # (B, R, 1)
    k = torch.arange(cols, device=sizes.device)[None, :] < (sizes[:, 1] // patch_size)[:, None, None]  # (B, 1, K)
    return (r & k).reshape(batch, rows * cols)  # (B, N)
