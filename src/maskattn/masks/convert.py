"""Converters between maskattn masks (True = may attend) and every other convention in the field.

=====================  ====================================================  ==========================
convention             meaning of its values                                  converters
=====================  ====================================================  ==========================
torch MHA              bool True = *masked*; float added to scores            from_torch_mha / to_torch_mha
SDPA, FlexAttention    bool True = keep; FlexAttention: mask_mod predicate     from_tensor / to_flex
Hugging Face           2-D 1 = real token; 4-D bool keep or additive float     from_hf / to_additive
Keras                  1 = attend; (B, T, S) batch-first                        from_keras
FlashAttention varlen  cumulative sequence lengths of packed documents         from_cu_seqlens
=====================  ====================================================  ==========================

A converter that receives something that looks inverted (a padding mask that hides the first token
of every row, an "additive" mask of 0/1) warns or raises saying what it probably is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from maskattn.masks.base import Mask, structure
from maskattn.masks.tensor_kinds import document, from_tensor, padding
from maskattn.masks.tiles import check_sizes

NEG_THRESHOLD = -1e4  # additive values at or below this hide the key (HF uses finfo.min, torch -inf)


class InvertedMaskWarning(UserWarning):
    """A mask that looks like it uses the opposite convention."""


def _check_tensor(value: object, where: str, *, optional: bool = False) -> None:
    """Raise TypeError naming ``where`` ("converter: argument") unless ``value`` is a tensor (or None if optional)."""
    if not isinstance(value, Tensor) and not (optional and value is None):
        raise TypeError(f"{where} must be a torch.Tensor{' or None' if optional else ''}, got {type(value).__name__}")


def _check_mask(mask: object, converter: str) -> None:
    if not isinstance(mask, Mask):
        raise TypeError(f"{converter}: mask must be a maskattn Mask (masks.from_tensor wraps a bool tensor), got "
                        f"{type(mask).__name__}")


def _bool_from_additive(m: Tensor, name: str) -> Tensor:
    """True where an additive float mask keeps the score (0), False where it hides it (very negative)."""
    finite = m[torch.isfinite(m)]
    if finite.numel() and bool(((finite == 0) | (finite == 1)).all()) and bool((finite == 1).any()) \
            and not bool(torch.isinf(m).any()):
        raise ValueError(f"{name}: a float mask of 0s and 1s is not additive (it would add 1 to some scores); "
                         "it looks like a 0/1 keep-mask: pass it as bool (mask.bool()) to the matching converter")
    hidden = m <= NEG_THRESHOLD
    kept = m == 0
    if not bool((hidden | kept).all()):
        raise ValueError(f"{name}: an additive mask must hold 0 (keep) and -inf or a very negative number "
                         "(hide); other values are a bias (e.g. ALiBi), which a mask cannot express")
    return kept


def _warn_if_padding_inverted(valid: Tensor, name: str, hint: str) -> None:
    if valid.numel() and not bool(valid.any()):
        raise ValueError(f"{name} hides every key of every row; it is probably inverted ({hint})")
    if valid.shape[-1] > 1 and not bool(valid[..., 0].any()) and bool(valid[..., -1].all()):
        warnings.warn(f"{name} hides the first key of every row and keeps the last: it looks inverted "
                      f"({hint})", InvertedMaskWarning, stacklevel=3)


# --- torch.nn.MultiheadAttention -------------------------------------------------------------------
def from_torch_mha(attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, *,
                   num_heads: int | None = None) -> Mask:
    """Masks in ``nn.MultiheadAttention``'s convention (bool True = *masked*, or additive float).

    Args:
        attn_mask: (L, S), or (N * num_heads, L, S) with ``num_heads`` given.
        key_padding_mask: (N, S), True (or -inf) = padding.
    """
    for name, given in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        _check_tensor(given, f"from_torch_mha: {name}", optional=True)
        if given is not None and given.dtype != torch.bool and not given.is_floating_point():
            raise TypeError(f"from_torch_mha: {name} must be bool (True = masked) or float (additive), as "
                            f"nn.MultiheadAttention takes, got dtype {given.dtype}")
    result: Mask | None = None
    if attn_mask is not None:
        keep = ~attn_mask if attn_mask.dtype == torch.bool else _bool_from_additive(attn_mask, "attn_mask")
        if keep.dim() == 3:
            if num_heads is None:
                raise ValueError("a 3-D attn_mask is (N * num_heads, L, S): pass num_heads to split it")
            if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 \
                    or keep.shape[0] % num_heads:
                raise ValueError(f"a 3-D attn_mask is (N * num_heads, L, S): its first size {keep.shape[0]} is not "
                                 f"a multiple of num_heads ({num_heads!r})")
            keep = keep.view(-1, num_heads, *keep.shape[1:])
        elif keep.dim() != 2:
            raise ValueError(f"attn_mask must be (L, S) or (N * num_heads, L, S), got {tuple(attn_mask.shape)}")
        result = from_tensor(keep)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        valid = ~kpm if kpm.dtype == torch.bool else _bool_from_additive(kpm, "key_padding_mask")
        if valid.dim() != 2:
            raise ValueError(f"key_padding_mask must be (N, S), got {tuple(kpm.shape)}")
        if result is not None and (attn_mask.shape[-1] != kpm.shape[1] or result.batch not in (1, kpm.shape[0])):
            raise ValueError(f"from_torch_mha: attn_mask {tuple(attn_mask.shape)} has S={attn_mask.shape[-1]} keys and "
                             f"N={result.batch} items but key_padding_mask {tuple(kpm.shape)} has S={kpm.shape[1]} and "
                             f"N={kpm.shape[0]}; nn.MultiheadAttention takes them for the same N and S")
        _warn_if_padding_inverted(valid, "key_padding_mask", "in torch's convention True means padding")
        pad = padding(valid)
        result = pad if result is None else result & pad
    if result is None:
        raise ValueError("from_torch_mha needs attn_mask, key_padding_mask or both")
    return result


def to_torch_mha(mask: Mask, q_len: int, k_len: int, *, num_heads: int = 1, q_offset: int = 0,
                 additive: torch.dtype | None = None, batch: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(attn_mask, key_padding_mask)`` for ``nn.MultiheadAttention`` (True = masked).

    A pure key-padding mask becomes ``key_padding_mask`` (N, S); anything else becomes ``attn_mask``,
    (L, S) when the mask is the same for every item and head, else (N * num_heads, L, S). ``batch`` is N: needed
    only when the mask differs per head but not per item (its tensors do not say N). With ``additive`` (a float
    dtype) the masks are 0 / -inf floats instead of bools.
    """
    def out(hidden: Tensor) -> Tensor:
        if additive is None:
            return hidden
        return torch.zeros(hidden.shape, dtype=additive, device=hidden.device).masked_fill(hidden, float("-inf"))

    _check_mask(mask, "to_torch_mha")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"to_torch_mha: batch must be an int >= 1 (the N of nn.MultiheadAttention), got {batch!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"to_torch_mha: num_heads must be an int >= 1, got {num_heads!r}")
    if additive is not None and not (isinstance(additive, torch.dtype) and additive.is_floating_point):
        raise TypeError(f"to_torch_mha: additive must be a floating dtype (or None for bool masks), got {additive!r}")
    if structure(mask).kinds in (("lengths",), ("valid",)):  # pure key padding
        valid = mask.to_dense(1, k_len)[:, 0, 0, :]  # (N, S)
        if batch is not None:
            if valid.shape[0] != 1 and valid.shape[0] != batch:  # not `in`: see Mask.check
                raise ValueError(f"to_torch_mha: the mask holds {valid.shape[0]} items, got batch={batch}")
            valid = valid.expand(batch, k_len)
        return None, out(~valid)
    dense = mask.to_dense(q_len, k_len, q_offset=q_offset)  # (B|1, H|1, L, S)
    if dense.shape[0] == 1 and dense.shape[1] == 1:
        return out(~dense[0, 0]), None
    if dense.shape[1] != 1 and dense.shape[1] != num_heads:  # not `in`: see Mask.check
        raise ValueError(f"to_torch_mha: the mask differs per head ({dense.shape[1]} heads); pass "
                         f"num_heads={dense.shape[1]}, got num_heads={num_heads}")
    if batch is None:
        if dense.shape[0] == 1:
            raise ValueError(f"to_torch_mha: the mask differs per head ({dense.shape[1]}) but not per item, so "
                             "nn.MultiheadAttention needs it repeated for each of the N items: pass batch=N")
        batch = dense.shape[0]
    elif dense.shape[0] != 1 and dense.shape[0] != batch:
        raise ValueError(f"to_torch_mha: the mask holds {dense.shape[0]} items, got batch={batch}")
    full = dense.expand(batch, num_heads, q_len, k_len).reshape(batch * num_heads, q_len, k_len)
    return out(~full), None


