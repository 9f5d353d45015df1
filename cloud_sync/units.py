"""Pure: durations as operators type them (``90s``, ``10m``, ``12h``, ``30d``)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit s, m, h, d or w (default s).

    Raises:
        ValueError: not such a duration, or not positive; the message names the text.
    """
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"bad duration {text!r}: use a number and a unit, e.g. 90s, 10m, 12h, 30d")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"bad duration {text!r}: must be more than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The largest whole unit that fits, e.g. 5400 → ``90m``, 86400 → ``1d``."""
    for unit in ("w", "d", "h", "m"):
        n = seconds / _UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{seconds:g}s"


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a parser raising ValueError: its message, exit status 2."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert
