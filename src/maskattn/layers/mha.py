"""Multi-head attention: project, split into heads, attend under a mask, merge, project.

Shape legend: B batch, L / Lq / Lk sequence lengths, E d_model, H heads, Hkv key/value heads,
D head dim (E // H).

For incremental decoding, ``forward`` takes a :class:`KVCache` (self-attention: new keys are
appended, all cached keys are attended) or precomputed ``kv`` from :meth:`project_kv`
(cross-attention: the encoder's keys and values are projected once), and ``rope`` angles from
:class:`RotaryEmbedding` for the new positions.

The attention call itself is the parameter-free submodule ``attend`` (:class:`Attend`), so that
inspection observes it with PyTorch's own hooks (see :func:`maskattn.viz.capture_attention`).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskattn import dispatch
from maskattn.dispatch import attention
from maskattn.layers.arguments import check_layer_arguments
from maskattn.layers.kv_cache import KVCache
from maskattn.layers.positions import apply_rope
from maskattn.masks import Mask, from_tensor


class MultiHeadAttention(nn.Module):
    """Batch-first multi-head attention with grouped-query support.

    Args:
        d_model: model width E (the query input's last dim and the output's).
        num_heads: number of query heads H; E must be divisible by H.
        num_kv_heads: number of key/value heads Hkv (default H; 1 = multi-query attention).
        dropout: dropout on the attention weights, active in training mode only.
        bias: whether the four projections have biases.
        kdim: last dim of the key input (default E).
        vdim: last dim of the value input (default E).
        backend: attention backend passed to :func:`maskattn.attention`.
        head_dim: width D of each head (default E // H); given when fewer heads than E // D remain
            after :meth:`prune_heads`, so the projections are E -> H * D -> E.
        head_dropout: probability of dropping a whole head's output for one batch row, training mode
            only, the kept heads scaled by 1 / (1 - p) (DropHead, Zhou et al. 2020): heads that
            cannot rely on each other are cheaper to prune. Under grouped-query attention the heads of
            one key/value group are dropped together, as pruning removes them. The weights returned by
            ``return_weights`` are before it.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        backend: str = "auto",
        head_dim: int | None = None,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        checked = (("d_model", d_model), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads))
        for name, value in checked + ((("head_dim", head_dim),) if head_dim is not None else ()):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # kdim=0 would read as "not given", kdim=True as a width of 1; bias="no" as a switch that is on
        widths = {name: value for name, value in (("kdim", kdim), ("vdim", vdim)) if value is not None}
        check_layer_arguments("MultiHeadAttention", sizes=widths, switches={"bias": bias})
        if head_dim is None and d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        for name, p in (("dropout", dropout), ("head_dropout", head_dropout)):
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
        if backend != "auto":
            dispatch.get_backend(backend)  # a typo fails here, not at the first forward
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.origin_heads: list[int] | None = list(range(num_heads))  # of the unpruned module; None: unknown
        self.head_dim = d_model // num_heads if head_dim is None else head_dim
        self.dropout, self.backend, self.head_dropout = dropout, backend, head_dropout
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or d_model, kv_width, bias=bias)
        self.v_proj = nn.Linear(vdim or d_model, kv_width, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, d_model, bias=bias)
        self.attend = Attend()  # no parameters: the state_dict keys are the four projections'

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Mask | Tensor | None = None,
        return_weights: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        q_offset: int = 0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to ``key``/``value`` (self-attention when they are omitted).

        Args:
            query: (B, Lq, E).
            key: (B, Lk, kdim); default ``query``.
            value: (B, Lk, vdim); default ``key``.
            mask: True = may attend; see :func:`maskattn.attention`.
            return_weights: also return the per-head (B, H, Lq, Lk) attention weights.
            kv: keys and values already projected by :meth:`project_kv`, used instead of key/value.
            cache: append this call's keys/values to it and attend to all of them.
            rope: ``(cos, sin)`` of the query positions; rotates queries and the new keys.
            q_offset: absolute position of the first query (the cache length when decoding). With a ``cache`` and a
                mask it must be the slot of the first new key among those the cache returns (ValueError otherwise).

        Returns:
            (B, Lq, E), or ``(output, weights)`` when ``return_weights`` is True.
        """
        b, lq = self._check_query(query)
        q = self.q_proj(query).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, D)
        k, v = self._project_kv(query if key is None else key, value, query) if kv is None else self._check_kv(kv, b)
        if rope is not None:
            self._check_rope(rope, b, lq, k.shape[2] if kv is None else lq)
            q = apply_rope(q, rope, check=False)  # (checked just now: once per call, not per rotation)
            k = k if kv is not None else apply_rope(k, rope, check=False)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, Lk, D)
            if mask is not None:  # q_offset places the queries in the mask, and only there
                self._check_cache_offset(cache, q_offset, lq, k.shape[2])
            if k.dtype != q.dtype:  # a float32 cache under autocast holds bf16/fp16 keys exactly: back to q's dtype
                k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        result = self.attend(q, k, v, mask, backend=self.backend, dropout_p=dropout_p, q_offset=q_offset,
                             return_weights=return_weights)
        out, weights = result if return_weights else (result, None)
        if self.training and self.head_dropout > 0.0:
            # one draw per key/value group: the unit that pruning removes (a head under full multi-head attention)
            keep = torch.rand(b, self.num_kv_heads, 1, 1, device=out.device) >= self.head_dropout  # (B, Hkv, 1, 1)
            keep = keep.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # (B, H, 1, 1)
            out = out * keep.to(out.dtype) / (1.0 - self.head_dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim))  # (B, Lq, E)
        return (out, weights) if return_weights else out

    def project_kv(self, key: Tensor, value: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Project (B, Lk, kdim) keys and values into heads: two (B, Hkv, Lk, D) tensors."""
        return self._project_kv(key, value)

    def _project_kv(self, key: Tensor, value: Tensor | None, checked: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`project_kv`; ``checked`` is a tensor whose dtype and device were checked already (the query)."""
        value = key if value is None else value
        self._check(key, value, checked)
        b, lk, _ = key.shape
        k = self.k_proj(key).view(b, lk, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lk, D)
        v = self.v_proj(value).view(b, lk, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lk, D)
        return k, v

    def prune_heads(self, keep: Sequence[int]) -> None:
        """Keep only the query heads ``keep`` (indices; kept in increasing order), removing the others' rows of the
        q/k/v projections and columns of the output projection; ``head_dim`` stays.

        With grouped-query attention (Hkv < H), ``keep`` must consist of whole key/value groups
        (heads ``g * H / Hkv`` to ``(g + 1) * H / Hkv - 1`` share key/value head g).

        Raises:
            ValueError: naming ``keep`` when it is empty, repeats or leaves a range, or splits a group.
        """
        keep = self.heads_to_keep(keep, "prune_heads(keep): keep")
        group = self.num_heads // self.num_kv_heads
        groups = list(dict.fromkeys(h // group for h in keep))
        if any(not isinstance(p, nn.Linear) for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)):
            raise ValueError("prune_heads: the projections are no longer nn.Linear (quantized?); prune first")
        d = self.head_dim
        rows = torch.tensor([h * d + i for h in keep for i in range(d)])
        kv_rows = torch.tensor([g * d + i for g in groups for i in range(d)])
        self.q_proj, self.out_proj = _select(self.q_proj, rows, 0), _select(self.out_proj, rows, 1)
        self.k_proj, self.v_proj = _select(self.k_proj, kv_rows, 0), _select(self.v_proj, kv_rows, 0)
        self.num_heads, self.num_kv_heads = len(keep), len(groups)
        self.origin_heads = None if self.origin_heads is None else [self.origin_heads[h] for h in keep]

    def heads_to_keep(self, keep: Sequence[int], name: str = "keep") -> list[int]:
        """``keep`` sorted, after checking that it can be pruned to (see :meth:`prune_heads`).

        Raises:
            ValueError: naming ``name`` when ``keep`` is not a non-empty sequence of distinct int heads in
                range, or splits a key/value group.
        """
        group = self.num_heads // self.num_kv_heads
        ints = isinstance(keep, Sequence) and not isinstance(keep, str | bytes)
        ints = ints and all(isinstance(h, int) and not isinstance(h, bool) for h in keep)
        heads = sorted(keep) if ints else []
        whole = heads == sorted(g * group + i for g in dict.fromkeys(h // group for h in heads) for i in range(group))
        if not heads or not whole or not 0 <= heads[0] <= heads[-1] < self.num_heads:
            groups = f", whole groups of {group} heads (grouped-query attention)" if group > 1 else ""
            raise ValueError(f"{name} must be a non-empty list of distinct heads in [0, {self.num_heads}){groups}, "
                             f"got {keep!r}")
        return heads

    @staticmethod
    def _check_cache_offset(cache: KVCache, q_offset: int, lq: int, lk: int) -> None:
        """The new queries are the last ``lq`` of the ``lk`` keys a cache returns: ``q_offset`` must be ``lk - lq``
        (read from shapes, no host read). A static cache's one-token step returns every slot, its mask hiding
        the unwritten ones, and takes 0; a compiled graph is not checked."""
        if (getattr(cache, "static", False) and lq == 1) or torch.compiler.is_compiling() or q_offset == lk - lq:
            return
        raise ValueError(f"q_offset must be {lk - lq} (this cache returned {lk} keys: {lq} new, {lk - lq} before "
                         f"them), got {q_offset!r}")

    def _check_query(self, query: Tensor) -> tuple[int, int]:
        width = self.q_proj.in_features
        if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[-1] != width:
            got = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise ValueError(f"query must be (B, L, {width}) batch-first, got {got}")
        self._check_dtype("query", query)
        return query.shape[0], query.shape[1]

    def _check_dtype(self, name: str, x: Tensor) -> None:
        """Raise unless ``x`` has the projections' dtype (any floating dtype under autocast, which casts it, or
        into int8 projections, which take any and return it), and unless it is on the layer's device (read from the
        tensors' placement, not their values)."""
        weight = getattr(self.q_proj, "weight", None)  # nn.Linear's parameter, Int8Linear's buffer: no walk per call
        held = weight if isinstance(weight, Tensor) else next(itertools.chain(self.q_proj.parameters(),
                                                                             self.q_proj.buffers()), None)
        if held is not None and x.device != held.device:
            raise ValueError(f"{name} is on {x.device}, the layer on {held.device}; move it with .to('{held.device}')")
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: torch has no autocast there
            return
        # Parameters only: an Int8Linear's scales are buffers (in its model's dtype), and it runs any float activations
        if isinstance(weight, nn.Parameter) and weight.is_floating_point():
            want = weight.dtype  # nn.Linear: read, not walked (a third of a call's own time at decoding sizes)
        else:
            want = next((p.dtype for p in self.q_proj.parameters() if p.is_floating_point()), None)
        if want is None and not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if want is not None and x.dtype != want:
            raise TypeError(f"{name} must be {want} (the layer's dtype), got {x.dtype}; cast it with .to({want}) "
                            f"or run under torch.autocast")

    def _check_rope(self, rope: tuple[Tensor, Tensor], batch: int, q_len: int, k_len: int) -> None:
        """Raise unless ``rope`` holds angles for every query (nothing broadcast over Lq) and the keys it rotates."""
        pair = isinstance(rope, tuple | list) and len(rope) == 2 and all(isinstance(x, Tensor) for x in rope)
        if not pair:
            raise ValueError(f"rope must be (cos, sin), each {self._rope_shape(batch, q_len)} from RotaryEmbedding, "
                             f"got {type(rope).__name__}")
        for x in rope:
            if x.dim() != 4 or not (x.shape[0] == 1 or x.shape[0] == batch) or tuple(x.shape[1:]) != \
                    (1, q_len, self.head_dim // 2):
                raise ValueError(f"rope must be (cos, sin), each {self._rope_shape(batch, q_len)} (B may be 1) from "
                                 f"RotaryEmbedding, got {tuple(rope[0].shape)} and {tuple(rope[1].shape)}")
        if k_len != q_len:
            raise ValueError(f"rope rotates the keys too: key must be as long as query ({q_len}), got {k_len}")

    def _check_kv(self, kv: tuple[Tensor, Tensor], batch: int) -> tuple[Tensor, Tensor]:
        """``kv`` if it is two (B, Hkv, Lk, D) tensors of this layer's shape (as :meth:`project_kv` gives)."""
        if not isinstance(kv, tuple | list) or len(kv) != 2 or not all(isinstance(x, Tensor) for x in kv):
            raise ValueError(f"kv must be a (k, v) pair of {self._kv_shape(batch)} tensors from project_kv, got "
                             f"{type(kv).__name__}")
        k, v = kv
        if k.dim() != 4 or k.shape != v.shape or tuple(k.shape[::3]) != (batch, self.head_dim) or \
                k.shape[1] != self.num_kv_heads:
            raise ValueError(f"kv must be two {self._kv_shape(batch)} tensors from this layer's project_kv, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        return k, v

    # The expected shapes of the two checks above, formatted only for their messages (not on every call)
    def _rope_shape(self, batch: int, q_len: int) -> str:
        return f"(B, 1, Lq, D/2) = ({batch}, 1, {q_len}, {self.head_dim // 2})"

    def _kv_shape(self, batch: int) -> str:
        return f"(B, Hkv, Lk, D) = ({batch}, {self.num_kv_heads}, Lk, {self.head_dim})"

    def _check(self, key: Tensor, value: Tensor, checked: Tensor | None = None) -> None:
        expected = (("key", key, self.k_proj.in_features), ("value", value, self.v_proj.in_features))
        for name, x, width in expected:
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != width:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} must be (B, L, {width}) batch-first, got {got}")
            if x is not checked:  # self-attention: key and value are the query, checked once
                self._check_dtype(name, x)
                checked = x
        if key.shape[0] != value.shape[0]:
            raise ValueError(f"batch sizes differ: key {key.shape[0]}, value {value.shape[0]}")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value lengths differ: {key.shape[1]} vs {value.shape[1]}")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, dropout={self.dropout}"
                + (f", head_dropout={self.head_dropout}" if self.head_dropout else ""))


