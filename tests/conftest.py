"""Shared fixtures: tiny generated data sets in every supported layout."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

CHROMIUM = Path("/usr/bin/chromium")
# Headless Chromium kept off the network: the pages under test must work offline.
CHROMIUM_OFFLINE_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHARED_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "pcam-sample"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores between the workers instead of oversubscribing them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def fake_patches(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random 96x96 RGB patches whose label shows as a dark centre (label 1) or not."""
    rng = np.random.default_rng(seed)
    images = rng.integers(120, 255, size=(n, 96, 96, 3), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(np.int8)
    images[labels == 1, 40:56, 40:56] //= 3
    return images, labels


def write_kaggle(
    root: Path, n: int = 40, n_test: int = 0, seed: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Write a Kaggle-layout folder; returns (train ids, train images, train labels)."""
    images, labels = fake_patches(n + n_test, seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    ids = [f"{seed:02d}{i:038x}" for i in range(n + n_test)]
    for pid, image in zip(ids[:n], images[:n], strict=True):
        tifffile.imwrite(root / "train" / f"{pid}.tif", image, photometric="rgb")
    with open(root / "train_labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"])
        writer.writerows(zip(ids[:n], labels[:n].tolist(), strict=True))
    if n_test:
        (root / "test").mkdir(exist_ok=True)
        for pid, image in zip(ids[n:], images[n:], strict=True):
            tifffile.imwrite(root / "test" / f"{pid}.tif", image, photometric="rgb")
    return ids[:n], images[:n], labels[:n]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch) -> Path:
    """Keep packed stores and unzipped files of tests out of the user's cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HISTODETECT_CACHE", str(cache))
    return cache


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``kaggle_dir(n=40, n_test=0)`` writes a tiny Kaggle folder and returns it."""

    def make(n: int = 40, n_test: int = 0, seed: int = 0, name: str = "kaggle") -> Path:
        root = tmp_path / name
        write_kaggle(root, n, n_test, seed)
        return root

    return make


@pytest.fixture
def shared_sample() -> Path:
    """The real PCam sample beside the checkout; the test is skipped when it is absent."""
    if not (SHARED_SAMPLE / "train_labels.csv").exists():
        pytest.skip(f"real PCam sample not found at {SHARED_SAMPLE} (only present in CI/dev)")
    return SHARED_SAMPLE
