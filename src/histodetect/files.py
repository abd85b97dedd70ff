"""Atomic file writes shared by every layer: readers never see half a file."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_problems_csv(path: Path, problems: list[tuple[str, str]]) -> None:
    """List patches that could not be used as a ``where,problem`` csv, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["where", "problem"])
    writer.writerows(problems)
    write_atomic(path, buf.getvalue().encode())