def _select(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new Linear with the rows (``dim`` 0: outputs) or columns (1: inputs) ``index`` of ``linear``."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach().index_select(0, index.to(weight.device)) if dim == 0 else linear.bias)
    return new


class Attend(nn.Module):
    """The attention call of :class:`MultiHeadAttention`: heads in, heads out, no parameters.

    A submodule of its own so that inspection observes the call through PyTorch's hooks: a forward
    pre-hook may ask for the log-sum-exp (``return_lse=True``), and a forward hook then receives
    ``(output, lse)`` (:func:`maskattn.viz.capture_attention` does both). The output is the same
    either way: the log-sum-exp comes from the same call where the backend returns it, else from one
    more call without gradients.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask | Tensor | None = None, *, backend: str = "auto",
                dropout_p: float = 0.0, q_offset: int = 0, return_weights: bool = False,
                return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """:func:`maskattn.attention` of (B, H, Lq, D) queries and (B, Hkv, Lk, D) keys and values.

        Args:
            q, k, v, mask, backend, dropout_p, q_offset, return_weights: as in :func:`maskattn.attention`.
            return_lse: also return the (B, H, Lq) log-sum-exp, computed with the backend this call
                would run anyway (``backend="auto"`` resolved as without it).

        Returns:
            (B, H, Lq, D); ``(output, weights)`` with ``return_weights``; ``(output, lse)`` with ``return_lse``.
        """
        if not return_lse or return_weights:  # both: maskattn.attention refuses, naming them
            return attention(q, k, v, mask, dropout_p=dropout_p, backend=backend, return_weights=return_weights,
                             return_lse=return_lse, q_offset=q_offset)
        if backend == "auto":
            as_mask = from_tensor(mask) if isinstance(mask, Tensor) else mask
            backend = dispatch.choose_backend(q, k, as_mask, dropout_p=dropout_p, return_weights=False,
                                              q_offset=q_offset)
        if dispatch.get_backend(backend).returns_lse:
            out, lse = attention(q, k, v, mask, dropout_p=dropout_p, backend=backend, return_lse=True,
                                 q_offset=q_offset)
        else:
            out = attention(q, k, v, mask, dropout_p=dropout_p, backend=backend, q_offset=q_offset)
            with torch.no_grad():
                _, lse = attention(q, k, v, mask, return_lse=True, q_offset=q_offset)  # auto: a backend that returns it
        return out, lse
