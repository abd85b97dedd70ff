"""benchmarks/gpu.py: a clear no-GPU message on CPU machines, and its code path in a smoke run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the benchmark as a user would, with every GPU hidden and a private cache."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HISTODETECT_CACHE": str(tmp_path / "c")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu.txt"
    done = run_script("--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("no GPU: torch.cuda.is_available() is False")
    assert "nothing was measured" in first and "was not written" in first
    assert "SYNTHETIC" in done.stdout and "--smoke" in done.stdout
    assert not out.exists()


@pytest.mark.slow  # trains and predicts on the CPU: about 20-60 s on two shared cores
def test_smoke_run_measures_every_figure_on_the_cpu(tmp_path):
    out = tmp_path / "results" / "gpu.txt"
    work = tmp_path / "work"
    args = ("--smoke", "--models", "densecnn", "--work", str(work), "--out", str(out))
    done = run_script(*args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    assert text.strip() in done.stdout
    assert "SMOKE TEST on the CPU" in text and "SYNTHETIC" in text
    lines = text.splitlines()
    # Metric names hold single spaces; columns are separated by two or more.
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines]
    table = {c[0]: c[1:] for c in cells if len(c) > 1}
    for row in (
        "raw train, model only (img/s)",
        "raw train + on-device aug (img/s)",
        "end-to-end train() (img/s)",
        "inference forward, fp32 (img/s)",
        "predict from store, TTA 1 (img/s)",
        "predict from store, TTA 8 (img/s)",
    ):
        value = table[row][0]
        assert value != "n/a" and float(value.replace(",", "")) > 0, row
    assert table["peak GPU memory, train() call"] == ["n/a"]  # no GPU, no figure
    assert any(line.startswith("one epoch (") and "min" in line for line in lines)
    # The store is a real packed store, marked SYNTHETIC, and the run a real run folder.
    assert '"synthetic": true' in (work / "store" / "store.json").read_text()
    assert list(work.glob("runs-*/run-densecnn/model.safetensors"))
