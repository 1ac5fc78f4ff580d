"""Load Hugging Face checkpoints (config.json + model.safetensors + tokenizer.json) into maskattn's
own models: BERT into :class:`EncoderModel`, GPT-2 and Llama into :class:`DecoderLM`. Reads a local
directory only; never downloads.

Each supported ``model_type`` registers one :class:`Family` record in :data:`FAMILIES`: how to read
its config, which prefix to strip, how to reshape its tensors, and a table of renames.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskattn.io import FormatError
from maskattn.models.config import BlockConfig, DecoderLMConfig, EncoderConfig
from maskattn.models.decoder_lm import DecoderLM
from maskattn.models.encoder_model import EncoderModel
from maskattn.models.hf_tokenizer import as_transformers_tokenizes
from maskattn.models.persistence import (
    CONFIG,
    FORMAT,
    TOKENIZER,
    WEIGHTS,
    check_shapes,
    check_tokenizer,
    in_saved_dtype,
    load,
    load_tokenizer,
    load_weights,
    read_json,
    read_safetensors,
    refuse_broken_link,
    refuse_run_directory,
)

logger = logging.getLogger(__name__)

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# Hugging Face BERT parameter names (after the prefix "bert.") -> ours ("{i}" is the layer index).
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

# GPT-2 (after the prefix "transformer."; c_attn already split into c_attn_q/k/v by _gpt2_tensors).
_GPT2_RENAMES = [
    (r"wte\.", "embed.tokens."),
    (r"wpe\.", "embed.positions."),
    (r"h\.(\d+)\.ln_1\.", r"decoder.layers.\1.self_attn_block.norm."),
    *[(rf"h\.(\d+)\.attn\.c_attn_{p}\.", rf"decoder.layers.\1.self_attn.{p}_proj.") for p in "qkv"],
    (r"h\.(\d+)\.attn\.c_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"h\.(\d+)\.ln_2\.", r"decoder.layers.\1.ffn_block.norm."),
    (r"h\.(\d+)\.mlp\.c_fc\.", r"decoder.layers.\1.ffn.up."),
    (r"h\.(\d+)\.mlp\.c_proj\.", r"decoder.layers.\1.ffn.down."),
    (r"ln_f\.", "decoder.norm."),
]

# Llama (after the prefix "model.").
_LLAMA_RENAMES = [
    (r"embed_tokens\.", "embed.tokens."),
    *[(rf"layers\.(\d+)\.self_attn\.{p}_proj\.", rf"decoder.layers.\1.self_attn.{p}_proj.") for p in "qkv"],
    (r"layers\.(\d+)\.self_attn\.o_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"layers\.(\d+)\.input_layernorm\.", r"decoder.layers.\1.self_attn_block.norm."),
    (r"layers\.(\d+)\.post_attention_layernorm\.", r"decoder.layers.\1.ffn_block.norm."),
    (r"layers\.(\d+)\.mlp\.gate_proj\.", r"decoder.layers.\1.ffn.gate."),
    (r"layers\.(\d+)\.mlp\.up_proj\.", r"decoder.layers.\1.ffn.up."),
    (r"layers\.(\d+)\.mlp\.down_proj\.", r"decoder.layers.\1.ffn.down."),
    (r"norm\.", "decoder.norm."),
]


@dataclass(frozen=True)
class Family:
    """How one Hugging Face ``model_type`` maps onto a maskattn model.

    Attributes:
        config: ``(hf config dict, its path, options)`` -> our config; ``options`` are from_pretrained's
            keyword arguments (``num_labels``, ``span_head``), refused by families without heads.
        model: the maskattn model class built from that config.
        renames: ``(regex, replacement)`` pairs, HF name (prefix stripped) -> ours; the first match wins.
        prefix: stripped from every HF name first (the base model's attribute, e.g. ``"bert."``).
        ignored: HF tensors that are buffers, not weights.
        tensors: reshapes HF tensors before renaming (GPT-2's Conv1D and fused q/k/v).
        finish: adjusts the config to the tensors present (BERT: whether there is a pooler).
        fresh: prefixes of our parameters that stay freshly initialised (task heads).
    """

    config: Callable[[dict, Path, dict[str, Any]], BlockConfig]
    model: type[nn.Module]
    renames: list[tuple[str, str]]
    prefix: str = ""
    ignored: re.Pattern | None = None
    tensors: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda tensors: tensors
    finish: Callable[[BlockConfig, dict[str, Tensor]], BlockConfig] = lambda config, tensors: config
    fresh: tuple[str, ...] = field(default=())
    heads: re.Pattern | None = None  # the checkpoint's own task heads: not loaded, named in a warning


def from_pretrained(path: str | os.PathLike, *, num_labels: int = 0, span_head: bool = False) -> nn.Module:
    """A maskattn model from a local checkpoint directory, with ``model.tokenizer`` set, in evaluation mode (as
    transformers' ``from_pretrained`` returns it: no dropout; a trainer turns training mode on for itself) and in the
    float dtype of its weights (a bfloat16 checkpoint gives a bfloat16 model, as transformers 5 loads it).

    Args:
        path: a directory with a Hugging Face ``config.json`` and ``model.safetensors`` (or the shards that
            ``model.safetensors.index.json`` lists) of a family in
            :data:`FAMILIES` (BERT -> :class:`EncoderModel`; GPT-2, Llama -> :class:`DecoderLM`),
            ``tokenizer.json`` optional; or a directory written by ``model.save``.
        num_labels: (BERT, or a saved EncoderModel) a freshly initialised classification head with this
            many classes (a saved model's own heads are replaced).
        span_head: (BERT, or a saved EncoderModel) a freshly initialised span (start/end) head for
            extractive QA.

    ``model.tokenizer`` is ``tokenizer.json`` as written, with the ``tokenizer_config.json`` settings that
    transformers 5's tokenizer class applies over it set as transformers sets them, so that it encodes as
    ``AutoTokenizer`` does: BertTokenizer's ``do_lower_case``, ``tokenize_chinese_chars`` and ``strip_accents`` (on
    the BertNormalizer), GPT2Tokenizer's ``add_prefix_space`` (on the ByteLevel pre-tokenizer), and LlamaTokenizer's
    Metaspace pre-tokenizer (after ``legacy`` and ``add_prefix_space``) in place of the Prepend / Replace normalizer.
    A setting it cannot set that way (a tokenizer.json of another form) is named in one warning: the encoding may
    then differ from transformers'.

    Raises:
        ValueError: when the directory is not a checkpoint of a supported family, or its tensors do
            not fit it.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"from_pretrained(path): {str(path)!r} is not a local directory (nothing is downloaded)")
    refuse_run_directory(directory, CONFIG)  # RUN for RUN/model: "RUN/config.json: file not found" before
    hf = read_json(directory / CONFIG)
    if hf.get("format") == FORMAT:
        return _with_heads(load(directory), directory, num_labels=num_labels, span_head=span_head).eval()
    model_type = hf.get("model_type") or "bert"
    if not isinstance(model_type, str) or model_type not in FAMILIES:  # a list: "unhashable type"
        raise ValueError(f"{directory / CONFIG}: model_type {model_type!r} is not supported; expected one of "
                         f"{sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    options = {k: v for k, v in {"num_labels": num_labels, "span_head": span_head}.items() if v}
    config = family.config(hf, directory / CONFIG, options)
    source, tensors = _hf_weights(directory)
    try:
        tensors = family.tensors(tensors)
    except FormatError as e:  # the family's reshaping names the tensor; the file is named here
        raise FormatError(f"{source}: {e}") from e
    heads = sorted(n for n in tensors if family.heads is not None and family.heads.search(n))
    if heads:  # a fine-tuned checkpoint's classifier is not maskattn's fresh head: say so
        logger.warning(f"{source}: the checkpoint's own heads are not loaded ({', '.join(heads[:4])}"
                       f"{' ...' if len(heads) > 4 else ''}); the encoder is, and heads asked for start fresh")
    tensors = {_our_name(name, family): t for name, t in tensors.items()
               if not any(p is not None and p.search(name) for p in (family.ignored, family.heads))}
    config = family.finish(config, tensors)
    config = _untied_if_stored_apart(config, tensors, directory / CONFIG)
    aliases = {"lm_head.weight": "embed.tokens.weight"} if getattr(config, "tie_output", False) else {}
    tensors = {n: t for n, t in tensors.items() if n not in aliases}
    # before building: a config.json of 10^9 layers or a hidden_size of 10^9 is named, not run out of memory on
    check_shapes(family.model, config, {n: tuple(t.shape) for n, t in tensors.items()}, aliases,
                 source=directory / CONFIG, weights=source.name)
    model = in_saved_dtype(family.model(config), tensors)  # a bf16 checkpoint loads as bf16, as transformers'
    fresh = {n: t for n, t in model.state_dict().items() if family.fresh and n.startswith(family.fresh)}
    load_weights(model, {**tensors, **fresh}, aliases, source=str(source))
    # lexists, not is_file: a directory or a broken link in its place is named, not skipped (as load() does)
    model.tokenizer = load_tokenizer(directory / TOKENIZER) if os.path.lexists(directory / TOKENIZER) else None
    check_tokenizer(config, model.tokenizer, source=directory / TOKENIZER)  # as load() does: not at a run's save
    if model.tokenizer is not None:
        as_transformers_tokenizes(model.tokenizer, directory, hf, model_type)
    return model.eval()


_INDEX = WEIGHTS + ".index.json"  # what save_pretrained writes beside the shards of a large checkpoint


def _hf_weights(directory: Path) -> tuple[Path, dict[str, Tensor]]:
    """``(the file that lists them, the tensors)`` of an HF directory: ``model.safetensors``, or the shards named
    in ``model.safetensors.index.json`` (``save_pretrained`` beyond ``max_shard_size``)."""
    if (directory / WEIGHTS).is_file() or not (directory / _INDEX).is_file():
        if not (directory / WEIGHTS).is_file():
            refuse_broken_link(directory / WEIGHTS)
            refuse_broken_link(directory / _INDEX)
            raise FormatError(f"{directory}: no {WEIGHTS} nor {_INDEX} (maskattn reads safetensors weights only; "
                              f"found {sorted(p.name for p in directory.iterdir())})")
        return directory / WEIGHTS, read_safetensors(directory / WEIGHTS)
    shards = read_json(directory / _INDEX).get("weight_map")
    if not isinstance(shards, dict) or not shards:
        raise FormatError(f"{directory / _INDEX}: no weight_map of tensor names to shard files")
    odd = sorted({f"{name}: {f!r}" for name, f in shards.items() if not isinstance(f, str) or not f})
    if odd:  # a list or null: "unhashable type: 'list'", or "files outside its directory: ['None']"
        raise FormatError(f"{directory / _INDEX}: weight_map values must be shard file names, got {odd[:3]}")
    outside = sorted(f for f in set(shards.values()) if Path(f).name != f)
    if outside:  # the index names files in its own directory, nothing else is read
        raise FormatError(f"{directory / _INDEX}: weight_map names files outside its directory: {outside[:3]}")
    tensors: dict[str, Tensor] = {}
    held: dict[str, str] = {}
    for shard in sorted(set(shards.values())):
        more = read_safetensors(directory / shard)
        twice = sorted(set(more) & set(tensors))
        if twice:  # which copy counts is a guess: the later shard's won silently
            raise FormatError(f"{directory / shard}: holds {twice[:3]}{' ...' if len(twice) > 3 else ''}, which "
                              f"{held[twice[0]]} holds too; each tensor belongs in one shard")
        held.update(dict.fromkeys(more, shard))
        tensors.update(more)
    return directory / _INDEX, tensors


def _untied_if_stored_apart(config: BlockConfig, tensors: dict[str, Tensor], source: Path) -> BlockConfig:
    """``config`` untied when it says ``tie_word_embeddings`` but the checkpoint holds an output projection of its own
    that differs from the token table: transformers (5) then keeps the two apart, and so do we (tying would drop the
    stored projection, and the logits would differ from theirs), with its warning."""
    out, table = tensors.get("lm_head.weight"), tensors.get("embed.tokens.weight")
    if not getattr(config, "tie_output", False) or out is None or table is None:
        return config
    if torch.equal(out, table):
        return config
    logger.warning(f"{source}: tie_word_embeddings is true, but the weights hold an lm_head.weight that differs from "
                   "the token embeddings; they are kept apart, as transformers does")
    return dataclasses.replace(config, tie_output=False)


def pretrained_positions(path: str | os.PathLike) -> int | None:
    """How many positions the checkpoint in ``path`` covers (read from its config, without loading weights);
    None when it has no config or its config does not say (or says other than a positive int, which
    :func:`from_pretrained` names: a ``"512"`` was compared with an int, a TypeError traceback)."""
    if not (Path(path) / CONFIG).is_file():
        return None
    hf = read_json(Path(path) / CONFIG)
    if hf.get("format") == FORMAT:
        config = hf.get("config")
        value = config.get("max_len") if isinstance(config, dict) else None
    else:
        value = hf.get("max_position_embeddings")
    return value if _positive_int(value) else None


def _with_heads(model: nn.Module, directory: Path, *, num_labels: int, span_head: bool) -> nn.Module:
    """A saved maskattn model as the start of fine-tuning: unchanged when no head is asked for; else its
    encoder with fresh heads (``num_labels`` classes, a span head), which needs an EncoderModel."""
    if not (num_labels or span_head):
        return model
    if not isinstance(model, EncoderModel):
        raise ValueError(f"{directory} holds a {type(model).__name__}; a classification or span head needs an "
                         "encoder: an EncoderModel directory (e.g. one trained by `maskattn train classification`) "
                         "or a BERT checkpoint")
    heads = FAMILIES["bert"].fresh
    fine_tuned = EncoderModel(dataclasses.replace(model.config, num_labels=num_labels, span_head=span_head))
    encoder = {n: t for n, t in model.state_dict().items() if not n.startswith(heads)}
    result = fine_tuned.load_state_dict(encoder, strict=False)
    assert not result.unexpected_keys and all(n.startswith(heads) for n in result.missing_keys), result
    fine_tuned.tokenizer = model.tokenizer
    return fine_tuned


def bert_config(hf: dict, source: Path, *, pooler: bool = True, num_labels: int = 0,
                span_head: bool = False) -> EncoderConfig:
    """The :class:`EncoderConfig` of a Hugging Face BERT ``config.json``."""
    if hf.get("model_type") not in ("bert", None) or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: expected a BERT config with absolute positions, got model_type "
                         f"{hf.get('model_type')!r}, position_embedding_type {hf.get('position_embedding_type')!r}")
    act = hf.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    # a causal BERT (BertLMHeadModel) would load as the bidirectional EncoderModel, with other hidden states
    _refuse(source, {"is_decoder": hf.get("is_decoder"), "add_cross_attention": hf.get("add_cross_attention")}, hf)
    try:
        config = _build(
            EncoderConfig, source,
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], max_len=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
            dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            activation=_ACTIVATIONS[act], pad_id=hf.get("pad_token_id", 0), pooler=pooler,
        )
    except KeyError as e:
        raise ValueError(f"{source}: BERT config lacks the field {e}") from e
    # the heads are the caller's arguments, not the file's settings: a bad one is not the file's FormatError
    return dataclasses.replace(config, num_labels=num_labels, span_head=span_head)


def gpt2_config(hf: dict, source: Path, options: dict[str, Any] | None = None) -> DecoderLMConfig:
    """The :class:`DecoderLMConfig` of a Hugging Face GPT-2 ``config.json``."""
    _no_options("GPT-2", source, options)
    act = hf.get("activation_function", "gelu_new")
    known = isinstance(act, str) and act in _ACTIVATIONS  # a list: "unhashable type"
    refused = {"activation_function": not known, "add_cross_attention": hf.get("add_cross_attention"),
               "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx"),
               "scale_attn_weights": not hf.get("scale_attn_weights", True)}
    _refuse(source, refused, hf)
    d_model = _field(hf, "n_embd", source)
    return _build(
        DecoderLMConfig, source, vocab_size=_field(hf, "vocab_size", source), d_model=d_model,
        num_heads=_field(hf, "n_head", source),
        d_ff=hf.get("n_inner") or 4 * d_model, num_layers=_field(hf, "n_layer", source),
        max_len=_field(hf, "n_positions", source), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
        activation=_ACTIVATIONS[act], positions="learned", norm_first=True, bias=True,
        tie_output=hf.get("tie_word_embeddings", True), eos_id=_token(hf, "eos_token_id"),
    )


