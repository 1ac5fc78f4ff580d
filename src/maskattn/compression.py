"""Compressing a trained model for deployment: int8 linear layers and pruned attention heads
(``maskattn compress MODEL --out DIR --int8 --prune-heads 0.5 --data FILE``).

Shape legend: H heads and Hkv key/value heads of one attention module, D head dim.

* **int8**: every ``nn.Linear`` that owns its weight becomes an :class:`maskattn.layers.Int8Linear`
  (int8 weights with per-channel scales, activations quantised per call, PyTorch's x86 int8 kernel);
  a token table tied to an output projection becomes one :class:`maskattn.layers.Int8TokenEmbedding`
  that the projection shares (unless ``int8_embeddings=False``).
* **Head pruning** (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"): the importance
  of a head is the expected increase of the task's loss when its output is masked out, measured on a
  few batches of the task's training data; the least important heads across the model are removed
  from the q/k/v/out projections (:meth:`MultiHeadAttention.prune_heads`), then the model is fine-tuned
  for a few steps on the same data. With grouped-query attention the unit is a key/value group (its
  H / Hkv query heads and their shared key/value head). A head is masked by a gate on the output of its
  module's ``attend`` call, applied by a forward hook (:func:`head_gates`).

The compressed model is saved like any other (``"compression"`` in its config.json says what changed)
and loads with :func:`maskattn.load` and every prediction command.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskattn.errors import check_seed
from maskattn.layers import Int8Linear, MultiHeadAttention
from maskattn.models import compressed, load
from maskattn.tasks.base import TrainingBatches, tasks
from maskattn.tasks.common import log_stderr, read_task, write_task
from maskattn.training import TrainConfig, learning_rate


def attention_modules(model: nn.Module) -> dict[str, MultiHeadAttention]:
    """The model's attention modules, by the names of its declared ``attention_sites()``."""
    return {name: model.get_submodule(name) for name in model.attention_sites()}


