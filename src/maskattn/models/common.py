"""Parts shared by the models: input embedding, a stack of layers, masks from lengths or padding
ids, and the state of incremental decoding.

Shape legend: B batch, L sequence length, E d_model, T cache capacity, Ls source length, Hkv
key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from maskattn import masks
from maskattn.layers import (
    KVCache,
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    SlidingWindowKVCache,
    TokenEmbedding,
    make_norm,
)
from maskattn.layers.embedding import check_ids, value_range
from maskattn.models.config import BlockConfig


def key_valid(ids: Tensor, lengths: Tensor | Sequence[int] | None, pad_id: int | None, name: str) -> Tensor | None:
    """Which positions of ``ids`` (B, L) are real tokens, (B, L) bool; None when all are.

    From ``lengths`` (B,) when given (right padding), else from ``ids != pad_id``.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a (B, L) tensor of token ids, got {got}")
    b, length = ids.shape
    if lengths is None:
        return None if pad_id is None else ids != pad_id
    host = list(lengths) if isinstance(lengths, (list, tuple)) else None  # already on the host: nothing to read
    lengths = torch.as_tensor(lengths, device=ids.device)
    if lengths.shape != (b,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"{name}_lengths must be {b} integer lengths (B,), got {tuple(lengths.shape)} {lengths.dtype}")
    # lengths given as a list are checked without reading the device
    host = [int(n) for n in host] if host is not None else None  # integers: the dtype check above
    bounds = (min(host), max(host)) if host else None if host is not None else value_range(lengths)
    if bounds is not None and (bounds[0] < 1 or bounds[1] > length):
        raise ValueError(f"{name}_lengths must be in [1, {length}], got {host or lengths.tolist()}")
    return torch.arange(length, device=ids.device) < lengths[:, None]  # (B, L)


def document_positions(doc_ids: Tensor) -> Tensor:
    """Positions that restart at 0 where a new document starts in a packed row: (B, L) -> (B, L)."""
    b, length = doc_ids.shape
    idx = torch.arange(length, device=doc_ids.device).expand(b, length)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of each token's doc
    return idx - first


def init_linears(module: nn.Module, std: float | None = None) -> None:
    """Initialise every Linear inside ``module``: Xavier-uniform weights (``std`` None; Vaswani et al.
    and ``nn.Transformer``) or normal(0, std) (GPT-2, BERT: 0.02); zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if std is None:
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def default_positions(ids: Tensor, offset: int = 0) -> Tensor:
    """``offset + arange(L)`` for every row: (B, L)."""
    return torch.arange(offset, offset + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)


class Embedder(nn.Module):
    """Token embedding + absolute positions (+ token types) (-> LayerNorm) -> dropout, and RoPE angles.

    Args:
        config: the model config (positions, dropout, widths).
        tokens: the token table (passed in so that models can share it).
        type_vocab_size: number of token type (segment) ids; 0 = none.
        norm: LayerNorm the sum (BERT).
    """

    def __init__(self, config: BlockConfig, tokens: TokenEmbedding, *, type_vocab_size: int = 0,
                 norm: bool = False) -> None:
        super().__init__()
        c = config
        self.tokens = tokens
        self.positions: nn.Module | None = None
        if c.positions == "sinusoidal":
            self.positions = SinusoidalPositions(c.max_len, c.d_model)
        elif c.positions == "learned":
            self.positions = LearnedPositions(c.max_len, c.d_model)
        self.rope = RotaryEmbedding(c.d_model // c.num_heads, c.max_len, base=c.rope_base) \
            if c.positions == "rope" else None
        self.token_types = nn.Embedding(type_vocab_size, c.d_model) if type_vocab_size else None
        self.norm = make_norm(c.norm, c.d_model, c.norm_eps) if norm else None
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, ids: Tensor, positions: Tensor, token_types: Tensor | None = None, *,
                positions_below: int | None = None,
                ids_below: int | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(B, L) ids and positions -> ((B, L, E) inputs, RoPE angles or None).

        ``positions_below``: the caller built ``positions`` itself, all in [0, positions_below): they are read
        back to be checked (a wait for a GPU) only when that bound passes ``max_len``. ``ids_below``: the same
        for ``ids`` (e.g. a decoder's BOS), read only when it passes the token table's vocabulary.
        """
        known = ids_below is not None and ids_below <= getattr(self.tokens, "vocab_size", 0)
        x = self.tokens(ids, check=False) if known else self.tokens(ids)  # (B, L, E)
        table = self.positions if self.positions is not None else self.rope
        # (traced, the check reads nothing anyway, and comparing a symbolic length would guard the graph on it)
        check = torch.compiler.is_compiling() or positions_below is None or table is None \
            or positions_below > table.max_len
        if self.positions is not None:
            x = x + self.positions(positions, check=check)
        if token_types is not None and self.token_types is not None:  # without a table (type_vocab_size=0) unread:
            self._check_token_types(token_types, ids)  # QA passes segments to any encoder it fine-tunes
        if self.token_types is not None:
            x = x + self.token_types(torch.zeros_like(ids) if token_types is None else token_types)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x), (self.rope(positions, check=check) if self.rope is not None else None)


    def _check_token_types(self, token_types: Tensor, ids: Tensor) -> None:
        if not isinstance(token_types, Tensor) or token_types.shape != ids.shape:
            got = tuple(token_types.shape) if isinstance(token_types, Tensor) else type(token_types).__name__
            raise ValueError(f"token_type_ids must have the shape of input_ids {tuple(ids.shape)}, got {got}")
        try:
            check_ids(token_types, self.token_types.num_embeddings)
        except (TypeError, ValueError) as err:
            raise type(err)(f"token_type_ids: {err} (type_vocab_size={self.token_types.num_embeddings})") from None