def llama_config(hf: dict, source: Path, options: dict[str, Any] | None = None) -> DecoderLMConfig:
    """The :class:`DecoderLMConfig` of a Hugging Face Llama ``config.json`` (RMSNorm, RoPE, SwiGLU)."""
    _no_options("Llama", source, options)
    d_model, heads = _field(hf, "hidden_size", source), _field(hf, "num_attention_heads", source)
    # as transformers 5 reads them: rope_scaling (transformers 4's name) over rope_parameters, the theta from the
    # one read, else the top level's, else 10,000
    rope_field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(rope_field) or {}
    if not isinstance(rope, dict):  # "'str' object has no attribute 'get'"
        raise FormatError(f"{source}: {rope_field} must be a JSON object, got {rope!r}")
    # a head count of 0 or "4" is named by DecoderLMConfig below, not divided by here (ZeroDivisionError, TypeError)
    head_dim = d_model // heads if _positive_int(d_model) and _positive_int(heads) else None
    refused = {"hidden_act": hf.get("hidden_act", "silu") != "silu", "attention_bias": hf.get("attention_bias"),
               "mlp_bias": hf.get("mlp_bias"),  # transformers 4's configs name the scaling "type", 5's "rope_type"
               rope_field: rope.get("rope_type", rope.get("type", "default")) != "default",
               "head_dim": head_dim is not None and hf.get("head_dim") not in (None, head_dim)}  # null: the default
    _refuse(source, refused, hf)
    bos, eos = _token(hf, "bos_token_id"), _token(hf, "eos_token_id")
    return _build(
        DecoderLMConfig, source, vocab_size=_field(hf, "vocab_size", source), d_model=d_model, num_heads=heads,
        num_kv_heads=heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"],  # 0: refused
        d_ff=_field(hf, "intermediate_size", source),
        num_layers=_field(hf, "num_hidden_layers", source), max_len=_field(hf, "max_position_embeddings", source),
        norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), dropout=0.0,
        attention_dropout=hf.get("attention_dropout", 0.0), activation="swiglu", positions="rope",
        rope_base=_float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm_first=True, bias=False,
        tie_output=hf.get("tie_word_embeddings", False), bos_id=bos if bos != eos else None, eos_id=eos,
    )


