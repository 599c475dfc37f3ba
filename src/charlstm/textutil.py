"""Small text helpers: line ends, and layout for the terminal."""

from __future__ import annotations

import unicodedata


def normalise_newlines(text: str) -> str:
    """Strip a leading BOM and turn CRLF (and lone CR) line ends into LF."""
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def display_width(s: str) -> int:
    """Terminal columns of `s`: wide East Asian characters take two, combining marks none."""
    width = 0
    for ch in s:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def side_by_side(columns: list[tuple[str, str]], width: int = 40, gap: str = " │ ") -> str:
    """Lay texts out in columns of `width` characters, one column per (title, text)."""
    wrapped = []
    for title, text in columns:
        lines = [title, "─" * width]
        for line in text.split("\n"):
            while display_width(line) > width:
                lines.append(line[:width])
                line = line[width:]
            lines.append(line)
        wrapped.append(lines)
    height = max(len(c) for c in wrapped)
    rows = []
    for r in range(height):
        cells = []
        for col in wrapped:
            cell = col[r] if r < len(col) else ""
            cells.append(cell + " " * (width - display_width(cell)))
        rows.append(gap.join(cells).rstrip())
    return "\n".join(rows)
