"""An image captioner: a patch encoder and the Transformer's decoder with cross-attention to the patches.

Shape legend: B batch, Hc x Wc canvas pixels, N patches, Lt caption length, E d_model, V caption
vocabulary.

The encoder turns each image patch into a token with its 2-D position
(:class:`~maskattn.layers.patches.PatchEmbedding`) and runs maskattn ``EncoderLayer``s over them,
with a key padding mask when the canvases of a batch differ in size. The decoder is the
:class:`~maskattn.models.Transformer`'s: the same modules under the same names (``tgt_embed``,
``decoder``, ``out_proj``) and the same methods, so teacher forcing, the KV cache, greedy and beam
search work unchanged, with images in place of source ids and their sizes in place of source lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from maskattn import masks
from maskattn.layers import DecoderLayer, EncoderLayer, TokenEmbedding
from maskattn.layers.patches import PATCH_POSITIONS, PatchEmbedding, patch_valid
from maskattn.models.common import Embedder, Stack, init_linears
from maskattn.models.config import BlockConfig, check_distinct
from maskattn.models.inspection import AuditProbe, ProbeCheck, ProbeInput
from maskattn.models.persistence import Persistent
from maskattn.models.summary import Summary
from maskattn.models.transformer import Transformer

Sizes = Tensor | Sequence[Sequence[int]] | None


@dataclass
class CaptionerConfig(BlockConfig):
    """Patch encoder + Transformer decoder; the defaults fit the handwritten-digit canvases of ``caption``."""

    vocab_size: int = 16  # caption vocabulary V (words and the special tokens)
    d_model: int = 64  # width E
    num_heads: int = 4  # attention heads H
    d_ff: int = 256  # feed-forward hidden width
    dropout: float = 0.0  # on embeddings and every sublayer output (the canvases are new at every step)
    norm_first: bool = True  # pre-LN
    max_len: int = 16  # longest caption (in tokens, BOS included) the decoder positions cover
    patch_size: int = 4  # side P of the square image patches, in pixels; canvases are multiples of it
    channels: int = 1  # colour channels of the images
    max_rows: int = 8  # patch rows the 2-D positions cover: images up to max_rows * patch_size pixels high
    max_cols: int = 16  # patch columns they cover: up to max_cols * patch_size pixels wide
    patch_positions: str = "sinusoidal"  # 2-D positions of the patches: sinusoidal (fixed, row | column) | learned
    num_encoder_layers: int = 2  # encoder layers over the patches
    num_decoder_layers: int = 2  # decoder layers (causal self-attention, cross-attention to the patches)
    tie_output: bool = True  # output projection = caption embedding matrix
    pad_id: int | None = 0  # caption padding id
    bos_id: int = 2  # first decoder input
    eos_id: int | None = 3  # end of caption; None = no EOS token (decoding runs every row to its limit)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(vocab_size=16, d_model=32, num_heads=4, d_ff=64, dropout=0.0, max_rows=4, max_cols=12),
        "digits": dict(),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_positions not in PATCH_POSITIONS:
            raise ValueError(f"patch_positions must be one of {PATCH_POSITIONS}, got {self.patch_positions!r}")
        for name in ("patch_size", "channels", "max_rows", "max_cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._check_ids("bos_id", "eos_id", self.vocab_size)
        check_distinct(self)


class Captioner(Persistent, Summary, nn.Module):
    """``forward(images, tgt, sizes=)`` gives next-word logits (B, Lt, V) of captions of (B, Hc, Wc) images."""

    never_generated = ("pad_id", "bos_id")  # decoding never outputs these (BOS is only an input)

    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = c = self.checked_config(config)
        self.patches = PatchEmbedding(c.patch_size, c.d_model, channels=c.channels, max_rows=c.max_rows,
                                      max_cols=c.max_cols, positions=c.patch_positions)
        self.patch_dropout = nn.Dropout(c.dropout)
        tokens = TokenEmbedding(c.vocab_size, c.d_model, scale=c.scale_embeddings)
        self.tgt_embed = Embedder(c, tokens)
        kwargs = c.layer_kwargs()
        self.encoder = Stack([EncoderLayer(**kwargs) for _ in range(c.num_encoder_layers)], c.d_model,
                             final_norm=c.use_final_norm, eps=c.norm_eps, norm=c.norm)
        self.decoder = Stack([DecoderLayer(**kwargs) for _ in range(c.num_decoder_layers)], c.d_model,
                             final_norm=c.use_final_norm, eps=c.norm_eps, norm=c.norm)
        self.out_proj = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_linears(self.encoder)
        init_linears(self.decoder)
        if c.tie_output:
            self.out_proj.weight = tokens.weight

    # The decoder side is the Transformer's own code, run on this model's modules of the same names:
    # decode (teacher forcing), start / step (KV cache), begin_decoding (maskattn.decoding) and the sites.
    decode = Transformer.decode
    start = Transformer.start
    step = Transformer.step
    begin_decoding = Transformer.begin_decoding
    attention_sites = Transformer.attention_sites

    def example_inputs(self) -> tuple[Tensor, ...]:
        """One blank (1, [C,] 2P, 4P) canvas and a (1, 4) caption prefix, for :meth:`summary`, in the model's dtype
        and on its device."""
        p, c = self.config.patch_size, self.config.channels
        weight = next(self.parameters())
        canvas = torch.zeros(1, *((c,) if c > 1 else ()), 2 * p, 4 * p, dtype=weight.dtype, device=weight.device)
        return canvas, torch.full((1, 4), self.config.bos_id, device=weight.device)

    def encode(self, images: Tensor, sizes: Sizes = None, *, return_weights: bool = False) -> tuple:
        """Encode (B, [C,] Hc, Wc) images, each of real size ``sizes[b]`` (height, width) at the top left.

        Returns:
            ``(memory, valid)``: the (B, N, E) patch encodings and the (B, N) bool mask of patches
            inside their canvas (None without ``sizes``); with ``return_weights``, also every encoder
            layer's ``{"self": (B, H, N, N)}`` attention weights.
        """
        grid = self.patches.grid(images)
        valid = patch_valid(sizes, grid, self.config.patch_size, batch=images.shape[0], device=images.device)
        x = self.patch_dropout(self.patches(images))  # (B, N, E)
        mask = masks.padding(valid) if valid is not None else None
        out = self.encoder(x, mask=mask, return_weights=return_weights)
        return (out[0], valid, out[1]) if return_weights else (out, valid)

    def forward(self, images: Tensor, tgt: Tensor, *, sizes: Sizes = None,
                tgt_lengths: Tensor | Sequence[int] | None = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, dict[str, list[dict[str, Tensor]]]]:
        """Teacher-forced logits (B, Lt, V) of captions ``tgt`` (B, Lt) (BOS w1 w2 ..., right-padded).

        With ``return_weights``, also ``{"encoder": [...], "decoder": [...]}``: per layer the attention
        weights, the decoder's ``{"self": (B, H, Lt, Lt), "cross": (B, H, Lt, N)}``.
        """
        encoded = self.encode(images, sizes, return_weights=return_weights)
        out = self.decode(tgt, encoded[0], encoded[1], tgt_lengths=tgt_lengths, return_weights=return_weights)
        return (out[0], {"encoder": encoded[2], "decoder": out[1]}) if return_weights else out

    def audit_probe(self) -> AuditProbe:
        """Every attention call; no logit depends on a later caption token, nor on pixels outside the canvas."""
        c = self.config
        grid = (min(2, c.max_rows), min(6, c.max_cols))
        uses = ("images", "tgt", "sizes")
        return AuditProbe(
            inputs=(ProbeInput("images", "images", patch_size=c.patch_size, grid=grid, channels=c.channels),
                    ProbeInput("sizes", "image_sizes", patch_size=c.patch_size, grid=grid),
                    ProbeInput("tgt", "tokens", c.vocab_size)),
            checks=(ProbeCheck("layers", uses),
                    ProbeCheck("causal", uses, "Captioner logits vs later caption tokens", varies="tgt"),
                    ProbeCheck("image_padding", uses, "Captioner logits vs pixels outside the canvas",
                               varies="images", lengths="sizes")))