# --- Hugging Face ----------------------------------------------------------------------------------
def from_hf(attention_mask: Tensor) -> Mask:
    """A Hugging Face ``attention_mask``: 2-D (B, L) with 1 = real token, or 4-D (B, 1|H, Lq, Lk)
    either bool (True = keep) or additive float (0 keep, finfo.min / -inf hide)."""
    _check_tensor(attention_mask, "from_hf: attention_mask")
    m = attention_mask
    if m.dim() == 2:
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            hint = ("is it an additive mask? pass a 4-D (B, 1, Lq, Lk) one" if m.is_floating_point() else
                    "are they packed document numbers? build masks.document(ids) & masks.padding(...) from them")
            raise ValueError("a 2-D Hugging Face attention_mask holds 1 (token) and 0 (padding); this one holds "
                             f"{m.unique()[:8].tolist()}: {hint}")
        valid = m.bool()
        _warn_if_padding_inverted(valid, "attention_mask", "in Hugging Face's convention 1 means a real token")
        return padding(valid)
    if m.dim() == 4:
        if m.dtype != torch.bool and not m.is_floating_point():  # integer zeros: keep all (additive) or none (0/1)?
            raise TypeError("from_hf: a 4-D attention_mask must be bool (True = keep) or float (additive: 0 keeps, "
                            "-inf or finfo.min hides), as Hugging Face builds them, got dtype "
                            f"{m.dtype}; a 0/1 keep-mask: pass attention_mask.bool()")
        keep = m if m.dtype == torch.bool else _bool_from_additive(m, "attention_mask")
        return from_tensor(keep)
    raise ValueError(f"attention_mask must be 2-D (B, L) or 4-D (B, 1|H, Lq, Lk), got {tuple(m.shape)}")


