"""The layering of the package, walked from the source and checked against README.md's layout table.

Rules (see ../shared/design/STYLE.md and README.md "Layout"): a module imports only from its own rank
or below; no module imports an underscore name from another module; matplotlib only in the modules
that draw pictures; no import cycle between the modules of one package.
"""

import ast
import re
from collections import defaultdict
from pathlib import Path

import maskattn

SRC = Path(maskattn.__file__).parent
README = SRC.parent.parent / "README.md"
MATPLOTLIB_ALLOWED = {"plotting", "viz", "cli"}


def _ranks() -> dict[str, int]:
    """``{group: rank}`` from README's layout table: rows ``| rank | layer | `module`, `package/` (what) ... |``."""
    section = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    ranks = {}
    for line in section.splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|[^|]*\|(.*)\|\s*$", line)
        if row:
            cell = re.sub(r"\([^)]*\)", "", row.group(2))  # parentheses describe; they name no module
            for name in re.findall(r"`([A-Za-z_]+)/?`", cell):
                ranks[name] = int(row.group(1))
    return ranks


RANKS = _ranks()


def _modules() -> dict[str, Path]:
    """``{"maskattn.masks.base": path, "maskattn.masks": path of __init__, ...}``."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _group(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every maskattn import, resolved to module names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maskattn":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULES:  # from maskattn.masks import base -> the module maskattn.masks.base
                    found.append((sub, None, node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "maskattn"]
    return found


def _uses_matplotlib(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "matplotlib" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "matplotlib":
            return True
    return False


def test_the_readme_table_is_read():
    assert RANKS["masks"] == 0 and RANKS["cli"] > RANKS["tasks"] > RANKS["models"] > RANKS["layers"]
    assert len(RANKS) >= 20


def test_every_module_has_a_layer():
    missing = sorted({_group(m) for m in MODULES} - set(RANKS))
    assert not missing, f"add these to README.md's layout table: {missing}"
    stale = sorted(set(RANKS) - {_group(m) for m in MODULES})
    assert not stale, f"README.md's layout table names modules that do not exist: {stale}"


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in MODULES.items():
        me = _group(module)
        for target, _, line in _imports(path):
            if RANKS[_group(target)] > RANKS[me]:
                wrong.append(f"{module}:{line} (rank {RANKS[me]}) imports {target} (rank {RANKS[_group(target)]})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for module, path in MODULES.items():
        for target, name, line in _imports(path):
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                wrong.append(f"{module}:{line} imports {name} from {target}")
    assert not wrong, "\n".join(wrong)


def test_matplotlib_only_where_pictures_are_drawn():
    wrong = [m for m, path in MODULES.items() if _uses_matplotlib(path) and _group(m) not in MATPLOTLIB_ALLOWED]
    assert not wrong, f"matplotlib imported outside {sorted(MATPLOTLIB_ALLOWED)}: {wrong}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_inside_a_package():
    # A package's __init__ re-exports its modules; modules importing each other must form no cycle.
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        package = module.rsplit(".", 1)[0]
        for target, _, _ in _imports(path):
            if target.rsplit(".", 1)[0] == package and target != module and MODULES[target].name != "__init__.py":
                graph[module].add(target)
        graph[module]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_architecture_md_names_the_modules_of_each_layer_as_the_layout_table_does():
    # docs/architecture.md's "0. Values and files" left out `errors` and "6. Tasks" `compression`, both in
    # README's table (what this file enforces) and described in those paragraphs
    text = (README.parent / "docs" / "architecture.md").read_text()
    headings = {int(rank): set(re.findall(r"`([A-Za-z_]+)/?`", names))
                for rank, names in re.findall(r"^\*\*(\d+)\. ([^*]*)\*\*", text, re.M)}
    by_rank = defaultdict(set)
    for name, rank in RANKS.items():
        by_rank[rank].add(name)
    assert headings == {rank: names for rank, names in by_rank.items() if rank in headings}
    assert set(headings) == set(range(9))  # 9, the package entry, is __init__ / __main__ alone