class Stack(nn.Module):
    """Layers applied in order, then an optional final norm (pre-LN models need one)."""

    def __init__(self, layers: Sequence[nn.Module], d_model: int, *, final_norm: bool, eps: float,
                 norm: str = "layer") -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = make_norm(norm, d_model, eps) if final_norm else None

    def forward(self, x: Tensor, *, caches: Sequence[KVCache] | None = None,
                memory_kv: Sequence[tuple[Tensor, Tensor]] | None = None, return_weights: bool = False,
                **kwargs) -> Tensor | tuple[Tensor, list[dict[str, Tensor]]]:
        """(B, L, E) -> (B, L, E); ``kwargs`` go to every layer, ``caches``/``memory_kv`` one each.

        With ``return_weights``, also each layer's attention weights, first layer first.
        """
        weights = []
        for i, layer in enumerate(self.layers):
            per_layer = {}
            if caches is not None:
                per_layer["cache"] = caches[i]
            if memory_kv is not None:
                per_layer["memory_kv"] = memory_kv[i]
            x = layer(x, return_weights=return_weights, **kwargs, **per_layer)
            if return_weights:
                x, w = x
                weights.append(w)
        x = self.norm(x) if self.norm is not None else x
        return (x, weights) if return_weights else x


@dataclass
class DecodeState:
    """Everything incremental decoding carries from one step to the next.

    Rows of a batch may hold padding in the middle (prompts of different lengths are right-padded
    and generation continues after the padding): ``key_valid`` hides those slots, and ``next_pos``
    keeps each row's own position count, so a row decodes exactly as it would alone.
    """

    caches: list[KVCache]  # one self-attention cache per decoder layer
    key_valid: Tensor  # (B, T) bool, which cache slots hold real tokens
    next_pos: Tensor  # (B,) position id of each row's next token
    memory_kv: list[tuple[Tensor, Tensor]] | None = None  # encoder keys/values per layer, (B, Hkv, Ls, D)
    memory_valid: Tensor | None = None  # (B, Ls) bool, real source tokens
    key_pos: Tensor | None = None  # (B, T) position id of every slot (sliding-window masks read it)
    gaps: bool = False  # whether some slot may hold padding (tokens fed with lengths): masks must read key_valid
    static: bool = False  # one-token steps attend over all T slots with fixed shapes (KVCache static=True)
    head_t: Tensor | None = None  # (E, V) contiguous copy of the output projection's weight (see step_logits)
    head_copy_ok: bool = False  # one-row steps may make head_t (set by begin_decoding: enough steps ahead)
    step_masks: dict[str, tuple[Tensor | None, masks.Mask]] = field(default_factory=dict)  # see kept_mask

    @property
    def length(self) -> int:
        """Slots used so far = the q_offset of the next step."""
        return self.caches[0].length

    def reorder(self, index: Tensor, *, same_memory: bool = False) -> None:
        """Keep rows ``index`` (B',) of everything (beam search).

        ``same_memory``: the caller promises that row ``index[i]`` has the same encoder memory as row i
        (beams of one source sentence trade places), so ``memory_kv`` and ``memory_valid`` stay as they are.
        """
        if same_memory and index.shape[0] != self.next_pos.shape[0]:
            raise ValueError(f"reorder: same_memory keeps the batch size {self.next_pos.shape[0]}, "
                             f"got an index of {index.shape[0]} rows")
        for cache in self.caches:
            cache.reorder(index)
        self.key_valid = self.key_valid.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        if self.memory_kv is not None and not same_memory:
            self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]
        if self.memory_valid is not None and not same_memory:
            self.memory_valid = self.memory_valid.index_select(0, index)
        if self.key_pos is not None:
            self.key_pos = self.key_pos.index_select(0, index)


def kept_mask(state: DecodeState, name: str, tensor: Tensor | None,
              build: Callable[[Tensor | None], masks.Mask]) -> masks.Mask:
    """``build(tensor)``, built once for the steps of ``state`` that read the same ``tensor`` object.

    A mask is a value and a step's position is its ``q_offset``, so one mask serves every step: its
    construction, and the structure ``masks.structure`` keeps for it, are spent once, not once a token.
    Keyed by identity: ``reorder`` replaces the tensors (a new mask), while ``advance`` writes into them in
    place, which the kept mask reads as it is. A compiled step builds its own (no state in the graph).
    """
    kept = state.step_masks
    if name in kept and kept[name][0] is tensor:
        return kept[name][1]
    mask = build(tensor)
    if not torch.compiler.is_compiling():
        kept[name] = (tensor, mask)
    return mask