def to_additive(mask: Mask, q_len: int, k_len: int, dtype: torch.dtype = torch.float32, *, q_offset: int = 0,
                fill: float | None = None) -> Tensor:
    """The (B|1, H|1, Lq, Lk) additive float mask: 0 where allowed, ``fill`` (default -inf) where hidden.

    Hugging Face models use ``fill=torch.finfo(dtype).min``, which keeps fully masked rows finite.

    Raises:
        TypeError: ``dtype`` is not a floating torch.dtype.
        ValueError: ``fill`` would not hide a key (above ``NEG_THRESHOLD``, or NaN) or does not fit ``dtype``.
    """
    _check_mask(mask, "to_additive")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"to_additive needs a floating torch.dtype, got {dtype!r}")
    value = float("-inf") if fill is None else fill
    if not value <= NEG_THRESHOLD:  # (NaN too)
        raise ValueError(f"to_additive: fill={value!r} would not hide a key; expected -inf (None) or at most "
                         f"{NEG_THRESHOLD}")
    if value != float("-inf") and value < torch.finfo(dtype).min:
        raise ValueError(f"to_additive: fill={value!r} does not fit {dtype} (at least {torch.finfo(dtype).min}); use "
                         "fill=None (-inf) or torch.finfo(dtype).min")
    dense = mask.to_dense(q_len, k_len, q_offset=q_offset)
    return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill(~dense, value)


