"""Model configurations: plain dataclasses, validated on construction, with named presets.

Every field is a plain value (int, float, str, bool, None) so that configs round-trip through JSON,
TOML and command-line overrides. ``Config.preset(name, **overrides)`` starts from a named preset.
"""

from __future__ import annotations

import dataclasses
import typing
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from maskattn.backends import get as get_backend
from maskattn.errors import check_settings
from maskattn.layers.feedforward import ACTIVATIONS
from maskattn.layers.norm import NORMS

POSITIONS = ("sinusoidal", "learned", "rope")


@dataclass
class BlockConfig:
    """Fields shared by every model: the vocabulary, the layer shape and the positions."""

    vocab_size: int = 1000  # number of token ids V
    d_model: int = 512  # width E of embeddings and layers
    num_heads: int = 8  # attention heads H
    num_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = num_heads
    d_ff: int = 2048  # feed-forward hidden width
    dropout: float = 0.1  # on embeddings (+ positions) and on every sublayer output (residual dropout)
    attention_dropout: float = 0.0  # on attention weights
    head_dropout: float = 0.0  # drops whole attention heads per batch row while training (DropHead)
    activation: str = "relu"  # feed-forward activation: relu | gelu | gelu_tanh | swiglu
    activation_dropout: float = 0.0  # on the feed-forward hidden activations
    norm_first: bool = False  # pre-LN (True) or post-LN as in the paper (False)
    final_norm: bool | None = None  # LayerNorm after the last layer; None = same as norm_first
    norm_eps: float = 1e-5  # normalisation epsilon
    norm: str = "layer"  # layer (LayerNorm) | rms (RMSNorm, LLaMA), in every block and the final norm
    bias: bool = True  # biases in attention and feed-forward projections
    positions: str = "sinusoidal"  # sinusoidal | learned (added to embeddings) | rope (in attention)
    rope_base: float = 10000.0  # RoPE frequency base
    max_len: int = 512  # longest sequence the positions cover
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (the paper does)
    pad_id: int | None = 0  # padding id: masks are built from it when lengths are not given; None = no padding id
    backend: str = "auto"  # attention backend, see maskattn.attention

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        ints = [("vocab_size", self.vocab_size), ("d_model", self.d_model), ("num_heads", self.num_heads),
                ("d_ff", self.d_ff), ("max_len", self.max_len)]
        ints += [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name.startswith("num_")
                 and f.name.endswith("layers")]
        for name, value in ints:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, kind in field_types(type(self)).items():  # a JSON "false" or 0 is not a switch: never read as one
            value = getattr(self, name)
            if kind in (bool, bool | None) and not isinstance(value, bool) and not (value is None and kind is not bool):
                allowed = "True, False or None" if kind is not bool else "True or False"
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        check_optional_size(self, "num_kv_heads")
        kv = self.num_kv_heads if self.num_kv_heads is not None else self.num_heads
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if kv < 1 or self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        check_settings(self, {name: ("in", (0, 1, "[)"))
                              for name in ("dropout", "attention_dropout", "head_dropout", "activation_dropout")})
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {self.norm!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rope needs an even head dim, got d_model ({self.d_model}) / num_heads "
                             f"({self.num_heads}) = {self.d_model // self.num_heads}")
        # 0 or below: NaN at the first step, blamed on the learning rate
        check_settings(self, {"norm_eps": ("float>", 0), "rope_base": ("float>", 0)})
        self._check_ids("pad_id", self.vocab_size)
        if self.backend != "auto":
            get_backend(self.backend)  # a typo fails here (and when a saved config loads), not at the first forward

    def _check_ids(self, *names_then_vocab: Any) -> None:
        *names, vocab = names_then_vocab
        types = field_types(type(self))
        for name in names:
            value, optional = getattr(self, name), types[name] is not int  # int | None: None = no such token
            if (value is not None or not optional) and (
                    isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab):
                raise ValueError(f"{name} must be {'None or ' if optional else ''}an id in [0, {vocab}), got {value!r}")

    @property
    def use_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`maskattn.layers.EncoderLayer` / ``DecoderLayer``."""
        names = ("num_kv_heads", "dropout", "attention_dropout", "head_dropout", "activation", "activation_dropout",
                 "norm_first", "norm_eps", "bias", "backend", "norm")
        return {"d_model": self.d_model, "num_heads": self.num_heads, "d_ff": self.d_ff,
                **{n: getattr(self, n) for n in names}}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from a dict (e.g. parsed JSON); unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Self:
        """The named preset (see ``PRESETS``), with ``overrides`` applied."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


