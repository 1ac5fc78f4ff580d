"""``model.summary()``: a Keras-like table of layers, output shapes and parameter counts.

The output shapes come from one forward pass on example inputs (hooks record them, then are
removed); parameter counts include a module's children, and tied parameters count once in the total.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def summary(model: nn.Module, *inputs: Any, depth: int = 2, **kwargs: Any) -> str:
    """The table for ``model`` run on ``inputs`` / ``kwargs``, modules nested up to ``depth`` deep (0: totals only)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"summary: depth must be an int >= 0 (how deep nested modules are listed), got {depth!r}")
    shapes: dict[str, str] = {}
    hooks = []
    modules = [(name, level, m) for name, level, m in _rows(model) if level <= depth]
    for name, _, module in modules:
        hooks.append(module.register_forward_hook(_recorder(name, shapes)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    rows = [("Layer (type)", "Output shape", "Param #")]
    for name, level, module in modules:
        parts = name.split(".")
        short = ".".join(parts[-2:] if parts[-1].isdigit() else parts[-1:])  # layers.0, self_attn
        label = "  " * (level - 1) + f"{short} ({type(module).__name__})"
        count = sum(p.numel() for p in module.parameters())
        rows.append((label, shapes.get(name, "-"), f"{count:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "=" * (sum(widths) + 4)
    lines = [f"{type(model).__name__}", line]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows[:1]] + [line]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows[1:]] + [line]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines += [f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)


def _rows(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(name, nesting level, module), skipping containers (ModuleList/ModuleDict) as levels and rows."""
    containers = (nn.ModuleList, nn.ModuleDict)
    levels = {"": 0}
    rows = []
    for name, module in model.named_modules(remove_duplicate=False):  # shared modules under each name
        if not name:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        parent_is_container = isinstance(model.get_submodule(parent), containers) if parent else False
        levels[name] = levels[parent] + (0 if parent_is_container else 1)
        if not isinstance(module, containers):
            rows.append((name, levels[name], module))
    return rows


def _recorder(name: str, shapes: dict[str, str]) -> Callable:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        tensor = _first_tensor(output)
        if name not in shapes and tensor is not None:  # a shared module keeps its first call
            shapes[name] = str(tuple(tensor.shape))

    return hook


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    items = x.values() if isinstance(x, dict) else x if isinstance(x, list | tuple) else []
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


class Summary:
    """Mixin: ``model.summary()`` prints (and returns) the table, on example inputs by default."""

    def example_inputs(self) -> tuple[Tensor, ...]:
        """A (1, 8) batch of token ids (override for models with other inputs)."""
        config = self.config
        length = min(8, config.max_len)
        ids = torch.arange(length).remainder(config.vocab_size).unsqueeze(0)
        if getattr(config, "pad_id", None) is not None:
            ids = ids.masked_fill(ids == config.pad_id, (config.pad_id + 1) % config.vocab_size)
        return (ids.to(next(self.parameters()).device),)

    def summary(self, *inputs: Any, depth: int = 2, print_fn: Callable[[str], Any] | None = print,
                **kwargs: Any) -> str:
        """Print and return the table; ``inputs``/``kwargs`` go to ``forward`` (default example ids)."""
        table = summary(self, *(inputs or self.example_inputs()), depth=depth, **kwargs)
        if print_fn is not None:
            print_fn(table)
        return table
