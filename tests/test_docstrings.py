"""The public API's docstrings: every ``>>>`` example in the package runs and prints what it says, and
every name a public package exports exists and has a docstring.

The doctests are collected from the source, so an example added to any module is run here (without
``--doctest-modules``, which would import every module, the optional plotting ones included).
"""

import doctest
import importlib
import inspect
from pathlib import Path

import pytest

import maskattn

SRC = Path(maskattn.__file__).resolve().parent
WITH_EXAMPLES = sorted(
    ".".join(("maskattn", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for path in SRC.rglob("*.py")
    if ">>>" in path.read_text(encoding="utf-8")
)
PUBLIC = ("maskattn", "maskattn.masks", "maskattn.backends", "maskattn.layers", "maskattn.models")


def test_the_package_has_examples():
    assert "maskattn.masks.base" in WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run_as_written(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs={}):
        runner.run(test, out=lambda text: pytest.fail(text, pytrace=False))
    assert runner.summarize(verbose=False).attempted > 0


@pytest.mark.parametrize("package", PUBLIC)
def test_every_exported_name_exists_and_is_documented(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)  # AttributeError names a stale entry
        if inspect.isclass(value) or inspect.isroutine(value) or inspect.ismodule(value):
            assert (value.__doc__ or "").strip(), f"{package}.{name} has no docstring"


def test_every_task_entry_point_is_documented():
    from maskattn.tasks.base import tasks

    for name, task in tasks().items():
        for entry in (task.train, task.load, task.evaluate_file):
            assert (entry.__doc__ or "").strip(), f"{name}: {entry.__module__}.{entry.__name__} has no docstring"
