"""Tokenisers, built on Hugging Face ``tokenizers``: BPE and character-level, trained here, or loaded.

Every tokenizer is saved as one ``tokenizer.json`` (the ``tokenizers`` format), so a checkpoint
carries it and any tool that reads that format can use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from maskattn.io import FormatError, atomic_write

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
# Special-token names by convention: ours first, then BERT's (for pretrained tokenizer.json files).
CONVENTIONS = (
    {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"},
    {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]"},
)


class Tokenizer:
    """Text <-> ids, with the pad / unk / bos / eos ids that models and batching need.

    Args:
        backend: a ``tokenizers.Tokenizer``.
    """

    def __init__(self, backend: HFTokenizer) -> None:
        # Lengths are maskattn's business: a pretrained tokenizer.json may carry truncation (all-MiniLM's
        # cuts at 128 tokens) or padding settings that would silently clip contexts.
        backend.no_truncation()
        backend.no_padding()
        # "<s>" or "</s>" written in a text is text: never the BOS / EOS ids (which then cut decoding short)
        backend.encode_special_tokens = True
        self.backend = backend
        vocab = backend.get_vocab()
        names = next((c for c in CONVENTIONS if all(t in vocab for t in c.values())), None)
        if names is None:
            raise ValueError(
                "tokenizer has no complete set of special tokens; expected one of "
                f"{[list(c.values()) for c in CONVENTIONS]}"
            )
        self.specials = names
        self.pad_id, self.unk_id = vocab[names["pad"]], vocab[names["unk"]]
        self.bos_id, self.eos_id = vocab[names["bos"]], vocab[names["eos"]]

    # --- building ----------------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-pair-encoding tokenizer (NFKC, SentencePiece-style word boundaries).

        Every character of ``texts`` is kept, so the vocabulary passes ``vocab_size`` when the texts hold more
        distinct characters than that; it may stay below it when no pair occurs ``min_frequency`` times.

        Raises:
            ValueError: ``texts`` given as one str (each character would train as a text of its own),
                ``vocab_size`` not an int >= 4 or ``min_frequency`` not an int >= 0, naming the argument.
        """
        if isinstance(texts, (str, bytes)):
            raise ValueError(f"texts must be an iterable of texts, got a {type(texts).__name__} "
                             f"(give one text as [text])")
        if type(vocab_size) is not int or vocab_size < len(SPECIALS):
            raise ValueError(f"vocab_size must be an int >= {len(SPECIALS)} (the {len(SPECIALS)} special tokens), "
                             f"got {vocab_size!r}")
        if type(min_frequency) is not int or min_frequency < 0:
            raise ValueError(f"min_frequency must be an int >= 0, got {min_frequency!r}")
        backend = HFTokenizer(models.BPE(unk_token="<unk>"))
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS), show_progress=False
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def train_chars(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per character seen in ``texts`` (sorted, so the ids are deterministic)."""
        chars = sorted({c for text in texts for c in text})
        vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
        backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(list(SPECIALS))
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or the one inside a directory."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}: no such file or directory")
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises its own exception type
            raise FormatError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from e
        try:
            return cls(backend)
        except ValueError as e:  # no special tokens maskattn knows (a GPT-2 tokenizer's <|endoftext|> alone)
            raise FormatError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory); return the file written."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        atomic_write(path, lambda tmp: self.backend.save(str(tmp)))
        return path

    # --- using -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        encoded = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id] * bos + e.ids + [self.eos_id] * eos for e in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text, dropping special tokens and stopping at the first eos."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.backend.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.backend.model).__name__}, vocab_size={self.vocab_size})"


def decode_continuation(decode: Callable[[list[int]], str], before: Sequence[int], new: Sequence[int]) -> str:
    """The text of the ids ``new`` that follow ``before``, as it reads after the text of ``before``.

    Decoded with what precedes it: a BPE / SentencePiece decoder drops a token's leading space at the start
    of a text, so "To" + decode(["▁be"]) would read "Tobe"."""
    head, whole = decode(list(before)), decode([*before, *new])
    return whole[len(head):] if whole.startswith(head) else decode(list(new))
