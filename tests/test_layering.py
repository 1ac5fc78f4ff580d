"""The dependency direction of the package, walked from the source (see shared design STYLE.md)."""

import ast
from pathlib import Path

import maskattn

SRC = Path(maskattn.__file__).parent

# Lower rank = lower layer. A module may import only from modules of a lower or equal-rank group.
RANKS = {
    "io": 0, "masks": 0,
    "backends": 1,
    "dispatch": 2, "weights": 2, "explanation": 3,
    "layers": 3,
    "models": 4,
    "decoding": 5, "data": 5, "tokenization": 5, "training": 5, "checkpoint": 5, "metrics": 5, "config": 5,
    "distributed": 5, "export": 5,
    "tasks": 6, "averaging": 6,
    "viz": 7, "plotting": 7, "audit": 7, "explorer": 6, "demo": 7, "showcase": 7, "hf": 7, "cli": 8,
    "__init__": 9, "__main__": 9,
}


def _group(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "maskattn":
            found.update(f"maskattn.{a.name}" for a in node.names)  # from maskattn import masks
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskattn"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("maskattn"))
    return found


def test_every_module_has_a_layer():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        group = _group(".".join(rel.parts))
        assert group in RANKS, f"{rel}: add its layer to RANKS"


def test_imports_point_down_the_layers():
    wrong = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        me = _group(".".join(rel.parts))
        for target in _imports(path):
            target_group = "__init__" if target == "maskattn" else _group(target)
            if RANKS[target_group] > RANKS[me]:
                wrong.append(f"{rel} ({me}) imports {target} ({target_group})")
    assert not wrong, "\n".join(wrong)
