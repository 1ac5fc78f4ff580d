"""Load Hugging Face BERT-family checkpoints (config.json + model.safetensors + tokenizer.json)
into :class:`EncoderModel`, built from maskattn's own layers. Reads a local directory only; never
downloads.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from maskattn.models.config import EncoderConfig
from maskattn.models.encoder_model import EncoderModel
from maskattn.models.persistence import (
    CONFIG,
    FORMAT,
    TOKENIZER,
    WEIGHTS,
    load,
    load_tokenizer,
    load_weights,
    read_json,
    read_safetensors,
)

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# Hugging Face BERT parameter names -> ours ("{i}" is the layer index).
_RENAMES = [
    (r"embeddings\.word_embeddings\.", "embed.tokens."),
    (r"embeddings\.position_embeddings\.", "embed.positions."),
    (r"embeddings\.token_type_embeddings\.", "embed.token_types."),
    (r"embeddings\.LayerNorm\.", "embed.norm."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.", r"encoder.layers.\1.self_attn.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.", r"encoder.layers.\1.self_attn.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.", r"encoder.layers.\1.self_attn.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layers.\1.self_attn_block.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layers.\1.ffn.up."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layers.\1.ffn.down."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layers.\1.ffn_block.norm."),
    (r"pooler\.dense\.", "pooler."),
]
_IGNORED = re.compile(r"embeddings\.position_ids$")  # a constant buffer, not a weight


def from_pretrained(path: str | os.PathLike, *, num_labels: int = 0, span_head: bool = False) -> EncoderModel:
    """An :class:`EncoderModel` from a local checkpoint directory, with ``model.tokenizer`` set.

    Args:
        path: a directory with a Hugging Face BERT ``config.json`` and ``model.safetensors``
            (``tokenizer.json`` optional), or a directory written by ``model.save``.
        num_labels: add a freshly initialised classification head with this many classes.
        span_head: add a freshly initialised span (start/end) head for extractive QA.

    Raises:
        ValueError: when the directory is not a BERT checkpoint, or its tensors do not fit it.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"from_pretrained(path): {str(path)!r} is not a local directory (nothing is downloaded)")
    hf = read_json(directory / CONFIG)
    if hf.get("format") == FORMAT:
        return load(directory)
    config = bert_config(hf, directory / CONFIG, num_labels=num_labels, span_head=span_head)
    tensors = read_safetensors(directory / WEIGHTS)
    tensors = {_our_name(name): t for name, t in tensors.items() if not _IGNORED.search(name)}
    config = dataclasses.replace(config, pooler="pooler.weight" in tensors)
    model = EncoderModel(config)
    heads = {n: t for n, t in model.state_dict().items() if n.startswith(("classifier.", "span_head."))}
    load_weights(model, {**tensors, **heads}, {}, source=str(directory / WEIGHTS))
    model.tokenizer = load_tokenizer(directory / TOKENIZER) if (directory / TOKENIZER).is_file() else None
    return model


def bert_config(hf: dict, source: Path, *, pooler: bool = True, num_labels: int = 0,
                span_head: bool = False) -> EncoderConfig:
    """The :class:`EncoderConfig` of a Hugging Face BERT ``config.json``."""
    if hf.get("model_type") not in ("bert", None) or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: expected a BERT config with absolute positions, got model_type "
                         f"{hf.get('model_type')!r}, position_embedding_type {hf.get('position_embedding_type')!r}")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], max_len=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
            dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            activation=_ACTIVATIONS[act], pad_id=hf.get("pad_token_id", 0), pooler=pooler,
            num_labels=num_labels, span_head=span_head,
        )
    except KeyError as e:
        raise ValueError(f"{source}: BERT config lacks the field {e}") from e


def _our_name(name: str) -> str:
    name = re.sub(r"^bert\.", "", name)
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    for pattern, replacement in _RENAMES:
        renamed, n = re.subn("^" + pattern, replacement, name)
        if n:
            return renamed
    return name  # left as is: load_weights reports it as unexpected
