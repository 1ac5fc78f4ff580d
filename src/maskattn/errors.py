"""The errors maskattn raises for bad input, as types, at the lowest layer.

A :class:`UsageError` means "what you gave is wrong" (a setting, a file, a directory, an argument):
the command line prints its message on one line and exits with status 2. Anything else that escapes
is a bug and shows its traceback. Every class here is also a ``ValueError`` (and, where it replaced
one, a ``KeyError`` or ``TypeError``), so ``except`` clauses written before these types existed still
catch them.

Standard library only; imports nothing from maskattn.
"""

from __future__ import annotations

import math


class UsageError(ValueError):
    """Bad input from the user: the message names the setting, file or argument and its value."""


class SettingError(UsageError):
    """A configuration setting is unknown, of the wrong type or out of range; the message names it."""


class UnknownSettingError(SettingError, KeyError):
    """A setting that does not exist (also a ``KeyError``, as before this type existed)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SettingTypeError(SettingError, TypeError):
    """A setting of the wrong type (also a ``TypeError``, as before this type existed)."""


class RunDirectoryError(UsageError):
    """A run directory that cannot be used as asked: not empty without resume or overwrite, or a file."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step. Not a usage error:
    the command line reports it on one line and exits with status 1."""


SEED_LIMIT = 2**63  # torch.manual_seed and torch.Generator take a seed below this (larger ones overflow)


def check_seed(value: object, name: str, *, optional: bool = False) -> None:
    """Raise a :class:`SettingError` naming ``name`` unless ``value`` is a seed: an int in [0, 2**63)
    (or None, where ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise SettingError(f"{name} must be {'None or ' if optional else ''}an int in [0, 2**63), got {value!r}")


def check_settings(owner: object, rules: dict[str, tuple[str, object]]) -> None:
    """Check settings of the dataclass ``owner``; raise one :class:`SettingError` naming the first bad one.

    ``rules`` maps a field name to ``(rule, argument)``:

    * ``("int>=", n)``: an int (not a bool) >= n;  ``("float>=", x)`` / ``("float>", x)``: a finite number >= / > x;
    * ``("in", (lo, hi, "[)"))``: a number in the interval, brackets saying which ends are closed;
    * ``("one of", choices)``: one of the given values;  ``("seed", None)``: see :func:`check_seed`.
    """
    for name, (rule, arg) in rules.items():
        value = getattr(owner, name)  # numbers are finite: inf passes `> 0` and trains to NaN
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if rule == "int>=":
            ok, want = isinstance(value, int) and not isinstance(value, bool) and value >= arg, f"an int >= {arg}"
        elif rule == "float>=":
            ok, want = number and value >= arg, f"a number >= {arg}"
        elif rule == "float>":
            ok, want = number and value > arg, f"a number > {arg}"
        elif rule == "in":
            lo, hi, ends = arg
            ok = number and (value >= lo if ends[0] == "[" else value > lo) and (
                value <= hi if ends[1] == "]" else value < hi)
            want = f"in {ends[0]}{lo}, {hi}{ends[1]}"
        elif rule == "one of":
            ok, want = value in arg, f"one of {', '.join(map(repr, arg))}"
        elif rule == "seed":
            check_seed(value, name)
            continue
        else:
            raise ValueError(f"check_settings: unknown rule {rule!r}")
        if not ok:
            raise SettingError(f"{name} must be {want}, got {value!r}")
