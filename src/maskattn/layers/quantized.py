"""Int8 linear layer with dynamic activation quantisation, stored as plain tensors.

Shape legend: N tokens (all leading dims together), I in_features, O out_features.

:class:`Int8Linear` holds its weight as int8 (O, I) with one float scale per output channel
(symmetric: ``weight ~= int8 * scale[:, None]``) and quantises its input per call, one symmetric
scale per token (row), as torchao's int8 dynamic scheme does. Per token, not per tensor: a token's
output then depends on that token alone, never on its batch mates or on padding, so masks keep
their promise (``maskattn audit`` holds) and a sentence translates the same in any batch. The
product is PyTorch's integer matmul (``torch._int_mm``, int32 accumulation); every tensor is an
ordinary buffer, so a quantised model's state dict goes into safetensors like any other.

:class:`Int8TokenEmbedding` is a token table in the same layout (int8 rows, one scale per row). An
output projection tied to the embedding has one scale per vocabulary row too, so the two share one
int8 table (:meth:`Int8Linear.tied_to`), as the float model shares one float table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maskattn.layers.embedding import TokenEmbedding, check_ids

QMAX = 127  # int8 values in [-127, 127]: symmetric, no -128


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row: (N, I) float -> ((N, I) int8, (N, 1) float32 scales)."""
    x = x.detach().float()
    scale = (x.abs().amax(dim=1, keepdim=True) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)  # (N, 1)
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: (O, I) float -> ((O, I) int8, (O,) scales in the weight's dtype).

    The scales keep the model's dtype, so that a bfloat16 model quantised is one float dtype (and int8), as
    load() reads a model back; the int8 values are rounded against the scales as stored in that dtype.
    """
    w = weight.detach()
    wide = torch.promote_types(w.dtype, torch.float32)  # the arithmetic: float32, or float64 for a float64 weight
    # The least scale keeps a zero row finite. Not the dtype's smallest normal: float16's (6.1e-5) would take rows
    # with |w| < 0.0078 at a fraction of the int8 range; its subnormals are normal in the float32 arithmetic.
    least = max(torch.finfo(w.dtype).tiny * torch.finfo(w.dtype).eps, torch.finfo(wide).tiny)
    scale = (w.to(wide).abs().amax(dim=1) / QMAX).clamp(min=least).to(w.dtype)  # (O,), as stored
    q = torch.round(w.to(wide) / scale.to(wide)[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (O, I)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as int8 and per-channel scales; input quantised on the fly.

    Build one with :meth:`from_float` (quantises an ``nn.Linear``) or ``Int8Linear(I, O, bias=...)``
    (zeros, to be filled by ``load_state_dict``). State dict: ``weight`` (O, I) int8,
    ``weight_scale`` (O,) and ``bias`` (O,) when there is one, in the float layer's dtype. Not trainable; gradients
    flow to the input (straight through the activation rounding).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 version of ``linear`` (on its device)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_weight(linear.weight)
        new.weight, new.weight_scale = q, scale
        if linear.bias is not None:
            new.bias = linear.bias.detach().clone()  # in the model's dtype, as the scales
        return new

    @classmethod
    def tied_to(cls, embedding: Int8TokenEmbedding) -> Int8Linear:
        """An E -> V projection without bias whose weight and scales are ``embedding``'s (shared, not copied)."""
        new = cls(embedding.d_model, embedding.vocab_size, bias=False)
        new.weight, new.weight_scale = embedding.weight, embedding.weight_scale
        return new

    def dequantized_weight(self) -> Tensor:
        """The float (O, I) weight the int8 values and scales stand for."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """(..., I) -> (..., O), in ``x``'s dtype."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:  # a reshape would regroup other widths into rows
            raise ValueError(f"Int8Linear: x must be (..., in_features={self.in_features}), got {tuple(x.shape)}")
        if not x.is_floating_point():  # integers would come back truncated
            raise TypeError(f"Int8Linear: x must be floating point, got {x.dtype}")
        flat = x.reshape(-1, self.in_features)  # (N, I)
        xq, x_scale = quantize_rows(flat)  # (N, I) int8, (N, 1)
        # torch._int_mm on the CPU gives wrong sums for a single input feature (K = 1): the float path there
        if x.device.type == "cpu" and self.in_features > 1 and not (torch.is_grad_enabled() and x.requires_grad):
            acc = torch._int_mm(xq, self.weight.t())  # (N, O), exact int32 sums
        else:  # other devices, and gradients: the same sums in float (exact while |sum| < 2**24), not autocast's
            with torch.autocast(x.device.type, enabled=False):
                w = self.weight.float().t()  # (I, O)
                acc = xq.float() @ w  # (N, O)
                acc = acc + (flat.float() / x_scale - (flat.float() / x_scale).detach()) @ w
        # The epilogue works in place: fresh (N, O) temporaries, not the arithmetic, were most of the time
        # for a wide output (8,000 rows: 3x the integer matmul).
        y = acc * x_scale  # (N, O) float32
        y.mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8TokenEmbedding(nn.Module):
    """A :class:`~maskattn.layers.TokenEmbedding` stored as int8 rows with one float scale per row.

    Build one with :meth:`from_float` or ``Int8TokenEmbedding(V, E, scale=...)`` (zeros, to be filled by
    ``load_state_dict``). State dict: ``weight`` (V, E) int8 and ``weight_scale`` (V,) in the float table's dtype.
    """

    def __init__(self, vocab_size: int, d_model: int, *, scale: bool = False) -> None:
        super().__init__()
        self.vocab_size, self.d_model, self.scale = vocab_size, d_model, scale
        self.register_buffer("weight", torch.zeros(vocab_size, d_model, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(vocab_size))

    @classmethod
    def from_float(cls, embedding: TokenEmbedding) -> Int8TokenEmbedding:
        new = cls(embedding.vocab_size, embedding.d_model, scale=embedding.scale)
        new.weight, new.weight_scale = quantize_weight(embedding.weight)
        return new

    def forward(self, ids: Tensor, *, check: bool = True) -> Tensor:
        """(B, L) integer ids -> (B, L, E) in the scales' dtype (the model's);
        ``check=False``: the caller built ``ids`` in [0, V) itself (not read)."""
        if check:
            check_ids(ids, self.vocab_size)
        scale = self.weight_scale[ids].unsqueeze(-1)  # (B, L, 1); int8 values are exact in every float type
        x = nn.functional.embedding(ids, self.weight).to(scale.dtype) * scale  # (B, L, E)
        return x * math.sqrt(self.d_model) if self.scale else x

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.d_model}, scale={self.scale}, int8"
