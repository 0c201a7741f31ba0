"""A Markdown table from rows of formatted cells: the one renderer of the bench pages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_RULE = {"l": "---|", "r": "---:|"}


def md_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> str:
    """``| a | b |`` lines: the header, the rule (``align``: one ``l`` or ``r`` per column,
    left or right aligned), then one line per row of already formatted cells."""
    if len(align) != len(header) or set(align) - set(_RULE):
        raise ValueError(f"align {align!r}: one 'l' or 'r' per column of {list(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join(_RULE[a] for a in align)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
