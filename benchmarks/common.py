"""Shared by the benchmark scripts: where the real sample lives and how `train` is invoked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "pcam-sample"


def cli(*args: str | Path, env: dict | None = None) -> str:
    """Run `histodetect ARGS...`; its stdout, or exit with its error message."""
    proc = subprocess.run(
        [sys.executable, "-m", "histodetect.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        sys.exit(f"histodetect {args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


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

    Enough for speed and memory measurements, which do not depend on the weights. Its batch
    norms measure their statistics on 256 SYNTHETIC patches first: with the initial ones a
    fresh network outputs the same value everywhere, which would make comparing maps vacuous.
    """
    import numpy as np
    import torch

    from histodetect.config import RunConfig, merge, to_dict
    from histodetect.data.synth import render_patch
    from histodetect.data.transforms import to_model_input
    from histodetect.training.module import PatchModule
    from histodetect.training.run_folder import export_model

    cfg = merge(RunConfig(), {"model": {"arch": arch}}) if arch else RunConfig()
    run.mkdir(parents=True, exist_ok=True)
    module = PatchModule(to_dict(cfg))
    rng = np.random.default_rng(0)
    patches = torch.from_numpy(np.stack([render_patch(rng, i % 2)[0] for i in range(256)]))
    x = to_model_input(patches, cfg.data.mean, cfg.data.std, False)
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the batches below
    module.model.train()
    with torch.no_grad():
        for batch in x.split(64):
            module.model(batch)
    module.model.eval()
    export_model(module, run, {"synthetic": synthetic})
    return run


def save_results(name: str, lines: list[str]) -> None:
    """Print the figures and keep them in ``benchmarks/results/NAME.txt``."""
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.txt").write_text(text + "\n")