@contextmanager
def head_gates(model: nn.Module, gates: Mapping[str, Tensor]) -> Iterator[None]:
    """While inside, multiply the output of head h of attention module ``name`` by ``gates[name][h]``.

    ``gates[name]`` is an (H,) tensor; 0 masks a head out, 1 keeps it. The gate acts on the output of
    the module's ``attend`` call (through a forward hook), before the heads are merged and projected.
    """
    modules = {name: model.get_submodule(name) for name in gates}
    for name, gate in gates.items():  # all checked before any hook is registered
        if gate.shape != (modules[name].num_heads,):
            raise ValueError(f"head_gates: gates[{name!r}] must be ({modules[name].num_heads},), "
                             f"got {tuple(gate.shape)}")
    handles = []
    for name, gate in gates.items():
        attn = modules[name]

        def hook(module: nn.Module, args: Any, output: Any, gate: Tensor = gate) -> Any:
            out, extra = output if isinstance(output, tuple) else (output, None)
            out = out * gate.to(out).view(1, -1, 1, 1)  # (B, H, Lq, D)
            return out if extra is None else (out, extra)

        handles.append(attn.attend.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mean_loss(model: nn.Module, data: TrainingBatches, batches: list[dict[str, Any]]) -> float:
    """The task loss per target over ``batches`` (summed losses / summed targets), without gradients."""
    with torch.no_grad():
        total = sum(float(data.loss(model, b)) for b in batches)
    return total / max(1, sum(b["num_targets"] for b in batches))


def first_batches(data: TrainingBatches, count: int) -> list[dict[str, Any]]:
    """The first ``count`` batches of ``data``'s epoch 0 (the batches head importance is measured on)."""
    chosen = [data.collate(idx) for idx in data.plan(0)[:count]]
    if not chosen:
        raise ValueError("the task data has no batches")
    return chosen


def _gates(model: nn.Module, removed: Mapping[str, set[int]]) -> dict[str, Tensor]:
    """Gates masking out the key/value groups in ``removed[name]`` of each attention module."""
    gates = {}
    for name, units in removed.items():
        attn = model.get_submodule(name)
        group = attn.num_heads // attn.num_kv_heads
        gate = torch.ones(attn.num_heads)
        for g in units:
            gate[g * group : (g + 1) * group] = 0.0
        gates[name] = gate
    return gates


def head_importance(model: nn.Module, data: TrainingBatches, batches: list[dict[str, Any]], *,
                    removed: Mapping[str, set[int]] | None = None,
                    only: Collection[str] | None = None) -> dict[str, Tensor]:
    """Expected loss change when each head (key/value group) is masked out: ``{module: (Hkv,) tensor}``.

    Measured in eval mode on ``batches`` (see :func:`first_batches`), one unit masked at a time, on top of
    the units in ``removed[name]`` (already masked; their score is ``inf``). With ``only``, the units of
    the other modules are not measured (score ``inf``).
    """
    model.eval()
    removed = {name: set(removed.get(name, ())) if removed else set() for name in attention_modules(model)}
    with head_gates(model, _gates(model, removed)):
        base = mean_loss(model, data, batches)
    importance = {}
    for name, attn in attention_modules(model).items():
        scores = torch.full((attn.num_kv_heads,), float("inf"))
        if only is not None and name not in only:
            importance[name] = scores
            continue
        for g in set(range(attn.num_kv_heads)) - removed[name]:
            with head_gates(model, _gates(model, {**removed, name: removed[name] | {g}})):
                scores[g] = mean_loss(model, data, batches) - base
        importance[name] = scores
    return importance


def choose_heads_greedy(model: nn.Module, data: TrainingBatches, batches: list[dict[str, Any]], fraction: float,
                        per_round: int = 1, log: Callable[[str], None] = log_stderr) -> dict[str, list[int]]:
    """Like :func:`choose_heads` over the whole model, but the importance is measured again after every
    ``per_round`` removals, with the units already chosen masked out: a head whose work another head
    duplicates stops looking unimportant once that other head is gone.

    Costs about ``units * rounds / 2`` loss evaluations on ``batches`` instead of ``units``.
    """
    _check_fraction(fraction)
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ValueError(f"per_round must be a positive int, got {per_round!r}")
    modules = attention_modules(model)
    group = {name: attn.num_heads // attn.num_kv_heads for name, attn in modules.items()}
    removed: dict[str, set[int]] = {name: set() for name in modules}
    target = round(fraction * sum(attn.num_heads for attn in modules.values()))
    count = 0

    def takeable(name: str) -> bool:  # within the target, and the module keeps a unit
        return count + group[name] <= target and modules[name].num_kv_heads - len(removed[name]) > 1

    while any(takeable(name) for name in modules):  # a module untakeable now stays so: it is not measured
        importance = head_importance(model, data, batches, removed=removed,
                                     only={name for name in modules if takeable(name)})
        units = sorted((float(score), name, g) for name, scores in importance.items() for g, score in enumerate(scores)
                       if g not in removed[name] and score < float("inf"))
        taken = 0
        for _, name, g in units:
            if taken == per_round:
                break
            if takeable(name):
                removed[name].add(g)
                count += group[name]
                taken += 1
        log(f"greedy head choice: {count} of {target} heads chosen")
    return _heads_of(modules, {name: set(range(attn.num_kv_heads)) - removed[name] for name, attn in modules.items()})


def choose_heads(model: nn.Module, importance: Mapping[str, Tensor], fraction: float, *,
                 per_module: bool = False) -> dict[str, list[int]]:
    """The heads to keep in each attention module when the least important ``fraction`` of all heads
    goes, counted over the whole model, removing whole key/value groups and keeping one in every module;
    with ``per_module``, the least important ``fraction`` of each module's groups goes instead (every
    module keeps the same share).

    Raises:
        ValueError: naming ``fraction`` when it is not in [0, 1).
    """
    _check_fraction(fraction)
    modules = attention_modules(model)
    group = {name: attn.num_heads // attn.num_kv_heads for name, attn in modules.items()}  # query heads per unit
    kept = {name: set(range(attn.num_kv_heads)) for name, attn in modules.items()}
    if per_module:
        for name, scores in importance.items():
            drop = min(round(fraction * len(scores)), len(scores) - 1)
            kept[name] -= {int(g) for g in scores.argsort()[:drop]}
    else:
        total = sum(attn.num_heads for attn in modules.values())
        target = round(fraction * total)
        units = sorted((float(score), name, g) for name, scores in importance.items() for g, score in enumerate(scores))
        removed = 0
        for _, name, g in units:
            if removed + group[name] <= target and len(kept[name]) > 1:
                kept[name].discard(g)
                removed += group[name]
    return _heads_of(modules, kept)


def removes_any_head(model: nn.Module, fraction: float, *, per_module: bool = False) -> bool:
    """Whether :func:`choose_heads` (or :func:`choose_heads_greedy`) removes at least one head at ``fraction``,
    whatever the heads' importance: the fraction is rounded to whole heads, taken in whole key/value groups, and
    every module keeps one group (so the first group the choice may take, it takes)."""
    modules = attention_modules(model)
    even = {name: torch.zeros(attn.num_kv_heads) for name, attn in modules.items()}
    kept = choose_heads(model, even, fraction, per_module=per_module)
    return any(len(kept[name]) < attn.num_heads for name, attn in modules.items())


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction!r}")


def _heads_of(modules: Mapping[str, MultiHeadAttention], kept: Mapping[str, set[int]]) -> dict[str, list[int]]:
    """The query heads of the kept key/value groups of each module (a group is one head without GQA)."""
    heads = {}
    for name, units in kept.items():
        group = modules[name].num_heads // modules[name].num_kv_heads
        heads[name] = [g * group + i for g in sorted(units) for i in range(group)]
    return heads


def _checked_keep(modules: Mapping[str, MultiHeadAttention], keep: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``keep`` as ``{module: sorted heads}`` for every attention module (unnamed ones keep all heads), after
    checking that it names only attention modules and leaves each at least one head."""
    if not isinstance(keep, Mapping):
        raise ValueError(f"keep_heads must be a mapping {{attention module: [heads]}}, got {type(keep).__name__}")
    unknown = sorted(set(keep) - set(modules))
    if unknown:
        raise ValueError(f"keep_heads names {unknown}, which are not attention modules of this model "
                         f"(it has {sorted(modules)})")
    return {name: attn.heads_to_keep(keep.get(name, list(range(attn.num_heads))), f"keep_heads[{name!r}]")
            for name, attn in modules.items()}


def prune(model: nn.Module, keep: Mapping[str, list[int]]) -> nn.Module:
    """Remove every head not in ``keep[name]`` from attention module ``name`` (see :func:`choose_heads`).

    Head dropout is switched off in the pruned model (modules and config): with one or two heads left
    in a module it would drop the module's whole attention, and the survivors are meant to be relied on.
    """
    for name, heads in keep.items():
        model.get_submodule(name).prune_heads(heads)
    return switch_off_head_dropout(model)


def switch_off_head_dropout(model: nn.Module) -> nn.Module:
    """Head dropout off in every attention module and in the model's config."""
    for attn in attention_modules(model).values():
        attn.head_dropout = 0.0
    if getattr(getattr(model, "config", None), "head_dropout", 0.0):
        model.config = dataclasses.replace(model.config, head_dropout=0.0)
    return model


def distillation_loss(logits: Tensor, teacher: Tensor, targets: Tensor, weight: float,
                      temperature: float = 1.0) -> Tensor:
    """Summed ``(1 - weight) * cross-entropy + weight * T^2 * KL(teacher_T || student_T)`` over N targets
    (Hinton et al., 2015; word-level for translation, Kim and Rush, 2016): (N, C), (N, C), (N,) -> scalar."""
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if not weight:
        return ce
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="sum")
    return (1 - weight) * ce + weight * temperature**2 * kl


def finetune_loss(model: nn.Module, data: TrainingBatches, batch: dict[str, Any], *, teacher: nn.Module | None = None,
                  distill: float = 0.0, temperature: float = 1.0) -> Tensor:
    """The fine-tune's loss of one batch, per target: the task loss, or with ``distill`` > 0 the
    :func:`distillation_loss` against ``teacher`` (no gradient flows into the teacher)."""
    if not distill:
        return data.loss(model, batch) / batch["num_targets"]
    logits, targets = data.outputs(model, batch)
    with torch.no_grad():
        reference, _ = data.outputs(teacher, batch)
    return distillation_loss(logits.float(), reference.float(), targets, distill, temperature) / batch["num_targets"]


def finetune(model: nn.Module, data: TrainingBatches, *, steps: int, lr: float = 1e-4, clip_norm: float = 1.0,
             schedule: str = "constant", warmup: int = 0, teacher: nn.Module | None = None, distill: float = 0.0,
             temperature: float = 1.0, bf16: bool = False, fade: Mapping[str, Tensor] | None = None,
             fade_steps: int = 0, seed: int | None = None, average_last: int = 1, average_every: int = 1,
             log: Callable[[str], None] = log_stderr) -> nn.Module:
    """``steps`` AdamW steps (gradients clipped at ``clip_norm``) on ``data``'s batches in order, epoch after
    epoch; each step's loss is per target. Returns the model in eval mode.

    ``fade`` (``{module: (H,) gate}``, 0 for the heads to remove, see :func:`head_gates`) fades those heads
    out linearly over the first ``fade_steps`` steps instead of removing them at once; from then on they
    are masked, so that :func:`prune` afterwards changes nothing the model computes.

    ``schedule`` and ``warmup`` shape the learning rate as in :class:`~maskattn.training.TrainConfig`
    ("constant" or "cosine" to zero). With a ``teacher`` (the unpruned model) and ``distill`` > 0 the loss
    is :func:`distillation_loss`; ``bf16`` runs the forward passes under bfloat16 autocast.

    ``seed`` (None: the data's own order and the global random state, as before) seeds the dropout draws
    and shuffles the order of each epoch's batches, so that runs with different seeds are different
    fine-tunes of one pruned model (members of a soup, :func:`maskattn.averaging.average_models`).

    ``average_last`` > 1 returns the mean of the weights after the last ``average_last`` of the steps
    ``steps, steps - average_every, ...`` (stochastic weight averaging along one fine-tune; 1: the last weights).
    """
    if steps < 0:
        raise ValueError(f"finetune steps must be >= 0, got {steps}")
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"finetune distill must be in [0, 1], got {distill!r}")
    if not temperature > 0:
        raise ValueError(f"finetune temperature must be > 0, got {temperature!r}")
    if distill and (teacher is None or data.outputs is None):
        raise ValueError("finetune distill > 0 needs a teacher and task data with outputs")
    if isinstance(fade_steps, bool) or not isinstance(fade_steps, int) or not 0 <= fade_steps <= max(steps, 0):
        raise ValueError(f"finetune fade_steps must be an int in [0, steps = {steps}], got {fade_steps!r}")
    check_seed(seed, "finetune seed", optional=True)
    snapshots = _snapshot_steps(steps, average_last, average_every, fade_steps)
    mean: dict[str, Tensor] = {}
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):  # the caller's random state stays
        order = None
        if seed is not None:  # seeds the dropout draws; ``order`` shuffles each epoch's batches
            torch.manual_seed(seed)
            order = torch.Generator().manual_seed(seed)
        sched = TrainConfig(steps=max(1, steps), lr=lr, schedule=schedule, warmup=warmup, min_lr_ratio=0.0)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        step, epoch = 0, 0
        while step < steps:
            plan = data.plan(epoch)
            if not plan:
                raise ValueError("finetune: the data has no batches")
            if order is not None:
                plan = [plan[i] for i in torch.randperm(len(plan), generator=order).tolist()]
            for idx in plan[: steps - step]:
                batch = data.collate(idx)
                gates = faded_gates(fade, step + 1, fade_steps) if fade else {}
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), head_gates(model, gates):
                    loss = finetune_loss(model, data, batch, teacher=teacher, distill=distill, temperature=temperature)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(sched, step + 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, clip_norm)
                optimizer.step()
                step += 1
                if len(snapshots) > 1 and step in snapshots:  # a running mean, in float32 whatever the weights' dtype
                    for name, value in model.state_dict().items():
                        if value.is_floating_point():
                            mean.setdefault(name, torch.zeros_like(value, dtype=torch.float32)).add_(
                                value.float(), alpha=1.0 / len(snapshots))
                if step % 10 == 0 or step == steps:
                    log(f"finetune step {step}/{steps}: loss {loss.item():.4f}")
            epoch += 1
    if len(snapshots) > 1:
        model.load_state_dict(mean, strict=False)  # buffers that are not floats keep their values
        log(f"finetune: the mean of the weights after steps {', '.join(map(str, sorted(snapshots)))}")
    return model.eval()


