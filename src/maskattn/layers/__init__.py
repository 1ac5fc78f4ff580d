"""Neural network layers built on :func:`maskattn.attention`."""

from maskattn.layers.mha import MultiHeadAttention

__all__ = ["MultiHeadAttention"]
