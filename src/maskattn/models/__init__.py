"""The Transformer family built on maskattn's layers: encoder-decoder, decoder-only, encoder-only."""

from maskattn.models.common import DecodeState
from maskattn.models.config import BlockConfig, DecoderLMConfig, EncoderConfig, TransformerConfig
from maskattn.models.decoder_lm import DecoderLM
from maskattn.models.encoder_model import EncoderModel
from maskattn.models.persistence import load, save
from maskattn.models.pretrained import from_pretrained
from maskattn.models.transformer import Transformer

__all__ = [
    "BlockConfig",
    "DecodeState",
    "DecoderLM",
    "DecoderLMConfig",
    "EncoderConfig",
    "EncoderModel",
    "Transformer",
    "TransformerConfig",
    "from_pretrained",
    "load",
    "save",
]
