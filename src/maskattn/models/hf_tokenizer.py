"""Hugging Face tokenizers as transformers 5 builds them: ``tokenizer.json`` with the ``tokenizer_config.json``
settings that transformers' BertTokenizer, GPT2Tokenizer and LlamaTokenizer rebuild it with (used by
:func:`maskattn.models.from_pretrained`, so that a loaded tokenizer encodes as ``AutoTokenizer`` does).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from maskattn.io import FormatError
from maskattn.models.persistence import TOKENIZER, read_json

__all__ = ["as_transformers_tokenizes"]

logger = logging.getLogger(__name__)

_TOKENIZER_CONFIG = "tokenizer_config.json"
# the tokenizer class transformers' AutoTokenizer picks for a model_type when neither file names one
_TOKENIZER_CLASSES = {"bert": "BertTokenizer", "gpt2": "GPT2Tokenizer"}
# BertTokenizer's settings -> the BertNormalizer fields it sets from them
_BERT_FLAGS = {"do_lower_case": "lowercase", "tokenize_chinese_chars": "handle_chinese_chars",
               "strip_accents": "strip_accents"}


def as_transformers_tokenizes(backend: Any, directory: Path, hf: dict, model_type: str) -> None:
    """Set on ``backend`` (tokenizer.json as written) the tokenizer_config.json settings that transformers 5's
    tokenizer class rebuilds tokenizer.json with (BertTokenizer's lowercasing, Chinese characters and accents;
    GPT2Tokenizer's add_prefix_space; LlamaTokenizer's Metaspace, legacy and add_prefix_space), so that it encodes as
    AutoTokenizer does; one warning names the settings it cannot set (tokenizer.json of another form)."""
    path = directory / _TOKENIZER_CONFIG
    if not path.is_file():
        return
    settings = read_json(path)
    name = settings.get("tokenizer_class") or hf.get("tokenizer_class") or _TOKENIZER_CLASSES.get(model_type)
    rebuild = _REBUILDS.get(name.removesuffix("Fast")) if isinstance(name, str) else None
    if rebuild is None:  # TokenizersBackend / PreTrainedTokenizerFast (tokenizer.json as written), or unknown
        return
    unset, found = rebuild(backend, settings, (directory / TOKENIZER).read_text(encoding="utf-8"), path)
    if unset:
        logger.warning(f"{path}: {', '.join(f'{k}={v!r}' for k, v in unset.items())}: transformers' {name} applies "
                       f"{'these' if len(unset) > 1 else 'this'} over tokenizer.json, whose {found}; maskattn uses "
                       f"tokenizer.json as written, so the encoding may differ from transformers'")


def _flag(settings: dict, key: str, path: Path, *, none: bool = False) -> Any:
    value = settings[key]
    if not isinstance(value, bool) and not (none and value is None):
        raise FormatError(f"{path}: {key} must be true or false{' or null' if none else ''}, got {value!r}")
    return value


def _bert_rebuild(backend: Any, settings: dict, text: str, path: Path) -> tuple[dict, str]:
    """BertTokenizer builds a BertNormalizer from do_lower_case, tokenize_chinese_chars and strip_accents."""
    from tokenizers import normalizers

    held = {key: _flag(settings, key, path, none=key == "strip_accents") for key in _BERT_FLAGS if key in settings}
    normalizer = backend.normalizer
    if not isinstance(normalizer, normalizers.BertNormalizer):
        return held, f"normalizer is {type(normalizer).__name__ if normalizer is not None else 'none'}, not a " \
                     "BertNormalizer"
    fields = {f: getattr(normalizer, f) for f in ("clean_text", "handle_chinese_chars", "strip_accents", "lowercase")}
    backend.normalizer = normalizers.BertNormalizer(**{**fields, **{_BERT_FLAGS[k]: v for k, v in held.items()}})
    return {}, ""


def _gpt2_rebuild(backend: Any, settings: dict, text: str, path: Path) -> tuple[dict, str]:
    """GPT2Tokenizer builds a ByteLevel pre-tokenizer with add_prefix_space."""
    from tokenizers import pre_tokenizers

    if "add_prefix_space" not in settings:
        return {}, ""
    value = _flag(settings, "add_prefix_space", path)
    pre = backend.pre_tokenizer
    if not isinstance(pre, pre_tokenizers.ByteLevel):
        return {"add_prefix_space": value}, f"pre-tokenizer is {type(pre).__name__ if pre is not None else 'none'}, " \
                                            "not a ByteLevel"
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=value, trim_offsets=pre.trim_offsets,
                                                     use_regex=pre.use_regex)
    return {}, ""


def _llama_rebuild(backend: Any, settings: dict, text: str, path: Path) -> tuple[dict, str]:
    """LlamaTokenizer replaces tokenizer.json's normalizer (Prepend and Replace "▁", as transformers 4 converted
    SentencePiece) by a Metaspace pre-tokenizer that prepends "▁" to the first piece only (legacy false) or to each
    piece between special tokens (legacy true), or never (add_prefix_space false); its decoder strips that "▁"."""
    from tokenizers import decoders, models, pre_tokenizers

    if '"ByteLevel"' in text:  # AutoTokenizer then loads the file as written (TokenizersBackend), as it says
        return {}, ""
    model = backend.model
    if not (isinstance(model, models.BPE) and model.byte_fallback and model.fuse_unk):
        found = f"BPE (byte_fallback={model.byte_fallback}, fuse_unk={model.fuse_unk})" \
            if isinstance(model, models.BPE) else type(model).__name__
        return {"tokenizer_class": settings.get("tokenizer_class", "LlamaTokenizer")}, \
            f"model is a {found}, where LlamaTokenizer builds a BPE with byte_fallback and fuse_unk on"
    prefix = settings.get("add_prefix_space")
    prefix = True if prefix is None else prefix  # truthiness, as LlamaTokenizer and _get_prepend_scheme test them
    scheme = ("always" if settings.get("legacy", False) else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    strip = [decoders.Strip(content=" ", left=1)] if prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return {}, ""


_REBUILDS = {"BertTokenizer": _bert_rebuild, "GPT2Tokenizer": _gpt2_rebuild, "LlamaTokenizer": _llama_rebuild}