# --- Keras -----------------------------------------------------------------------------------------
def from_keras(mask: Tensor) -> Mask:
    """Keras ``attention_mask`` (B, T, S) or padding mask (B, S); 1 / True = may attend.

    Keras is batch-first: a 3-D mask is (B, T, S), not the (H, Lq, Lk) that NumPy broadcasting of
    :func:`from_tensor` would read.
    """
    _check_tensor(mask, "from_keras: mask")
    keep = mask.bool()
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("a Keras mask holds 1 (attend) and 0 (hide); this one holds other values")
    if keep.dim() == 2:
        _warn_if_padding_inverted(keep, "Keras mask", "in Keras 1 means attend")
        return padding(keep)
    if keep.dim() == 3:
        return from_tensor(keep[:, None])  # (B, 1, T, S)
    raise ValueError(f"a Keras mask must be (B, S) or (B, T, S), got {tuple(mask.shape)}")


# --- FlexAttention and FlashAttention ----------------------------------------------------------------
def to_flex(mask: Mask, q_len: int | None = None, k_len: int | None = None, *, q_offset: int = 0,
            batch: int | None = None, heads: int | None = None, device: str | torch.device = "cpu",
            block_size: int = 128) -> tuple[Callable, object | None]:
    """``(mask_mod, block_mask)`` for ``torch.nn.attention.flex_attention``.

    ``mask_mod(b, h, q_idx, kv_idx)`` is the mask itself (query indices shifted by ``q_offset``); the
    BlockMask is built when FlexAttention is importable and lengths are given, else None. Its batch and
    heads default to the mask's own (a mask that differs per row or head gets a block map per row or head;
    compiled FlexAttention trusts those maps, so one row's map must not serve the others).

    Raises:
        ValueError: ``batch`` or ``heads`` given, and not what a mask that varies along that dimension has.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        return mask.allows(b, h, q_idx + q_offset, kv_idx)

    _check_mask(mask, "to_flex")
    if q_len is None or k_len is None:
        check_sizes(0, 0, q_offset)
    else:
        mask.check(q_len, k_len, q_offset=q_offset)
    for name, given, own in (("batch", batch, mask.batch), ("heads", heads, mask.heads)):
        if given is not None and own > 1 and given != own:
            raise ValueError(f"to_flex({name}={given}): the mask has {own} different {name} entries")
    if q_len is None or k_len is None:
        return mask_mod, None
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        return mask_mod, None
    batch = mask.batch if mask.batch > 1 else None  # one map serves every row of a mask that is the same for all
    heads = mask.heads if mask.heads > 1 else None
    block_mask = create_block_mask(mask_mod, batch, heads, q_len, k_len, device=device, BLOCK_SIZE=block_size)
    return mask_mod, block_mask


def from_cu_seqlens(cu_seqlens: Tensor | list[int]) -> Mask:
    """Packed documents as FlashAttention's varlen API describes them: cumulative lengths
    ``[0, n0, n0 + n1, ...]`` of sequences concatenated into one row. Attention stays inside each
    document (combine with ``causal()`` for causal varlen attention)."""
    if isinstance(cu_seqlens, str | bytes) or not (isinstance(cu_seqlens, Tensor | Sequence)
                                                    or hasattr(cu_seqlens, "__array__")):
        raise TypeError(f"from_cu_seqlens: cu_seqlens must be a tensor or a list of ints, got "
                        f"{type(cu_seqlens).__name__}")
    cu = torch.as_tensor(cu_seqlens)
    if cu.numel() and (cu.dtype == torch.bool or cu.is_floating_point() or cu.is_complex()):
        raise TypeError(f"cu_seqlens must hold integers (cumulative lengths), got dtype {cu.dtype}")
    cu = cu.long()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing and start at 0, like [0, 3, 7], got {cu.tolist()}")
    total = int(cu[-1])
    doc_ids = torch.bucketize(torch.arange(total, device=cu.device), cu[1:], right=True)  # position -> its document
    return document(doc_ids[None])
