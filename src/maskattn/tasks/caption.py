"""Captioning real handwritten digits with masked cross-attention: ``maskattn train caption``.

Images in, text out. The 1,797 real 8x8 scans of scikit-learn's bundled ``load_digits`` (no
download) are split into train / validation / test *first* (stratified, from ``data.split_seed``),
so test canvases are made only of scans never seen in training. A canvas holds 2 to 4 scans at
random positions, side by side without overlap, on a canvas whose height and width vary (multiples
of the model's patch size, so a batch pads whole patches); its caption names the digits left to
right: ``"seven three one"``. Training canvases are drawn afresh for every index (an endless,
deterministic stream); validation and test canvases are fixed sets drawn from ``data.canvas_seed``.

Model: :class:`~maskattn.models.Captioner` (patch encoder + the Transformer's decoder). Scores:
exact match of whole captions, word accuracy, and the **alignment**: the share of generated digit
words whose cross-attention (last decoder layer, mean of the heads, at the query that produced the
word) puts more than half of its mass on the patches of the digit that word should name.

Shape legend: B batch, H heads, Lt caption length, N patches, R x K patch grid.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from maskattn import decoding, explorer
from maskattn.data import DataError, pad, read_parallel
from maskattn.errors import SettingError, check_settings
from maskattn.io import atomic_write, check_output_file
from maskattn.models import Captioner, CaptionerConfig
from maskattn.tasks.base import Command, Overlay, Task, register
from maskattn.tasks.common import begin_run, fit_and_export, load_task, log_stderr, parameters
from maskattn.tasks.translation import sequence_loss
from maskattn.tokenization import SPECIALS, Tokenizer
from maskattn.training import TrainConfig, to_device

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SCAN = 8  # side of a scan, in pixels
SPLITS = ("train", "valid", "test")


@dataclass
class DataConfig:
    valid_fraction: float = 0.15  # share of the scans (of each digit) kept for validation canvases
    test_fraction: float = 0.15  # share kept for test canvases (scored once, by `maskattn evaluate`)
    split_seed: int = 0  # seeds the split of the scans
    min_digits: int = 2  # digits per canvas, at least
    max_digits: int = 4  # and at most
    max_height: int = 16  # canvas height in pixels: a multiple of model.patch_size from 8 up to this
    max_width: int = 48  # canvas width: a multiple of model.patch_size from 8 * digits up to this
    batch_size: int = 64  # canvases per training batch
    epoch_canvases: int = 8192  # training canvases per epoch (each drawn afresh from the training scans)
    valid_canvases: int = 500  # validation canvases (scored at each evaluation)
    test_canvases: int = 1000  # test canvases (`maskattn evaluate MODEL --data test`)
    canvas_seed: int = 1  # seeds the validation and test canvases

    def __post_init__(self) -> None:
        check_settings(self, {"min_digits": ("int>=", 1), "max_digits": ("int>=", 1), "max_height": ("int>=", 1),
                              "max_width": ("int>=", 1), "batch_size": ("int>=", 1), "epoch_canvases": ("int>=", 1),
                              "split_seed": ("seed", None), "canvas_seed": ("seed", None)})
        if self.max_digits < self.min_digits:  # else numpy's "low >= high" when the first canvas is drawn
            raise SettingError(f"max_digits ({self.max_digits}) must be >= min_digits ({self.min_digits})")


@dataclass
class CaptionConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: CaptionerConfig = field(default_factory=lambda: CaptionerConfig.preset("digits"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, lr=1e-3, schedule="cosine", warmup=100, eval_every=500, metric="exact_match",
        higher_is_better=True))
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    out: str = "runs/caption"  # run directory


# --- data ------------------------------------------------------------------------------------------
@functools.cache
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scans of ``sklearn.datasets.load_digits``: (1797, 8, 8) float32 in [0, 1] and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the caption task reads scikit-learn's bundled digits: "
                          "pip install 'maskattn[caption]'") from e
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_scans(labels: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Scan indices of each split, ``{"train", "valid", "test"}``: disjoint, stratified by digit,
    deterministic in ``data.split_seed``."""
    if not (cfg.valid_fraction > 0 and cfg.test_fraction > 0 and cfg.valid_fraction + cfg.test_fraction < 1):
        raise ValueError(f"data.valid_fraction ({cfg.valid_fraction}) and data.test_fraction "
                         f"({cfg.test_fraction}) must be > 0 with a sum below 1")
    rng = np.random.default_rng(cfg.split_seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for digit in range(len(NAMES)):
        scans = rng.permutation(np.flatnonzero(labels == digit))
        n_valid, n_test = round(len(scans) * cfg.valid_fraction), round(len(scans) * cfg.test_fraction)
        parts["valid"].append(scans[:n_valid])
        parts["test"].append(scans[n_valid : n_valid + n_test])
        parts["train"].append(scans[n_valid + n_test :])
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


@dataclass(frozen=True)
class Canvas:
    """One captioned image: the pixels, and where each digit is."""

    image: np.ndarray  # (height, width) float32 in [0, 1]
    scans: tuple[int, ...]  # the scans placed, left to right (indices into load_scans())
    digits: tuple[int, ...]  # their labels, left to right
    boxes: tuple[tuple[int, int], ...]  # (top, left) of each SCAN x SCAN scan, left to right

    @property
    def caption(self) -> str:
        return " ".join(NAMES[d] for d in self.digits)


def compose(rng: np.random.Generator, pool: np.ndarray, cfg: DataConfig, multiple: int) -> Canvas:
    """A canvas of ``data.min_digits``..``max_digits`` distinct scans of ``pool`` at random positions,
    side by side (no two overlap in x), its sides multiples of ``multiple`` (the patch size)."""
    images, labels = load_scans()
    n = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    heights = range(-(-SCAN // multiple) * multiple, cfg.max_height + 1, multiple)
    widths = range(-(-n * SCAN // multiple) * multiple, cfg.max_width + 1, multiple)
    if not heights or not widths or n < 1:
        raise ValueError(f"no canvas of {n} scans fits data.max_height ({cfg.max_height}) x data.max_width "
                         f"({cfg.max_width}) in multiples of {multiple}")
    height, width = int(rng.choice(heights)), int(rng.choice(widths))
    scans = rng.choice(pool, size=n, replace=False)
    cuts = np.sort(rng.integers(0, width - n * SCAN + 1, size=n))  # the free columns before each scan
    lefts = cuts + SCAN * np.arange(n)
    tops = rng.integers(0, height - SCAN + 1, size=n)
    image = np.zeros((height, width), dtype=np.float32)
    for scan, top, left in zip(scans, tops, lefts, strict=True):
        image[top : top + SCAN, left : left + SCAN] = images[scan]
    return Canvas(image, tuple(int(s) for s in scans), tuple(int(labels[s]) for s in scans),
                  tuple((int(t), int(x)) for t, x in zip(tops, lefts, strict=True)))


def canvas(split: str, index: int, pools: dict[str, np.ndarray], cfg: DataConfig, multiple: int, seed: int) -> Canvas:
    """Canvas ``index`` of ``split``: the same for the same (seed, split, index), whatever else is drawn."""
    return compose(np.random.default_rng([seed, SPLITS.index(split), index]), pools[split], cfg, multiple)


def canvases(split: str, count: int, cfg: DataConfig, multiple: int) -> list[Canvas]:
    """The fixed evaluation canvases of ``split`` (drawn from ``data.canvas_seed``)."""
    pools = split_scans(load_scans()[1], cfg)
    return [canvas(split, i, pools, cfg, multiple, cfg.canvas_seed) for i in range(count)]


def build_tokenizer() -> Tokenizer:
    """One token per digit name, after the special tokens (<pad> 0, <unk> 1, <s> 2, </s> 3)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    backend = HFTokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIALS, *NAMES])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIALS))
    return Tokenizer(backend)


def batch_images(images: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """(B, Hc, Wc) canvases padded at the bottom and right with background, and their (B, 2) sizes."""
    sizes = torch.tensor([im.shape for im in images], dtype=torch.long)  # (B, 2)
    out = torch.zeros(len(images), int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = torch.from_numpy(im)
    return out, sizes


def collate(tok: Tokenizer, batch: Sequence[Canvas]) -> dict[str, Any]:
    images, sizes = batch_images([c.image for c in batch])
    words = tok.encode_batch([c.caption for c in batch])
    tgt_in, tgt_len = pad([[tok.bos_id, *w] for w in words], tok.pad_id)  # (B, Lt)
    tgt_out, _ = pad([[*w, tok.eos_id] for w in words], tok.pad_id)  # (B, Lt)
    return {"images": images, "sizes": sizes, "tgt_in": tgt_in, "tgt_lengths": tgt_len, "tgt_out": tgt_out,
            "num_targets": int(tgt_len.sum())}


# --- captions, attention and scores ----------------------------------------------------------------
def caption_batch(model: Captioner, tok: Tokenizer, images: Sequence[np.ndarray],
                  ) -> tuple[list[str], list[dict[str, Tensor]], Tensor]:
    """Greedy captions of ``images``, and the decoder's attention while it wrote them: per layer
    ``{"self", "cross": (B, H, Lt, N)}`` (query t produced word t), and the (B, 2) sizes."""
    weight = next(model.parameters())  # float32 pixels in the model's dtype: one saved after .to(bfloat16) too
    batch, sizes = batch_images(images)
    batch, device = batch.to(weight.dtype), weight.device
    ids = decoding.greedy(model, batch.to(device), sizes.to(device), max_new_tokens=model.config.max_len - 1)
    captions = [tok.decode(row.tolist()) for row in ids]
    tgt, lengths = pad([[tok.bos_id, *tok.encode(c)] for c in captions], tok.pad_id)
    with torch.no_grad():
        _, weights = model(batch.to(device), tgt.to(device), sizes=sizes.to(device), tgt_lengths=lengths.to(device),
                           return_weights=True)
    return captions, to_device(weights["decoder"], "cpu"), sizes


def patch_owners(boxes: Sequence[tuple[int, int]], grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Which digit each patch of an (R, K) grid belongs to, (N,) ints (row-major): the index (left to
    right) of the digit whose box covers most of the patch's pixels; -1 where none covers any."""
    rows, cols = grid
    cover = np.zeros((len(boxes), rows, cols))
    starts_r, starts_c = np.arange(rows) * patch_size, np.arange(cols) * patch_size
    for j, (top, left) in enumerate(boxes):
        dr = np.clip(np.minimum(starts_r + patch_size, top + SCAN) - np.maximum(starts_r, top), 0, None)  # (R,)
        dc = np.clip(np.minimum(starts_c + patch_size, left + SCAN) - np.maximum(starts_c, left), 0, None)  # (K,)
        cover[j] = dr[:, None] * dc[None, :]
    owners = cover.argmax(axis=0) if len(boxes) else np.zeros((rows, cols), dtype=int)
    return np.where(cover.max(axis=0, initial=0) > 0, owners, -1).reshape(-1)


def aligned_words(cross: Tensor, owners: np.ndarray, words: int) -> list[bool]:
    """For each of the first ``words`` generated words, whether its cross-attention ``cross`` (Lt, N)
    (row t produced word t) puts more than half of its mass on the patches of digit t (left to right);
    a word past the last digit is not aligned."""
    owners_t = torch.as_tensor(owners)
    return [bool(cross[t, owners_t == t].sum() > 0.5) for t in range(words)]


def score(model: Captioner, tok: Tokenizer, data: Sequence[Canvas], batch_size: int = 250) -> dict[str, float]:
    """Exact match and word accuracy of greedy captions (percent), and the alignment (percent)."""
    exact = words_right = words_total = hits = generated = 0
    p = model.config.patch_size
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        captions, weights, _ = caption_batch(model, tok, [c.image for c in chunk])
        cross = weights[-1]["cross"].mean(dim=1)  # (B, Lt, N), last layer, mean of the heads
        grid = (max(c.image.shape[0] for c in chunk) // p, max(c.image.shape[1] for c in chunk) // p)  # (R, K)
        for c, said, row in zip(chunk, captions, cross, strict=True):
            truth, out = c.caption.split(), said.split()
            exact += said == c.caption
            words_right += sum(a == b for a, b in zip(out, truth, strict=False))
            words_total += len(truth)
            aligned = aligned_words(row, patch_owners(c.boxes, grid, p), min(len(out), row.shape[0]))
            hits, generated = hits + sum(aligned), generated + len(aligned)
    n = max(1, len(data))
    return {"exact_match": 100 * exact / n, "word_accuracy": 100 * words_right / max(1, words_total),
            "alignment": 100 * hits / max(1, generated)}


# --- training --------------------------------------------------------------------------------------
def check_model_fits(cfg: CaptionConfig) -> None:
    """SettingError naming the model setting that cannot take the canvases or captions ``cfg.data`` makes (else
    the first batch fails, naming none)."""
    m, d, p = cfg.model, cfg.data, cfg.model.patch_size
    if m.channels != 1:
        raise SettingError(f"model.channels must be 1 (the digit canvases are grey), got {m.channels}")
    for side, name, grid, limit in (("max_height", "rows", d.max_height // p, "max_rows"),
                                    ("max_width", "columns", d.max_width // p, "max_cols")):
        if grid > getattr(m, limit):
            raise SettingError(f"data.{side} ({getattr(d, side)}) makes canvases of {grid} {name} of "
                               f"model.patch_size ({p}) pixels; model.{limit} ({getattr(m, limit)}) must be at "
                               f"least {grid}")
    if m.max_len < d.max_digits + 1:
        raise SettingError(f"model.max_len ({m.max_len}) must be at least data.max_digits + 1 "
                           f"({d.max_digits + 1}): BOS and a word per digit")


def train(cfg: CaptionConfig, *, resume: bool = False, log=log_stderr) -> dict[str, Any]:
    """Train a captioner on canvases of the training scans; return the last validation scores and the model dir."""
    check_model_fits(cfg)
    _, labels = load_scans()
    pools = split_scans(labels, cfg.data)
    out, tok = begin_run(cfg, resume=resume, task="caption", tokenizer=build_tokenizer)
    model = Captioner(replace(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                              eos_id=tok.eos_id))
    p, d = model.config.patch_size, cfg.data
    valid = canvases("valid", d.valid_canvases, d, p)
    log(f"caption: scans train/valid/test {len(pools['train'])}/{len(pools['valid'])}/{len(pools['test'])}, "
        f"{d.valid_canvases} validation canvases, {parameters(model)}")

    def plan(epoch: int) -> list[list[int]]:
        first = epoch * d.epoch_canvases
        return [list(range(first + i, first + min(i + d.batch_size, d.epoch_canvases)))
                for i in range(0, d.epoch_canvases, d.batch_size)]

    def loss(m: nn.Module, b: dict[str, Any]) -> Tensor:
        logits = m(b["images"], b["tgt_in"], sizes=b["sizes"], tgt_lengths=b["tgt_lengths"])
        return sequence_loss(logits, b["tgt_out"], tok.pad_id, cfg.label_smoothing)

    return fit_and_export(
        model, tok, cfg.train, out, resume=resume, log=log,
        evaluate=(lambda m: score(m, tok, valid)) if valid else None, plan=plan,
        collate=lambda idx: collate(tok, [canvas("train", i, pools, d, p, cfg.train.seed) for i in idx]),
        loss=loss, task={"task": "caption", "data": asdict(d)})


def load(directory: str | Path) -> tuple[Captioner, Tokenizer, DataConfig]:
    """A trained captioner, its tokenizer and the data settings it was trained with."""
    model, tok, settings = load_task(directory, "caption", Captioner)
    return model, tok, DataConfig(**settings.get("data", {}))


def largest_canvas(model: Captioner) -> tuple[int, int]:
    """The (height, width) in pixels of the largest canvas the model's patch positions cover."""
    c = model.config
    return c.max_rows * c.patch_size, c.max_cols * c.patch_size


def read_png(path: str | Path, multiple: int, *, largest: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG canvas as (height, width) float32 in [0, 1] (grey level, ink bright), padded with
    background at the bottom and right to multiples of ``multiple``.

    Raises:
        ValueError: naming ``path`` when it is missing, a directory, not an image, or larger than ``largest``
            (height, width; :func:`largest_canvas`).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # 16-bit grey ("I;16", "I"): convert("L") would clip its levels at 255
            deep = im.mode.startswith("I;16") or im.mode == "I"
            pixels = np.asarray(im if deep else im.convert("L"), dtype=np.float32) / (65535.0 if deep else 255.0)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image PIL can read; expected a PNG canvas") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; expected a PNG canvas") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory; expected a PNG canvas") from None
    h, w = pixels.shape
    if largest is not None and (h > largest[0] or w > largest[1]):
        raise ValueError(f"{path}: {h}x{w} pixels, larger than the model's {largest[0]}x{largest[1]} canvases "
                         "(its patch positions)")
    out = np.zeros((-(-h // multiple) * multiple, -(-w // multiple) * multiple), dtype=np.float32)
    out[:h, :w] = pixels
    return out


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a canvas as an 8-bit grey PNG, one pixel per pixel (what :func:`read_png` reads)."""
    from PIL import Image

    picture = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def evaluate_file(directory: str | Path, path: str) -> dict[str, float]:
    """Scores of a trained model on a split's canvases (``path`` = ``test``, ``valid`` or ``train``:
    that split's scans, canvases from ``data.canvas_seed``), or on a TSV of ``image.png<TAB>caption``
    lines (exact match and word accuracy only: a PNG carries no digit positions)."""
    model, tok, d = load(directory)
    p = model.config.patch_size
    if path in SPLITS:
        return score(model, tok, canvases(path, d.test_canvases if path == "test" else d.valid_canvases, d, p))
    base = Path(path).parent
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a split ({', '.join(SPLITS)}) or a TSV of "
                                "image.png<TAB>caption lines")
    rows = read_parallel(path, fields=("image.png", "caption"))  # a bad row: one DataError naming file and line
    if not rows:
        raise DataError(f"{path}: no images to score")
    images = []
    for n, (name, _) in enumerate(rows, 1):  # row n is line n: read_parallel refuses blank lines inside
        if not (base / name).is_file():
            raise DataError(f"{path}:{n}: no image file {name!r} (looked for {base / name}: image names are "
                            "relative to the TSV's directory)")
        try:
            images.append(read_png(base / name, p, largest=largest_canvas(model)))
        except ValueError as e:  # not an image PIL can read, or larger than the model's canvases
            raise DataError(f"{path}:{n}: {e}") from e
    said = [c for i in range(0, len(images), 250) for c in caption_batch(model, tok, images[i : i + 250])[0]]
    truth = [" ".join(r[1].split()) for r in rows]  # the words: "eight  two" is the caption "eight two"
    right = sum(a == b for s, t in zip(said, truth, strict=True) for a, b in zip(s.split(), t.split(), strict=False))
    return {"exact_match": 100 * sum(s == t for s, t in zip(said, truth, strict=True)) / max(1, len(rows)),
            "word_accuracy": 100 * right / max(1, sum(len(t.split()) for t in truth))}


# --- inspection ------------------------------------------------------------------------------------
def visualize(directory: str | Path, image: str, out_dir: str | Path) -> tuple[list[Overlay], list[Path]]:
    """For ``maskattn viz``: each generated word's cross-attention (last decoder layer, mean of the
    heads) over the image, one overlay per word (drawn by the viz layer), and the explorer page of every
    decoder layer's heads (written here)."""
    model, tok, _ = load(directory)
    p = model.config.patch_size
    pixels = read_png(image, p, largest=largest_canvas(model))
    (said,), weights, _ = caption_batch(model, tok, [pixels])
    words = said.split()
    rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cross = weights[-1]["cross"][0].mean(dim=0)  # (Lt, N)
    overlays = [Overlay(f"word{t + 1}_{word}", f"word {t + 1}: {word!r}", pixels,
                        cross[t].reshape(rows, cols).numpy()) for t, word in enumerate(words)]
    queries = ["<s>", *words][: cross.shape[0]]
    keys = [f"r{r}c{c}" for r in range(rows) for c in range(cols)]
    records = [explorer.attention_record(f"cross-attention, layer {i}", "cross-attention", i,
                                         w["cross"][0, :, : len(queries)], queries, keys)
               for i, w in enumerate(weights)]
    return overlays, [explorer.write_page(records, out / "explorer.html")]


# --- command line ----------------------------------------------------------------------------------
def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", help="PNG canvases (grey, ink bright, one pixel per scan pixel)")
    parser.add_argument("--example", metavar="PNG", help="first write a test canvas (unseen scans) here and "
                        "caption it too; its true caption is printed after it")


def _caption(args: argparse.Namespace) -> int:
    if args.example:  # a PNG is written there: never over a file of another kind (a data file given by mistake)
        check_output_file(args.example, "--example", [args.model, *args.images])
        if Path(args.example).suffix.lower() != ".png":
            raise ValueError(f"--example {args.example}: name a .png file (the test canvas is written there)")
    model, tok, d = load(args.model)
    paths = list(args.images)
    truth = ""
    if args.example:
        example = canvases("test", 1, d, model.config.patch_size)[0]
        paths.append(write_png(example.image, args.example))
        truth = example.caption
    if not paths:
        raise ValueError("give PNG images to caption, or --example PNG")
    captions = caption_batch(model, tok, [read_png(path, model.config.patch_size, largest=largest_canvas(model))
                                          for path in paths])[0]
    for path, said in zip(paths, captions, strict=True):
        print(f"{path}\t{said}")
    if truth:
        print(f"(true caption of {args.example}: {truth})")
    return 0


TASK = register(Task(
    name="caption", config=CaptionConfig, train=train, load=load, evaluate_file=evaluate_file,
    predict=Command("caption", "caption PNG canvases of handwritten digits", _arguments, _caption),
    data_help="a split of the digit scans (test, valid, train) or a TSV of image.png<TAB>caption",
    visualize=visualize,
    derived=lambda cfg: dict.fromkeys(("model.vocab_size", "model.pad_id", "model.bos_id", "model.eos_id"),
                                      "the tokenizer (the digit words)"),
    metrics=("exact_match", "word_accuracy", "alignment"),
))
