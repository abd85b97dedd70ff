"""Shared by the benchmark scripts: where the real sample lives and how `train` is invoked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "pcam-sample"


def train_cli(data: Path, run: Path, *flags: str, wait: bool = True, env=None):
    """Run `histodetect train --data DATA --out RUN FLAGS...` as a user would, quietly.

    With ``wait=False`` returns the running process instead (the caller waits for it).
    """
    process = subprocess.Popen(
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
        stdout=subprocess.DEVNULL,
        env=env,
    )
    if not wait:
        return process
    if process.wait():
        raise subprocess.CalledProcessError(process.returncode, process.args)
    return None


RESULTS = Path(__file__).resolve().parent / "results"


def untrained_run(run: Path, arch: str | None = None, synthetic: bool = False) -> Path:
    """Export an untrained model (default architecture unless ``arch``) as a run folder.

    Enough for speed and memory measurements, which do not depend on the weights.
    """
    from histodetect.config import RunConfig, merge, to_dict
    from histodetect.training.module import PatchModule
    from histodetect.training.run_folder import export_model

    cfg = merge(RunConfig(), {"model": {"arch": arch}}) if arch else RunConfig()
    run.mkdir(parents=True, exist_ok=True)
    export_model(PatchModule(to_dict(cfg)), run, {"synthetic": synthetic})
    return run


def save_results(name: str, lines: list[str]) -> None:
    """Print the figures and keep them in ``benchmarks/results/NAME.txt``."""
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.txt").write_text(text + "\n")
