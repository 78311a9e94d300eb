"""Help text for the terminal: module docstrings are written for the docs (reST ``literals``);
argparse prints them verbatim, so double backticks become the single ones a terminal reader
expects."""

from __future__ import annotations


def plain(doc: str | None) -> str:
    return (doc or "").replace("``", "`")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Rows under a header, each column as wide as its widest cell (the last one unpadded)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
