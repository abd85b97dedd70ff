"""The report's HTML building blocks: escaping, numbers, tables, embedded figures and notes."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path


def esc(value: object) -> str:
    """Text escaped for HTML (quotes too)."""
    return html.escape(str(value), quote=True)


def read_json(path: Path) -> dict | None:
    """A JSON file's content, None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def num(value: object, digits: int = 4) -> str:
    """A number for a table cell: ints with separators, floats rounded, NaN as n/a."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def interval(pair: object, digits: int = 4) -> str:
    """A (low, high) pair as "low–high", n/a when unknown."""
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        return "n/a"
    if all(num(v) == "n/a" for v in pair):
        return "n/a"
    return f"{num(pair[0], digits)}–{num(pair[1], digits)}"


def img(path: Path, alt: str, caption: str | None = None) -> str:
    """A figure with the PNG embedded as a data URI (or a note when the file is missing)."""
    if not path.exists():
        return f'<p class="missing">{esc(path.name)} is missing.</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def table(header: list[str], rows: list[list[str]], left: int = 1, last_left: bool = False) -> str:
    """An HTML table of already-escaped cells.

    The first ``left`` columns (and the last one with ``last_left``) are left-aligned text;
    the others are right-aligned numbers.
    """

    def cells(tag: str, row: list[str]) -> str:
        return "".join(
            f'<{tag} class="l">{c}</{tag}>'
            if i < left or (last_left and i == len(row) - 1)
            else f"<{tag}>{c}</{tag}>"
            for i, c in enumerate(row)
        )

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def missing(text: str) -> str:
    """A highlighted note saying what is missing and how to make it."""
    return f'<p class="missing">{esc(text)}</p>'
