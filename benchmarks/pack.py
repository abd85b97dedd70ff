"""Packing and store-reading speed on real patches, side by side in one run.

Usage: python benchmarks/pack.py [DATA]   (default: ../shared/pcam-sample beside the checkout)

Prints images/s of `histodetect pack` (the real command, process start-up included) and of a
plain one-process PIL decoding loop over the same files, their ratio (target >= 1.5 on 2 cores),
and random-batch reading speed from the packed store as normalised float tensors (target >
20,000 images/s).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SAMPLE
from PIL import Image

from histodetect.config import IMAGENET_MEAN, IMAGENET_STD
from histodetect.data.store import open_store
from histodetect.data.transforms import to_model_input

DEFAULT = SAMPLE


def pil_loop(files: list[Path]) -> float:
    """Images/s of the obvious baseline: one process, PIL, one file after another."""
    out = np.empty((len(files), 96, 96, 3), np.uint8)
    t0 = time.perf_counter()
    for k, f in enumerate(files):
        with Image.open(f) as im:
            out[k] = np.asarray(im.convert("RGB"))
    return len(files) / (time.perf_counter() - t0)


def pack_cli(data: Path, out: Path) -> float:
    """Images/s of `histodetect pack` as a user runs it (wall time of the whole command)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "histodetect.cli", "pack", str(data), "--out", str(out), "--quiet"],
        check=True,
    )
    return len(open_store(out)) / (time.perf_counter() - t0)


def read_batches(store_path: Path, batch: int = 256, seconds: float = 3.0) -> float:
    """Images/s of random batches read from the store and normalised to float NCHW tensors."""
    store = open_store(store_path)
    rng = np.random.default_rng(0)
    n, seen, t0 = len(store), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        idx = rng.integers(0, n, batch)
        x = to_model_input(torch.from_numpy(store.read(idx)), IMAGENET_MEAN, IMAGENET_STD)
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not (data / "train").is_dir():
        sys.exit(f"no Kaggle-layout data at {data}")
    files = sorted((data / "train").glob("*.tif"))
    for f in files:  # warm the page cache so neither contender pays for the first disk read
        f.read_bytes()
    print(f"data: {data} ({len(files)} patches), torch threads {torch.get_num_threads()}")
    baseline = pil_loop(files)
    with tempfile.TemporaryDirectory() as tmp:
        packed = pack_cli(data, Path(tmp) / "store")
        reading = read_batches(Path(tmp) / "store")
    print(f"plain PIL loop (1 process):        {baseline:9.0f} images/s")
    print(f"histodetect pack (whole command):  {packed:9.0f} images/s")
    print(f"ratio pack / PIL:                  {packed / baseline:9.2f}x   (target >= 1.5)")
    print(
        f"store random batches of 256 -> normalised float: {reading:9.0f} images/s"
        "   (target > 20000)"
    )


if __name__ == "__main__":
    main()