def new_state(stack: Stack, batch: int, max_len: int, like: Tensor, *, window: int | None = None,
              static: bool = False) -> DecodeState:
    """Empty caches for every layer of ``stack`` (decoder layers), on ``like``'s device and dtype.

    With ``window``, each cache is a :class:`SlidingWindowKVCache` of ``window`` slots (capped at ``max_len``);
    with ``static``, a :class:`KVCache` whose one-token updates return all ``max_len`` slots.
    """
    if static and window is not None:
        raise ValueError(f"a static state keeps every slot: window must be None, got {window}")
    caches = []
    for layer in stack.layers:
        attn = layer.self_attn
        shape = (batch, attn.num_kv_heads, attn.head_dim, max_len if window is None else min(window, max_len))
        options = {"dtype": like.dtype, "device": like.device}
        caches.append(KVCache(*shape, **options, static=static) if window is None else
                      SlidingWindowKVCache(*shape, **options))
    key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=like.device)
    next_pos = torch.zeros(batch, dtype=torch.long, device=like.device)
    key_pos = torch.zeros(batch, max_len, dtype=torch.long, device=like.device)
    return DecodeState(caches, key_valid, next_pos, key_pos=key_pos, static=static)


FEW_STEP_ROWS = 8  # decoding steps of 2..8 rows multiply (V, E) @ (E, rows) instead of F.linear
MIN_STEPS_FOR_COPY = 16  # the one-row copy costs about what ~15 one-row projections save (GPT-2's 50,257 x 256)


def fast_head(head: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``step_logits`` may bypass ``head(h)`` for inputs of ``device`` and ``dtype``: a plain float32
    ``nn.Linear`` without bias, on CPU, outside autocast and autograd (the copy is detached, and other
    dtypes read fastest through ``F.linear``)."""
    return (device.type == "cpu" and type(head) is nn.Linear and head.bias is None
            and head.weight.dtype == torch.float32 and dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def head_copy_pays(batch: int, steps: int) -> bool:
    """Whether a generation of ``steps`` one-token steps over ``batch`` rows should copy the head for its
    one-row steps (``DecodeState.head_copy_ok``)."""
    return batch == 1 and steps >= MIN_STEPS_FOR_COPY


def copy_head(state: DecodeState, head: nn.Module) -> None:
    """Make ``state.head_t``, the (E, V) copy of ``head``'s weight, once per generation, if it pays."""
    if state.head_t is None and state.head_copy_ok:
        state.head_t = head.weight.detach().t().contiguous()


def step_logits(state: DecodeState, head: nn.Module, h: Tensor) -> Tensor:
    """``head(h)`` for the (..., E) outputs of a decoding step, in the fastest layout for its row count.

    A step of a few rows against a large output matrix (GPT-2's 50,257 x 256) is bound by reading the
    matrix, and on CPU how fast it is read depends on the layout: one row is ~2x faster against a
    contiguous (E, V) copy (``state.head_t``, made at the first one-row step when ``state.head_copy_ok``),
    and 2-8 rows ~1.4-5x faster as (V, E) @ (E, rows) than through ``F.linear`` (docs/performance.md).
    Other steps, devices, dtypes and heads, and anything autograd records: ``head(h)``.
    """
    rows = h.numel() // h.shape[-1]
    if rows > FEW_STEP_ROWS or not fast_head(head, h.device, h.dtype):
        return head(h)
    if rows == 1:
        if not torch.compiler.is_compiling():
            copy_head(state, head)
        if state.head_t is not None:
            return h @ state.head_t  # (..., E) @ (E, V)
    flat = h.reshape(rows, h.shape[-1])  # (N, E)
    return (head.weight @ flat.t()).t().contiguous().view(*h.shape[:-1], -1)  # (V, E) @ (E, N) -> (..., V)


def advance(state: DecodeState, tokens: Tensor, lengths: Tensor | None) -> tuple[Tensor, int]:
    """Mark the slots of the new (B, L) ``tokens`` and return their positions (B, L) and q_offset.

    With ``lengths``, only the first ``lengths[b]`` new tokens of row b are real.
    """
    length = tokens.shape[1]
    start = state.length
    if start + length > state.key_valid.shape[1]:
        raise ValueError(f"decoding past capacity: {start} slots used + {length} new > {state.key_valid.shape[1]}")
    real = key_valid(tokens, lengths, None, "tokens")
    state.gaps = state.gaps or real is not None
    real = torch.ones_like(tokens, dtype=torch.bool) if real is None else real
    state.key_valid[:, start : start + length] = real
    positions = state.next_pos[:, None] + torch.arange(length, device=tokens.device)  # (B, L)
    if state.key_pos is not None:
        state.key_pos[:, start : start + length] = positions
    state.next_pos = state.next_pos + real.sum(dim=1)
    return positions, start
