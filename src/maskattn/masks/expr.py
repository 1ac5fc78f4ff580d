"""A small language for masks, for the command line: ``"causal & window(4) | ~padding(6)"``.

Grammar (``|`` binds loosest, then ``&``, then ``~``)::

    expr  := term ('|' term)*
    term  := unary ('&' unary)*
    unary := '~' unary | atom
    atom  := NAME [ '(' [ INT (',' INT)* ] ')' ] | '(' expr ')'

Names: ``causal``, ``full``, ``window(n)`` (= ``sliding_window``), ``padding(n, ...)`` (valid key
lengths per batch item), ``prefix(n)`` (= ``prefix_lm``), ``document(len, len, ...)`` (packed
documents given by their lengths).
"""

from __future__ import annotations

import re

import torch

from maskattn.masks.base import Mask
from maskattn.masks.kinds import causal, full, sliding_window
from maskattn.masks.tensor_kinds import document, padding, prefix_lm
from maskattn.masks.tiles import MAX_POSITION

TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_]\w*)|(?P<int>-?\d+)|(?P<op>[&|~(),]))")  # -n: refused by name


class MaskSyntaxError(ValueError):
    """A mask expression that cannot be read; the message points at the offending token."""

    def __init__(self, text: str, position: int, message: str) -> None:
        super().__init__(f"{message} at position {position}:\n  {text}\n  {' ' * position}^")
        self.position = position


MAX_DOCUMENT_POSITIONS = 1 << 24  # document(...) materialises one id per position


def _document(*lengths: int) -> Mask:
    if sum(lengths) > MAX_DOCUMENT_POSITIONS:
        raise ValueError(f"document() covers {sum(lengths)} positions in all; at most 2**24 here")
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return document(ids[None])


CONSTRUCTORS = {
    "causal": (causal, 0),
    "full": (full, 0),
    "window": (sliding_window, 1),
    "sliding_window": (sliding_window, 1),
    "padding": (lambda *n: padding(list(n)), -1),
    "prefix": (prefix_lm, 1),
    "prefix_lm": (prefix_lm, 1),
    "document": (_document, -1),
}


def names() -> str:
    """Every name of :data:`CONSTRUCTORS` as an expression writes it: ``causal, ..., window(n), padding(n,...)``."""
    forms = {0: "", 1: "(n)"}
    return ", ".join(f"{name}{forms.get(arity, '(n,...)')}" for name, (_, arity) in CONSTRUCTORS.items())


def _tokens(text: str) -> list[tuple[str, str, int]]:
    found, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = TOKEN.match(text, pos)
        if not m:
            start = len(text) - len(text[pos:].lstrip())
            raise MaskSyntaxError(text, start, f"unexpected character {text[start]!r}")
        kind = m.lastgroup
        found.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    found.append(("end", "", len(text)))
    return found


MAX_DEPTH = 100  # nested ~ and parentheses: deeper would exhaust Python's recursion in parsing and evaluation


def parse(text: str) -> Mask:
    """Read a mask expression; raise :class:`MaskSyntaxError` pointing at the offending token."""
    tokens = _tokens(text)
    i = 0
    depth = 0

    def deeper(pos: int) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise MaskSyntaxError(text, pos, f"the expression nests ~ and parentheses more than {MAX_DEPTH} deep")

    def peek() -> tuple[str, str, int]:
        return tokens[i]

    def take(expected: str | None = None) -> tuple[str, str, int]:
        nonlocal i
        kind, value, pos = tokens[i]
        if expected is not None and value != expected:
            shown = repr(value) if value else "the end"
            raise MaskSyntaxError(text, pos, f"expected {expected!r}, found {shown}")
        i += 1
        return kind, value, pos

    def expr() -> Mask:
        result = term()
        while peek()[1] == "|":
            take()
            result = result | term()
        return result

    def term() -> Mask:
        result = unary()
        while peek()[1] == "&":
            take()
            result = result & unary()
        return result

    def unary() -> Mask:
        nonlocal depth
        if peek()[1] == "~":
            deeper(take()[2])
            inner = unary()
            depth -= 1
            return ~inner
        return atom()

    def atom() -> Mask:
        nonlocal depth
        kind, value, pos = take()
        if value == "(":
            deeper(pos)
            inner = expr()
            take(")")
            depth -= 1
            return inner
        if kind != "name":
            shown = repr(value) if value else "the end"
            raise MaskSyntaxError(text, pos, f"expected a mask name or '(', found {shown}")
        if value not in CONSTRUCTORS:
            raise MaskSyntaxError(text, pos, f"unknown mask {value!r}; known: {', '.join(sorted(CONSTRUCTORS))}")
        make, arity = CONSTRUCTORS[value]
        args = []
        if peek()[1] == "(":
            take("(")
            while peek()[1] != ")" or args:  # `causal()`: no arguments, as the Python API writes it
                k, v, p = take()
                if k != "int":
                    shown = repr(v) if v else "the end"
                    raise MaskSyntaxError(text, p, f"expected an integer argument of {value}(), found {shown}")
                if int(v) < 0:
                    raise MaskSyntaxError(text, p, f"{value}(): a negative argument {v}; arguments are integers >= 0")
                if int(v) > MAX_POSITION:
                    raise MaskSyntaxError(text, p, f"{v} is too large for an argument of {value}() (at most 2**62)")
                args.append(int(v))
                if peek()[1] != ",":
                    break
                take(",")
            take(")")
        if (arity >= 0 and len(args) != arity) or (arity < 0 and not args):
            wanted = f"{arity} argument(s)" if arity >= 0 else "at least one argument"
            raise MaskSyntaxError(text, pos, f"{value} takes {wanted}, got {len(args)}")
        try:
            return make(*args)
        except (TypeError, ValueError) as e:
            raise MaskSyntaxError(text, pos, str(e)) from e

    result = expr()
    kind, value, pos = peek()
    if kind != "end":
        raise MaskSyntaxError(text, pos, f"unexpected {value!r}")
    return result
