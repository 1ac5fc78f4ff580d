"""Every command written in README.md and docs/*.md parses as written.

The results in docs/ are re-run by others from the commands printed next to them, so a renamed flag or
setting must fail here, not in someone's 90-minute run. For each ```bash block: every `maskattn ...`
command is parsed by maskattn's own argument parser, and a `train` command's settings (`--set`, the
shortcuts) are resolved against its task's config, which names any unknown or mistyped key. Every
`python -m benchmarks.X` / `python -m recipes.X` command is parsed by that module's parser (it is stopped
right after parsing). Shell variables become placeholders (`$D/train.json` -> `1/train.json`), and a
command holding a literal `...` (an elided example) is skipped. Beside the blocks: every flag of an inline
`maskattn ...` fragment in the prose is one its subcommand takes, every `tests/...::name` the docs cite exists,
and every source file docs/architecture.md names exists.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from maskattn import cli, config
from maskattn.tasks.base import tasks

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STOP = {";", "&", "&&", "|", "||", "(", ")", "<", ">", ">>", ">&", "&>", "2>", "done", "then", "fi"}


def _logical_lines(path: Path):
    """(line number, text) of each command line in the file's bash blocks, continuations joined, with the
    variables of enclosing ``for VAR in A B ...`` loops set to their first value."""
    text = path.read_text(encoding="utf-8")
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        first = text.count("\n", 0, block.start()) + 2
        pending, start, loops = "", first, {}
        for offset, line in enumerate(block.group(1).splitlines()):
            for var, values in re.findall(r"\bfor (\w+) in ([^;]+);", line):
                loops[var] = shlex.split(values)[0]
            for var, value in loops.items():
                line = re.sub(rf"\$\{{?{var}\b\}}?", value, line)
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending = ""


def _words(line: str) -> list[str]:
    line = re.sub(r"\$\(.*\)", "1", line)  # command substitutions: their output is a path or a number
    line = re.sub(r"\$\{?\w+\}?", "1", line)  # shell variables
    line = line.split(" #", 1)[0]  # a trailing comment
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote inside a python -c string: not a command of ours
        return []


def _commands(words: list[str], head: tuple[str, ...]) -> list[list[str]]:
    """The argument lists of every command in ``words`` that starts with ``head``."""
    found = []
    for i in range(len(words)):
        if tuple(words[i : i + len(head)]) != head:
            continue
        before = words[i - 1] if i else ";"
        if not (before in STOP or before in ("do", "time", "nohup") or re.fullmatch(r"\w+=\S*", before)):
            continue  # an argument that happens to read "maskattn", not a command
        args = []
        for word in words[i + len(head) :]:
            if word in STOP or word.startswith(">"):
                if word.startswith(">") and args and re.fullmatch(r"\d", args[-1]):
                    args.pop()  # the "2" of "2>&1" or "2> log", split off by the lexer
                break
            args.append(word)
        found.append(args)
    return found


def _collect(head: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    found = []
    for path in FILES:
        for number, line in _logical_lines(path):
            for args in _commands(_words(line), head):
                if "..." not in args:
                    found.append((f"{path.name}:{number}", args))
    return found


MASKATTN = _collect(("maskattn",))
MODULES = [(where, args) for module in ("benchmarks", "recipes")
           for where, args in _collect(("python", "-m")) if args and args[0].startswith(module + ".")]


def test_the_docs_have_commands_to_check():
    assert len(MASKATTN) >= 50 and len(MODULES) >= 20


@pytest.mark.parametrize("where,args", MASKATTN, ids=[w for w, _ in MASKATTN])
def test_maskattn_command_parses(where, args, capsys):
    parser = cli.build_parser()
    try:
        parsed = cli._parse(parser, args)
    except SystemExit as e:
        pytest.fail(f"{where}: `maskattn {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()} "
                    f"(exit {e.code})")
    if parsed.command != "train" or (parsed.config and not Path(parsed.config).exists()):
        return
    assignments = list(parsed.set)
    for name in cli.shortcuts():
        if getattr(parsed, name):
            assignments.append(f"data.{name}={json.dumps(getattr(parsed, name), ensure_ascii=False)}")
    try:
        config.load(tasks()[parsed.task].config(), parsed.config, assignments)
    except (ValueError, TypeError, KeyError) as e:
        pytest.fail(f"{where}: `maskattn {' '.join(args)}`: its settings do not resolve: {e}")


class _ParsedError(Exception):
    pass


@pytest.mark.parametrize("where,args", MODULES, ids=[w for w, _ in MODULES])
def test_module_command_parses(where, args, monkeypatch, capsys):
    module = importlib.import_module(args[0])
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise _ParsedError

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [args[0], *args[1:]])
    try:
        module.main(args[1:]) if _takes_argv(module.main) else module.main()
    except _ParsedError:
        return
    except SystemExit as e:
        pytest.fail(f"{where}: `python -m {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()} "
                    f"(exit {e.code})")
    pytest.fail(f"{where}: python -m {args[0]} ran without parsing its arguments with argparse")


def _takes_argv(main) -> bool:
    import inspect

    return bool(inspect.signature(main).parameters)


def test_the_readme_run_toml_is_the_run_that_its_resume_command_continues(tmp_path):
    # the README's resume line (`--config run.toml --resume`, with the run.toml it shows) continued
    # runs/translation, not the runs/multi30k trained just above it, without validation data
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    (tmp_path / "run.toml").write_text(block.replace("../shared/data/multi30k", "1"), encoding="utf-8")
    trains = [args for where, args in MASKATTN if where.startswith("README") and args[:2] == ["train", "translation"]]
    first = cli._parse(cli.build_parser(), trains[0])
    assignments = [f"out={json.dumps(first.out)}", *first.set]
    for name in cli.shortcuts():
        if getattr(first, name):
            assignments.append(f"data.{name}={json.dumps(getattr(first, name))}")
    defaults = tasks()["translation"].config()
    assert config.load(defaults, tmp_path / "run.toml") == config.load(defaults, None, assignments)


DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_flag_of_an_inline_maskattn_command_is_a_flag_of_that_command():
    # the prose's `maskattn evaluate --min-new-tokens N` and the like are fragments the bash blocks' check
    # cannot parse; each flag must still be one its subcommand takes
    wrong, program = [], cli.build_parser()
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for span in re.finditer(r"`(maskattn [^`]+)`", text):
            parser, words = program, span.group(1).split()[1:]
            while words and words[0] in _subcommands(parser):
                parser = _subcommands(parser)[words.pop(0)]
            flags = {flag for action in parser._actions for flag in action.option_strings}
            wrong += [f"{path.name}:{text.count(chr(10), 0, span.start()) + 1}: `{span.group(1)}`: {flag}"
                      for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span.group(1)) if flag not in flags]
    assert not wrong, "flags their command does not take:\n" + "\n".join(wrong)


def test_every_test_the_docs_name_exists():
    # docs/reliability.md cited test_a_second_config_file_is_refused_not_read_instead_of_the_first in
    # tests/test_config.py; it lives in tests/test_cli.py
    wrong = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for ref in re.finditer(r"(tests/test_\w+\.py)(?:::(\w+))?", text):
            file, name = ROOT / ref.group(1), ref.group(2)
            if not file.is_file() or (name and not re.search(rf"^(def {name}\(|{name} = )", file.read_text(), re.M)):
                wrong.append(f"{path.name}:{text.count(chr(10), 0, ref.start()) + 1}: {ref.group(0)}")
    assert not wrong, "no such test:\n" + "\n".join(wrong)


def test_every_source_file_architecture_md_names_exists():
    package = ROOT / "src" / "maskattn"
    files = {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    named = set(re.findall(r"`(?:maskattn/)?((?:\w+/)*\w+\.py)`", (ROOT / "docs" / "architecture.md").read_text()))
    assert named
    missing = sorted(name for name in named
                     if not (ROOT / name).is_file() and not any(f == name or f.endswith("/" + name) for f in files))
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
