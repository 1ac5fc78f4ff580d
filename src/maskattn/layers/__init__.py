"""Neural network layers built on :func:`maskattn.attention`."""

from maskattn.layers.decoder_layer import DecoderLayer
from maskattn.layers.embedding import TokenEmbedding
from maskattn.layers.encoder_layer import EncoderLayer
from maskattn.layers.feedforward import FeedForward
from maskattn.layers.kv_cache import KVCache, SlidingWindowKVCache
from maskattn.layers.mha import Attend, MultiHeadAttention
from maskattn.layers.norm import NORMS, RMSNorm, make_norm
from maskattn.layers.positions import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    apply_rope,
    sinusoidal_table,
)
from maskattn.layers.quantized import Int8Linear, Int8TokenEmbedding
from maskattn.layers.residual import Residual

__all__ = [
    "NORMS",
    "Attend",
    "DecoderLayer",
    "EncoderLayer",
    "FeedForward",
    "Int8Linear",
    "Int8TokenEmbedding",
    "KVCache",
    "LearnedPositions",
    "MultiHeadAttention",
    "RMSNorm",
    "Residual",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "SlidingWindowKVCache",
    "TokenEmbedding",
    "apply_rope",
    "make_norm",
    "sinusoidal_table",
]
