"""Shared by the benchmark scripts: where the real sample lives and how `train` is invoked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "pcam-sample"


def train_cli(data: Path, run: Path, *flags: str) -> None:
    """Run `histodetect train --data DATA --out RUN FLAGS...` as a user would, quietly."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "histodetect.cli",
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            *flags,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