def _gpt2_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT-2's Conv1D stores (in, out) weights: transpose them to Linear's (out, in); split the fused
    (E, 3E) query/key/value projection ``c_attn`` into three."""
    out = {}
    for name, t in tensors.items():
        stored = tuple(t.shape)
        if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            if t.ndim != 2:  # torch's "t() expects a tensor with <= 2 dimensions"
                raise FormatError(f"tensor {name!r} is {stored}; expected a 2-D Conv1D weight")
            t = t.t()
        if ".c_attn." in name:
            if t.ndim == 0 or t.shape[0] % 3:  # unequal chunks would be blamed on config.json's sizes
                raise FormatError(f"tensor {name!r} is {stored}; expected query, key and value fused along its "
                                  "last dimension, a multiple of 3")
            for part, piece in zip("qkv", t.chunk(3, dim=0), strict=True):
                out[name.replace(".c_attn.", f".c_attn_{part}.")] = piece.contiguous()
        else:
            out[name] = t.contiguous()
    return out


def _bert_config(hf: dict, source: Path, options: dict[str, Any]) -> EncoderConfig:
    return bert_config(hf, source, **options)


def _no_options(family: str, source: Path, options: dict[str, Any] | None) -> None:
    if options:
        raise ValueError(f"{source}: {sorted(options)} add heads to BERT encoders; a {family} checkpoint "
                         "loads as a DecoderLM, which has none")


def _refuse(source: Path, refused: dict[str, Any], hf: dict) -> None:
    bad = [name for name, is_bad in refused.items() if is_bad]
    if bad:
        raise ValueError(f"{source}: unsupported settings {', '.join(f'{n}={hf.get(n)!r}' for n in bad)}")


def _build(cls: type[BlockConfig], source: Path, **values: Any) -> Any:
    """``cls(**values)``, the values read from the Hugging Face config ``source``; a value the config refuses is a
    FormatError naming that file (the message names maskattn's setting, e.g. num_heads for n_head)."""
    try:
        return cls(**values)
    except ValueError as e:
        raise FormatError(f"{source}: its settings make no valid {cls.__name__}: {e}") from e


def _field(hf: dict, name: str, source: Path) -> Any:
    if name not in hf:
        raise ValueError(f"{source}: config lacks the field {name!r}")
    return hf[name]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _float(value: Any) -> Any:
    """A number as a float; anything else as it is, for the config to refuse by name ("abc", None: float()'s
    ValueError / TypeError named no file)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _token(hf: dict, name: str) -> int | None:
    """A special token id when it is a single id inside the vocabulary, else None."""
    value = hf.get(name)
    return value if isinstance(value, int) and 0 <= value < hf.get("vocab_size", 0) else None


FAMILIES: dict[str, Family] = {
    "bert": Family(config=_bert_config, model=EncoderModel, renames=_RENAMES, prefix="bert.",
                   ignored=re.compile(r"embeddings\.position_ids$"),  # a constant buffer, not a weight
                   # pre-training (cls.*) and task heads of released checkpoints: maskattn's own heads start fresh
                   heads=re.compile(r"^cls\.|^classifier\.|^qa_outputs\."),
                   finish=lambda config, tensors: dataclasses.replace(config, pooler="pooler.weight" in tensors),
                   fresh=("classifier.", "span_head.")),
    "gpt2": Family(config=gpt2_config, model=DecoderLM, renames=_GPT2_RENAMES, prefix="transformer.",
                   ignored=re.compile(r"\.attn\.(masked_)?bias$"), tensors=_gpt2_tensors),
    "llama": Family(config=llama_config, model=DecoderLM, renames=_LLAMA_RENAMES, prefix="model.",
                    ignored=re.compile(r"rotary_emb\.inv_freq$")),
}
"""Hugging Face ``model_type`` -> how to load it. Add a family by adding a record."""


def _our_name(name: str, family: Family) -> str:
    if family.prefix and name.startswith(family.prefix):
        name = name[len(family.prefix):]
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    for pattern, replacement in family.renames:
        renamed, n = re.subn("^" + pattern, replacement, name)
        if n:
            return renamed
    return name  # left as is: load_weights reports it as unexpected
