"""The Transformer family built on maskattn's layers: encoder-decoder, decoder-only, encoder-only."""

from maskattn.models.captioner import Captioner, CaptionerConfig
from maskattn.models.common import DecodeState
from maskattn.models.config import BlockConfig, DecoderLMConfig, EncoderConfig, TransformerConfig
from maskattn.models.decoder_lm import DecoderLM
from maskattn.models.encoder_model import EncoderModel
from maskattn.models.inspection import (
    AttentionObserver,
    AttentionSite,
    AuditProbe,
    Inspectable,
    ProbeCheck,
    ProbeInput,
    inspectable,
    register_adapter,
)
from maskattn.models.persistence import load, save
from maskattn.models.pretrained import from_pretrained
from maskattn.models.transformer import Transformer

# The model families maskattn ships, in the order `maskattn audit` lists them.
BUILT_IN_MODELS = (Transformer, DecoderLM, EncoderModel)

__all__ = [
    "BUILT_IN_MODELS",
    "AttentionObserver",
    "AttentionSite",
    "AuditProbe",
    "BlockConfig",
    "Captioner",
    "CaptionerConfig",
    "DecodeState",
    "DecoderLM",
    "DecoderLMConfig",
    "EncoderConfig",
    "EncoderModel",
    "Inspectable",
    "ProbeCheck",
    "ProbeInput",
    "Transformer",
    "TransformerConfig",
    "from_pretrained",
    "inspectable",
    "load",
    "register_adapter",
    "save",
]
