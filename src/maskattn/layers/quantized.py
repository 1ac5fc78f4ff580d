"""Int8 linear layer with dynamic activation quantisation, stored as plain tensors.

Shape legend: N any leading dims, I in_features, O out_features.

:class:`Int8Linear` holds its weight as int8 (O, I) with one float scale per output channel
(symmetric: ``weight ~= int8 * scale[:, None]``), and quantises its input per call (per tensor,
asymmetric, 7-bit as PyTorch's dynamic quantisation does on x86). Every tensor is an ordinary
buffer, so a quantised model's state dict goes into safetensors like any other; the packed operand
of PyTorch's int8 kernel (``torch.ops.quantized.linear_dynamic``, fbgemm / x86) is built from them
on first use on CPU and rebuilt whenever they change. On other devices :meth:`Int8Linear.simulate`
computes the same quantised product with float arithmetic.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

QMAX = 127  # weights in [-127, 127]: symmetric, no -128
ACT_QMAX = 127  # activations in [0, 127]: 7 bits, the range fbgemm's dynamic linear uses (reduce_range)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: (O, I) float -> ((O, I) int8, (O,) float32 scales)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)  # (O,)
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # (O, I)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as int8 and per-channel scales; input quantised on the fly.

    Build one with :meth:`from_float` (quantises an ``nn.Linear``) or ``Int8Linear(I, O, bias=...)``
    (zeros, to be filled by ``load_state_dict``). State dict: ``weight`` (O, I) int8,
    ``weight_scale`` (O,) float32, ``bias`` (O,) float32 when there is one. Not trainable.
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
        self._packed: tuple[tuple, object] | None = None  # (key of the tensors it was built from, packed operand)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 version of ``linear`` (on its device)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_weight(linear.weight)
        new.weight, new.weight_scale = q, scale
        if linear.bias is not None:
            new.bias = linear.bias.detach().float().clone()
        return new

    def dequantized_weight(self) -> Tensor:
        """The float (O, I) weight the int8 values and scales stand for."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """(N, I) -> (N, O), in ``x``'s dtype."""
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return self.simulate(x)
        flat = x.reshape(-1, self.in_features).float()  # (N, I)
        y = torch.ops.quantized.linear_dynamic(flat.contiguous(), self._operand(), True)  # (N, O)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def simulate(self, x: Tensor) -> Tensor:
        """The same quantised product in float arithmetic (any device, differentiable in ``x``)."""
        xf = x.float()
        lo, hi = xf.min().clamp(max=0), xf.max().clamp(min=0)
        scale = ((hi - lo) / ACT_QMAX).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.round(-lo / scale).clamp(0, ACT_QMAX)
        xq = (torch.round(xf / scale) + zero).clamp(0, ACT_QMAX)
        xq = xf + ((xq - zero) * scale - xf).detach()  # straight-through: the quantised value, x's gradient
        y = nn.functional.linear(xq, self.dequantized_weight(), self.bias)  # (N, O)
        return y.to(x.dtype)

    def _operand(self) -> object:
        tensors = (self.weight, self.weight_scale) + ((self.bias,) if self.bias is not None else ())
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._packed is None or self._packed[0] != key:
            with warnings.catch_warnings():  # PyTorch deprecates quantized tensors, not this kernel
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight, self.weight_scale.double(), torch.zeros_like(self.weight_scale, dtype=torch.long), 0)
                packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
            self._packed = (key, packed)
        return self._packed[1]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_packed"] = None  # rebuilt on first use
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
