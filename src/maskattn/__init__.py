"""maskattn: masked multi-head attention that is correct, fast and inspectable.

Convention everywhere: a mask value of **True means "may attend"**.
"""

from maskattn import (
    decoding,
    hf_inspect,  # noqa: F401  registers the Hugging Face adapter (imports no transformers)
    masks,
)
from maskattn.audit import audit  # the function; the module stays importable as maskattn.audit
from maskattn.dispatch import BACKENDS, attention, choose_backend
from maskattn.explanation import explain
from maskattn.layers import MultiHeadAttention
from maskattn.masks import Mask
from maskattn.models import (
    DecoderLM,
    DecoderLMConfig,
    EncoderConfig,
    EncoderModel,
    Transformer,
    TransformerConfig,
    from_pretrained,
    load,
    save,
)
from maskattn.weights import attention_weights

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DecoderLM",
    "DecoderLMConfig",
    "EncoderConfig",
    "EncoderModel",
    "Mask",
    "MultiHeadAttention",
    "Transformer",
    "TransformerConfig",
    "attention",
    "attention_weights",
    "audit",
    "choose_backend",
    "decoding",
    "explain",
    "from_pretrained",
    "load",
    "masks",
    "save",
]