@dataclass
class TransformerConfig(BlockConfig):
    """Encoder-decoder Transformer (Vaswani et al., 2017). Defaults are the paper's base model."""

    vocab_size: int = 37000  # source vocabulary (the paper shares ~37000 BPE tokens between en and de)
    tgt_vocab_size: int | None = None  # target vocabulary; None = vocab_size
    num_encoder_layers: int = 6  # encoder layers N
    num_decoder_layers: int = 6  # decoder layers N
    scale_embeddings: bool = True  # embeddings times sqrt(d_model), section 3.4
    share_embeddings: bool = True  # one table for source and target tokens (needs equal vocabularies)
    tie_output: bool = True  # output projection = target embedding matrix, section 3.4
    bos_id: int = 1  # first decoder input
    eos_id: int | None = 2  # end of sequence; None = no EOS token (decoding runs every row to its limit)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2,
                     num_decoder_layers=2, max_len=64, dropout=0.0),
        "small": dict(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                      num_decoder_layers=3, max_len=256),
        "base": dict(),
    }

    @property
    def target_vocab_size(self) -> int:
        return self.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_size(self, "tgt_vocab_size")
        if self.share_embeddings and self.target_vocab_size != self.vocab_size:
            raise ValueError(f"share_embeddings needs equal vocabularies, got vocab_size ({self.vocab_size}) "
                             f"and tgt_vocab_size ({self.tgt_vocab_size})")
        self._check_ids("bos_id", "eos_id", "pad_id", self.target_vocab_size)
        check_distinct(self)


@dataclass
class DecoderLMConfig(BlockConfig):
    """Decoder-only causal language model (GPT-2 style by default: pre-LN, learned positions)."""

    num_layers: int = 6  # decoder layers
    dropout: float = 0.0  # residual and embedding dropout
    activation: str = "gelu_tanh"  # feed-forward activation
    norm_first: bool = True  # pre-LN
    positions: str = "learned"  # sinusoidal | learned | rope
    pad_id: int | None = None  # padding id; None: padded batches pass lengths instead
    tie_output: bool = True  # output projection = token embedding matrix
    bos_id: int | None = None  # optional start token (decoding starts from the prompt)
    eos_id: int | None = None  # end of sequence, stops generation
    sliding_window: int | None = None  # attend to the last W positions only (causal & sliding_window(W)); None = all

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=64),
        # nanoGPT's CPU character-level configuration.
        "small": dict(vocab_size=65, d_model=128, num_heads=4, d_ff=512, num_layers=4, max_len=64),
        "gpt2": dict(vocab_size=50257, d_model=768, num_heads=12, d_ff=3072, num_layers=12, max_len=1024,
                     dropout=0.1),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_ids("bos_id", "eos_id", self.vocab_size)
        check_distinct(self)
        check_optional_size(self, "sliding_window")


POOLINGS = ("first", "mean")


@dataclass
class EncoderConfig(BlockConfig):
    """BERT-style encoder with optional sequence-classification and span-QA heads."""

    num_layers: int = 6  # encoder layers
    activation: str = "gelu"  # BERT's exact (erf) GELU
    attention_dropout: float = 0.1  # on attention weights (BERT)
    positions: str = "learned"  # sinusoidal | learned | rope
    norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    type_vocab_size: int = 2  # token type (segment) ids; 0 = no token type embeddings
    embed_norm: bool = True  # LayerNorm on the summed embeddings (BERT)
    pooler: bool = True  # tanh(Linear(pooled hidden state)) as the sequence summary (BERT)
    pooling: str = "first"  # summary: first (the [CLS] token, BERT) | mean (of real tokens, sentence-transformers)
    num_labels: int = 0  # classes of the classification head; 0 = no classification head
    span_head: bool = False  # start/end logits head for extractive QA

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=64),
        "small": dict(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024, num_layers=4, max_len=256),
        # all-MiniLM-L6-v2 / MiniLM-L6-H384.
        "minilm-l6": dict(vocab_size=30522, d_model=384, num_heads=12, d_ff=1536, num_layers=6, max_len=512),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")


_FIELD_TYPES: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()  # dies with its class


def field_types(cls: type) -> dict[str, Any]:
    """The fields' types of a config class as objects (``bool | None``), whether or not its module writes its
    annotations as strings (``from __future__ import annotations``). Where some annotation names what its module
    cannot resolve (imported under ``TYPE_CHECKING``, a class local to a function), the plain ones are read from
    their strings and the rest stay strings, which no rule reads as a switch or an id."""
    if cls not in _FIELD_TYPES:  # read once per class, not per config; a class made per call is not kept alive
        _FIELD_TYPES[cls] = _read_field_types(cls)
    return _FIELD_TYPES[cls]


def _read_field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # else the config could not be built at all
        plain = {"bool": bool, "bool | None": bool | None, "int": int, "int | None": int | None}
        hints = {f.name: plain.get(f.type, f.type) if isinstance(f.type, str) else f.type
                 for f in dataclasses.fields(cls)}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_optional_size(config: BlockConfig, name: str) -> None:
    """ValueError naming ``name`` unless the field is None or a positive int (not a bool, float or string)."""
    value = getattr(config, name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def check_distinct(config: BlockConfig) -> None:
    ids = {name: getattr(config, name) for name in ("pad_id", "bos_id", "eos_id")}
    ids = {k: v for k, v in ids.items() if v is not None}
    if len(set(ids.values())) < len(ids):
        raise ValueError(f"pad_id, bos_id and eos_id must differ (padding is masked out), got {ids}")