def _snapshot_steps(steps: int, last: int, every: int, fade_steps: int,
                    names: tuple[str, str] = ("finetune average_last", "finetune average_every")) -> set[int]:
    """The fine-tuning steps whose weights :func:`finetune` averages, checked (``names``: the arguments' names
    in the errors): ints >= 1, the first of them after the fade."""
    for name, value in zip(names, (last, every), strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    first = steps - (last - 1) * every
    if last > 1 and first <= fade_steps:
        raise ValueError(f"{names[0]} = {last} weights, {every} steps apart, start at step {first}, which must "
                         f"come after step {fade_steps} (the fade, or the start): fine-tune longer or average fewer")
    return set(range(first, steps + 1, every)) if last > 1 else {steps}


def faded_gates(fade: Mapping[str, Tensor], step: int, fade_steps: int) -> dict[str, Tensor]:
    """The gates of fine-tuning step ``step`` (from 1): heads gated 0 in ``fade`` at ``1 - step / fade_steps``
    (never below 0), the others at 1."""
    left = max(0.0, 1.0 - step / fade_steps) if fade_steps else 0.0
    return {name: gate + (1.0 - gate) * left for name, gate in fade.items()}


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (and int8 scales) of the Linear layers that own their weight; tied output
    projections, float or int8, are the embedding's and are not counted."""
    owners: dict[int, int] = {}
    for _, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        owners[id(tensor)] = owners.get(id(tensor), 0) + 1
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) == 1:
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear) and owners.get(id(m.weight), 0) == 1:
            total += m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * m.weight_scale.element_size()
    return total


