"""Pure: rollout target expressions — which devices a rollout may touch.

Grammar (whitespace around operators is optional; keywords are case-insensitive)::

    expr  := and ( ("," | "or") and )*          comma or ``or``: either side matches
    and   := unary ( ("&" | "and") unary )*    ``&`` or ``and``: both sides match
    unary := ("!" | "not") unary | atom         negation
    atom  := "(" expr ")" | term
    term  := "*" | "all"                        every device
           | "id:" DEVICE | DEVICE              one device by id
           | "group:" NAME                      devices in a group
           | "tag:" KEY "=" VALUE               devices whose tag KEY equals VALUE
           | "tag:" KEY                         devices that have tag KEY at all

``not`` binds tighter than ``and``, which binds tighter than ``,``/``or``:
``group:lobby & !tag:site=berlin, cam-7`` is ``(lobby and not berlin) or cam-7``. A device
whose id is a keyword (``all``, ``and``, ``or``, ``not``) is written ``id:all``. Tag values end
at whitespace or one of ``,&!()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.protocol.state import DEVICE_ID_PATTERN
from cloud_sync.rollout.fleet import DeviceView

_DEVICE = re.compile(DEVICE_ID_PATTERN)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_TOKEN = re.compile(r"\s*(?:(?P<op>[(),&!*])|(?P<word>[^\s(),&!]+))")
_KEYWORDS = {"and", "or", "not", "all"}


@dataclass(frozen=True)
class Everything:
    """``*`` / ``all``."""

    def matches(self, device: DeviceView) -> bool:
        """Always true."""
        return True

    def __str__(self) -> str:
        return "*"


@dataclass(frozen=True)
class IdIs:
    """``id:DEVICE``."""

    device_id: str

    def matches(self, device: DeviceView) -> bool:
        """The device has this id."""
        return device.device_id == self.device_id

    def __str__(self) -> str:
        return f"id:{self.device_id}"


@dataclass(frozen=True)
class InGroup:
    """``group:NAME``."""

    group: str

    def matches(self, device: DeviceView) -> bool:
        """The device is in the group."""
        return self.group in device.groups

    def __str__(self) -> str:
        return f"group:{self.group}"


@dataclass(frozen=True)
class HasTag:
    """``tag:KEY=VALUE``, or ``tag:KEY`` (value None) for "has the tag"."""

    key: str
    value: str | None

    def matches(self, device: DeviceView) -> bool:
        """The device carries the tag (with this value, if one is given)."""
        if self.value is None:
            return self.key in device.tags
        return device.tags.get(self.key) == self.value

    def __str__(self) -> str:
        return f"tag:{self.key}" if self.value is None else f"tag:{self.key}={self.value}"


@dataclass(frozen=True)
class Not:
    """``!term``."""

    term: Node

    def matches(self, device: DeviceView) -> bool:
        """The inner term does not match."""
        return not self.term.matches(device)

    def __str__(self) -> str:
        inner = str(self.term)
        return (
            f"!{inner}"
            if isinstance(self.term, (Everything, IdIs, InGroup, HasTag))
            else (f"!({inner})")
        )


@dataclass(frozen=True)
class AndOf:
    """``a & b & …``."""

    terms: tuple[Node, ...]

    def matches(self, device: DeviceView) -> bool:
        """Every term matches."""
        return all(t.matches(device) for t in self.terms)

    def __str__(self) -> str:
        return " & ".join(f"({t})" if isinstance(t, OrOf) else str(t) for t in self.terms)


@dataclass(frozen=True)
class OrOf:
    """``a, b, …``."""

    terms: tuple[Node, ...]

    def matches(self, device: DeviceView) -> bool:
        """Some term matches."""
        return any(t.matches(device) for t in self.terms)

    def __str__(self) -> str:
        return ", ".join(str(t) for t in self.terms)


Node = Everything | IdIs | InGroup | HasTag | Not | AndOf | OrOf


@dataclass(frozen=True)
class Target:
    """A parsed target expression.

    Attributes:
        text: the expression as the operator typed it.
        root: its syntax tree.
    """

    text: str
    root: Node

    def matches(self, device: DeviceView) -> bool:
        """Whether ``device`` is targeted (by id, groups and tags only)."""
        return self.root.matches(device)

    def __str__(self) -> str:
        """The expression in canonical form (``,``, ``&``, ``!``, minimal parentheses)."""
        return str(self.root)


class _Parser:
    """Recursive descent over the tokens of one expression."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, int]] = []  # (token, position)
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:  # only trailing whitespace is left
                break
            start = m.start("op") if m.group("op") else m.start("word")
            self.tokens.append((m.group("op") or m.group("word"), start))
            pos = m.end()
        self.i = 0

    def fail(self, why: str, token: str | None = None) -> ValueError:
        if token is None:
            token, pos = self.tokens[self.i] if self.i < len(self.tokens) else ("", len(self.text))
        else:
            pos = self.tokens[self.i - 1][1] if self.i else 0
        where = f"at token {token!r} (position {pos})" if token else "at the end"
        return ValueError(f"bad target {self.text!r}: {why} {where}")

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def is_(self, *words: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.lower() in words

    def take(self) -> str:
        tok = self.tokens[self.i][0]
        self.i += 1
        return tok

    def parse(self) -> Node:
        if not self.tokens:
            raise ValueError(
                f"bad target {self.text!r}: empty; use e.g. '*', 'group:lobby', 'tag:site=berlin'"
            )
        node = self.expr()
        if self.peek() is not None:
            raise self.fail("expected ',', '&', 'and', 'or' or the end")
        return node

    def _chain(self, ops: tuple[str, ...], sub: Callable[[], Node]) -> list[Node]:
        terms = [sub()]
        while self.is_(*ops):
            self.take()
            terms.append(sub())
        return terms

    def expr(self) -> Node:
        terms = self._chain((",", "or"), self.conj)
        return terms[0] if len(terms) == 1 else OrOf(tuple(terms))

    def conj(self) -> Node:
        terms = self._chain(("&", "and"), self.unary)
        return terms[0] if len(terms) == 1 else AndOf(tuple(terms))

    def unary(self) -> Node:
        if self.is_("!", "not"):
            self.take()
            return Not(self.unary())
        return self.atom()

    def atom(self) -> Node:
        tok = self.peek()
        if tok is None:
            raise self.fail("expected a term (id, group:, tag:, * or '(')")
        if tok == "(":
            self.take()
            node = self.expr()
            if self.peek() != ")":
                raise self.fail("expected ')' to close the '(' before")
            self.take()
            return node
        if tok in {")", ",", "&", "!"} or tok.lower() in _KEYWORDS - {"all"}:
            raise self.fail("expected a term (id, group:, tag:, * or '(')")
        return self.term(self.take())

    def term(self, tok: str) -> Node:
        if tok == "*" or tok.lower() == "all":
            return Everything()
        kind, colon, rest = tok.partition(":")
        if not colon:
            if not _DEVICE.match(tok):
                raise self.fail("not a device id (letters, digits, '_', '.', '-')", tok)
            return IdIs(tok)
        if kind == "id":
            if not _DEVICE.match(rest):
                raise self.fail("not a device id (letters, digits, '_', '.', '-')", tok)
            return IdIs(rest)
        if kind == "group":
            if not _NAME.match(rest):
                raise self.fail("not a group name (letters, digits, '_', '.', '-')", tok)
            return InGroup(rest)
        if kind == "tag":
            key, eq, value = rest.partition("=")
            if not _TAG_KEY.match(key):
                raise self.fail("tag key must be letters, digits, '_', '.', '-'", tok)
            if eq and not value:
                raise self.fail("tag value is empty (write tag:KEY to match any value)", tok)
            return HasTag(key, value if eq else None)
        raise self.fail(f"unknown term kind {kind + ':'!r} (expected id:, group: or tag:)", tok)


def parse_target(expr: str) -> Target:
    """Parse a target expression (grammar in the module docstring).

    Raises:
        ValueError: the expression does not parse; the message names the bad token and its
            position.
    """
    return Target(text=expr, root=_Parser(expr).parse())


__all__ = [
    "AndOf",
    "Everything",
    "HasTag",
    "IdIs",
    "InGroup",
    "Node",
    "Not",
    "OrOf",
    "Target",
    "parse_target",
]
