"""Metrics per group of patches (centre, scanner, slide...), with the worst group named."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError


def read_groups(
    column: str, ids: list[str], data: str | Path, table: str | Path | None = None
) -> np.ndarray:
    """Each patch's value of ``column``, read from ``table`` or else DATA's ``meta.csv``.

    Args:
        column: the csv column that names a patch's group.
        ids: the scored patches' ids.
        data: the scored data folder (its ``meta.csv`` is the default table).
        table: a csv with an ``id`` column and ``column``.

    Raises:
        HistodetectError: no table, no such column, or scored patches the table leaves out.
    """
    path = Path(table) if table else Path(data) / "meta.csv"
    if not path.is_file():
        raise HistodetectError(
            f"--by {column}: {path} not found; pass --groups CSV (columns id,{column})."
        )
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if "id" not in header or column not in header:
            raise HistodetectError(
                f"{path}: needs columns 'id' and {column!r}; it has {', '.join(header) or 'none'}."
            )
        value = {row["id"].strip(): row[column].strip() for row in reader}
    missing = [i for i in ids if i not in value]
    if missing:
        raise HistodetectError(
            f"{path}: no {column!r} for {len(missing)} scored patch(es), e.g. {missing[0]}."
        )
    return np.array([value[i] for i in ids], dtype=object)


def group_metrics(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, threshold: float, point_metrics: Callable
) -> dict:
    """ROC AUC, accuracy, sensitivity and specificity per group, and the worst group by AUC.

    ``point_metrics(y, p, threshold)`` is evaluate's, passed in so the two modules do not import
    each other. A group with one class only has no AUC (its accuracy is still given), and cannot
    be the worst.
    """
    rows = []
    for name in sorted(set(groups)):
        keep = groups == name
        m = point_metrics(y[keep], p[keep], threshold)
        rows.append(
            {
                "group": str(name),
                "n": int(keep.sum()),
                "positives": int(y[keep].sum()),
                **{k: m[k] for k in ("auc", "accuracy", "sensitivity", "specificity")},
            }
        )
    scored = [r for r in rows if r["auc"] == r["auc"]]
    worst = min(scored, key=lambda r: r["auc"])["group"] if scored else None
    return {"rows": rows, "worst": worst}


def describe_groups(by: str, result: dict) -> str:
    """The per-group table for the terminal."""
    lines = [f"  by {by}: {'group':<20s} {'n':>6s} {'pos':>5s} {'AUC':>7s} {'acc':>7s}"]
    for r in result["rows"]:
        auc = f"{r['auc']:.4f}" if r["auc"] == r["auc"] else "n/a"
        mark = "  <- worst" if r["group"] == result["worst"] else ""
        lines.append(
            f"  {'':<{len(by) + 4}s}{r['group'][:20]:<20s} {r['n']:>6d} {r['positives']:>5d} "
            f"{auc:>7s} {r['accuracy']:>7.4f}{mark}"
        )
    return "\n".join(lines)