def heads(model: nn.Module) -> int:
    """Attention heads in all of the model's attention modules."""
    return sum(attn.num_heads for attn in attention_modules(model).values())


# compress()'s settings that only the pruning reads (the command line's flags are these names with dashes)
_PRUNING_SETTINGS = ("fade_steps", "greedy", "per_module", "seed", "average_last", "data", "finetune_steps", "lr",
                     "importance_batches", "schedule", "warmup", "distill", "temperature", "bf16", "average_every",
                     "max_tokens")


def compress(directory: str | Path, out: str | Path, *, int8: bool = False, prune_heads: float = 0.0,
             data: list[str] | None = None, finetune_steps: int = 100, lr: float = 1e-4, importance_batches: int = 8,
             max_tokens: int = 2048, schedule: str = "constant", warmup: int = 0, distill: float = 0.0,
             temperature: float = 1.0, bf16: bool = False, int8_embeddings: bool = True, per_module: bool = False,
             greedy: int = 0, fade_steps: int = 0, keep_heads: Mapping[str, Sequence[int]] | None = None,
             seed: int | None = None, average_last: int = 1, average_every: int = 1,
             log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Compress the trained model in ``directory`` into ``out`` (a model directory with the same task).

    Args:
        directory: a model directory written by ``maskattn train``.
        out: the new model directory (not ``directory``).
        int8: quantise the linear layers to int8.
        int8_embeddings: with ``int8``, also the token tables that output projections are tied to (one
            shared int8 table; the projection over the vocabulary then runs in int8 too).
        prune_heads: fraction of all attention heads to remove (0 = none), before quantising.
        per_module: remove that fraction of each attention module's heads rather than of the model's.
        greedy: if > 0, choose the heads in rounds of this many, measuring the importance again after each
            round with the heads already chosen masked (:func:`choose_heads_greedy`; under bf16 autocast
            with ``bf16``).
        data: the task's training data files, read as its ``training_batches`` reads them (needed to prune).
        finetune_steps: fine-tuning steps after pruning.
        lr: fine-tuning learning rate.
        schedule, warmup: the fine-tune's learning-rate schedule ("constant", "cosine" or "linear") and warm-up
            steps.
        distill, temperature: weight and temperature of distillation from the unpruned model (0: plain loss).
        bf16: fine-tune under bfloat16 autocast.
        fade_steps: if > 0, the chosen heads are faded out over this many fine-tuning steps (masked after),
            then removed, instead of removed before the fine-tune (:func:`finetune`'s ``fade``).
        keep_heads: instead of ``prune_heads``: the heads to keep, ``{attention module: [query heads]}``
            (modules not named keep all their heads), e.g. the ``kept_heads`` of an earlier result, so that
            one choice of heads can be fine-tuned again (with another ``seed``) without measuring it again.
        seed: the fine-tune's seed (:func:`finetune`; None: the data's own order).
        average_last, average_every: keep the mean of the fine-tune's weights after its last ``average_last``
            steps ``average_every`` apart (:func:`finetune`; 1: its last weights).
        importance_batches: batches the head importance is measured on.
        max_tokens: padded tokens per batch.

    Returns:
        What changed: heads, linear-weight bytes and weight-file bytes before and after, the pruned
        heads, and the loss on the importance batches before pruning, after it and after the fine-tune.

    Raises:
        ValueError: naming the argument when there is nothing to do, the data is missing, or the task
            cannot be pruned.
    """
    directory, out = Path(directory), Path(out)
    if not int8 and not prune_heads and keep_heads is None:
        raise ValueError("compress: nothing to do; give --int8 and/or --prune-heads FRACTION (or --keep-heads)")
    if keep_heads is not None and (prune_heads or greedy or per_module):
        raise ValueError("compress: --keep-heads names the heads to keep; it cannot be combined with "
                         "--prune-heads, --greedy or --per-module, which choose them")
    for name, value in (("--greedy", greedy), ("--fade-steps", fade_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"compress: {name} must be an int >= 0, got {value!r}")
    if not int8_embeddings and not int8:  # it chooses what --int8 quantises
        raise ValueError("compress: --float-embeddings needs --int8 (it keeps token tables float when quantising)")
    if greedy and per_module:
        raise ValueError("compress: --greedy ranks heads over the whole model; it cannot be combined with --per-module")
    pruning = bool(prune_heads) or keep_heads is not None
    if prune_heads:
        _check_fraction(prune_heads)
    check_seed(seed, "compress: --seed", optional=True)
    for name, value, low in (("--finetune-steps", finetune_steps, 0), ("--importance-batches", importance_batches, 1),
                             ("--max-tokens", max_tokens, 1), ("--warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"compress: {name} must be an int >= {low}, got {value!r}")
    if not pruning:  # settings that shape the pruning or its fine-tune, changed from their defaults, do nothing
        given = locals()
        changed = [name for name in _PRUNING_SETTINGS if given[name] != _DEFAULTS[name] and given[name] != []]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise ValueError(f"compress: {flag} needs --prune-heads or --keep-heads (it shapes the pruning)")
    finite = {name: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
              for name, v in (("lr", lr), ("distill", distill), ("temperature", temperature))}
    for name, value, ok, expected in (("--lr", lr, finite["lr"] and lr > 0, "a number > 0"),
                                      ("--distill", distill, finite["distill"] and 0 <= distill <= 1, "in [0, 1]"),
                                      ("--temperature", temperature, finite["temperature"] and temperature > 0,
                                       "a number > 0")):
        if not ok:  # finetune refuses them too, but only after the heads' importance was measured
            raise ValueError(f"compress: {name} must be {expected}, got {value!r}")
    if fade_steps > finetune_steps:
        raise ValueError(f"compress: --fade-steps ({fade_steps}) must be at most --finetune-steps ({finetune_steps}), "
                         "or the faded heads would still count when they are removed")
    _snapshot_steps(finetune_steps, average_last, average_every, fade_steps,
                    ("compress: --average-last", "compress: --average-every"))  # (first: ints >= 1)
    if average_every != 1 and average_last == 1:
        raise ValueError("compress: --average-every sets the steps between averaged weights; it needs --average-last "
                         "N > 1")
    if out.resolve() == directory.resolve():
        raise ValueError(f"compress: --out ({out}) must differ from the model directory")
    settings = read_task(directory)
    model = load(directory).eval()
    if int8 and any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError(f"compress --int8: {directory} is already int8 (a copy would change nothing)")
    if pruning and any(isinstance(m, Int8Linear) for m in model.modules()):  # before the heads are measured
        raise ValueError(f"compress --prune-heads/--keep-heads: {directory} is int8; prune the float model it was "
                         "made from, with --int8 to quantise the result")
    if prune_heads and not removes_any_head(model, prune_heads, per_module=per_module):
        raise ValueError(f"compress: --prune-heads {prune_heads} removes no head of the {heads(model)} of {directory} "
                         "(the fraction is rounded to whole heads, or key/value groups, and each module keeps one); "
                         "give a larger fraction")
    result: dict[str, Any] = {"heads_before": heads(model), "linear_weight_bytes_before": linear_weight_bytes(model),
                              "file_bytes_before": (directory / "model.safetensors").stat().st_size}
    if pruning:
        task = tasks().get(settings.get("task"))
        if task is None or task.training_batches is None:
            raise ValueError(f"compress --prune-heads/--keep-heads: task {settings.get('task')!r} has no "
                             "training_batches; its models can be quantised (--int8) but not pruned")
        if not data:
            raise ValueError(f"compress --prune-heads/--keep-heads needs the task's training data: --data "
                             f"({task.data_help})")
        keep = _checked_keep(attention_modules(model), keep_heads) if keep_heads is not None else None
        if keep is not None and sum(map(len, keep.values())) == heads(model):
            raise ValueError(f"compress: --keep-heads keeps every one of the {heads(model)} heads of {directory} "
                             "(modules it does not name keep all theirs); name the heads to keep in the modules "
                             "to prune")
        batches = task.training_batches(directory, list(data), max_tokens)
        if not batches.plan(0):
            raise ValueError(f"compress --data {' '.join(map(str, data))}: no batches of rows in it (expected "
                             f"the task's training data: {task.data_help})")
        sample = first_batches(batches, importance_batches)
        if keep is None and greedy:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                keep = choose_heads_greedy(model, batches, sample, prune_heads, per_round=greedy, log=log)
        elif keep is None:
            keep = choose_heads(model, head_importance(model, batches, sample), prune_heads, per_module=per_module)
        result["loss_before"] = mean_loss(model, batches, sample)
        fade = None
        if fade_steps:  # keep every head through the fine-tune, fading the chosen ones out; remove them after
            fade = {name: torch.zeros(attn.num_heads).index_fill_(0, torch.tensor(keep[name], dtype=torch.long), 1.0)
                    for name, attn in attention_modules(model).items()}
            switch_off_head_dropout(model)
            with head_gates(model, fade):
                result["loss_pruned"] = mean_loss(model.eval(), batches, sample)
        else:
            prune(model, keep)
            result["loss_pruned"] = mean_loss(model.eval(), batches, sample)
        teacher = load(directory).eval() if distill else None
        finetune(model, batches, steps=finetune_steps, lr=lr, schedule=schedule, warmup=warmup, teacher=teacher,
                 distill=distill, temperature=temperature, bf16=bf16, fade=fade, fade_steps=fade_steps, seed=seed,
                 average_last=average_last, average_every=average_every, log=log)
        if fade_steps:
            prune(model, keep)
        result["loss_finetuned"] = mean_loss(model, batches, sample)
        result["kept_heads"] = keep
        log(f"pruned to {heads(model)} of {result['heads_before']} heads; loss {result['loss_before']:.4f} -> "
            f"{result['loss_pruned']:.4f} -> {result['loss_finetuned']:.4f} after {finetune_steps} steps")
    if int8:
        result["int8"] = compressed.quantize_linears(model, tied=int8_embeddings)
    model.save(out)
    write_task(out, settings)
    result.update(model=str(out), heads_after=heads(model), linear_weight_bytes_after=linear_weight_bytes(model),
                  file_bytes_after=(out / "model.safetensors").stat().st_size)
    return result


_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(compress).parameters.items()}
