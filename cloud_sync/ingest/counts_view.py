"""Pure: the fleet's zone and line counts as ``edgefleet fleet counts`` and the web page show them.

``merge_counts`` joins the store's latest counts (``Store.latest_counts``: running since the
agent started) with their increase over a window (``Store.count_increase``, restarts handled);
``format_counts`` prints the result as a table, one line per device, pipeline, zone or line and
class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["COUNTERS", "format_counts", "merge_counts"]

KEY = ("device_id", "pipeline", "kind", "region", "label")
# the counters of each kind, as the store names them (``exited`` is the contract's ``left``)
COUNTERS = {"zone": ("entered", "exited", "dwell"), "line": ("crossed_in", "crossed_out")}
_ZONE_WORDS = {"entered": "entered", "exited": "left", "dwell": "dwell"}
_LINE_WORDS = {"crossed_in": "in", "crossed_out": "out"}


def merge_counts(
    latest: Sequence[Mapping[str, Any]], increase: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per series: its latest counts, and with ``increase`` given, ``increase`` (the
    kind's counters → how much each grew in the window, None without samples in it) and
    ``resets`` (agent restarts seen in the window).

    Series only in ``increase`` (a zone or line configured away since) come last, with their
    latest counts None.
    """
    counters = [c for cs in COUNTERS.values() for c in cs]
    inc = {tuple(r[k] for k in KEY): r for r in increase or ()}
    out: list[dict[str, Any]] = []
    for r in latest:
        row = dict(r)
        if increase is not None:
            i = inc.pop(tuple(r[k] for k in KEY), None)
            row["increase"] = None if i is None else {c: i[c] for c in COUNTERS[r["kind"]]}
            row["resets"] = None if i is None else i["resets"]
        out.append(row)
    for key, i in inc.items():
        row = {
            **dict(zip(KEY, key, strict=True)),
            "ts": None,
            **dict.fromkeys([*counters, "inside"]),
        }
        row["increase"] = {c: i[c] for c in COUNTERS[i["kind"]]}
        row["resets"] = i["resets"]
        out.append(row)
    return out


def _counts_text(r: Mapping[str, Any]) -> str:
    if r.get("ts") is None:
        return "(not in the latest telemetry)"
    if r["kind"] == "line":
        return "  ".join(f"{w} {r[c]}" for c, w in _LINE_WORDS.items())
    return "  ".join(f"{w} {r[c]}" for c, w in _ZONE_WORDS.items()) + f"  inside {r['inside']}"


def _change_text(r: Mapping[str, Any], since: str) -> str:
    inc = r.get("increase")
    if inc is None:
        return f"no samples in {since}"
    words = _LINE_WORDS if r["kind"] == "line" else _ZONE_WORDS
    text = ", ".join(f"+{inc[c]} {w}" for c, w in words.items()) + f" in {since}"
    n = r.get("resets") or 0
    return text + (f" ({n} restart{'s' if n != 1 else ''})" if n else "")


def format_counts(rows: Sequence[Mapping[str, Any]], since: str | None) -> str:
    """A table of ``merge_counts`` rows; ``since`` (e.g. ``"1h"``) names the window, None when
    no increase was asked for."""
    if not rows:
        return "no zone or line counts yet"
    table = [["DEVICE", "PIPELINE", "REGION", "CLASS", "COUNTS (since agent start)"]]
    if since is not None:
        table[0].append("CHANGE")
    for r in rows:
        cells = [r["device_id"], r["pipeline"], f"{r['kind']} {r['region']}", r["label"],
                 _counts_text(r)]  # fmt: skip
        if since is not None:
            cells.append(_change_text(r, since))
        table.append(cells)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    )
