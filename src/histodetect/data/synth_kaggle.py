"""A SYNTHETIC data set in Kaggle's Histopathologic Cancer Detection layout, for demos and tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from histodetect.data.synth import DECOY, PLAIN, POSITIVE, render_patch
from histodetect.errors import HistodetectError

# One split of the plan: (name, random stream, patch ids, PLAIN/POSITIVE/DECOY kinds).
_Split = tuple[str, int, list[str], np.ndarray]


def generate(
    out: str | Path,
    n: int = 2000,
    seed: int = 0,
    n_test: int = 0,
    positive_fraction: float = 0.4,
    decoy_fraction: float = 0.3,
    progress: bool = False,
) -> dict:
    """Write a synthetic dataset in the Kaggle Histopathologic Cancer Detection layout.

    Creates ``out/train/<id>.tif`` and ``out/train_labels.csv`` (``id,label``); when
    ``n_test > 0`` also ``out/test/<id>.tif``, ``out/sample_submission.csv`` (all labels 0,
    rows shuffled) and the answers in ``out/test_labels_SYNTHETIC.csv``; and always
    ``out/SYNTHETIC.md``, a note that the data are synthetic. The same arguments give
    byte-identical files.

    Args:
        out: Output folder; created if needed.
        n: Number of training patches.
        seed: Non-negative integer seed.
        n_test: Number of test patches (0 for none).
        positive_fraction: Fraction of label-1 patches in each split.
        decoy_fraction: Fraction of the label-0 patches that are decoys, with tumour-like
            cells outside the centre box only.
        progress: Show a progress bar.

    Returns:
        A summary: ``{"synthetic": True, "seed", "n_train", "n_test", "positives",
        "decoys", "path"}``, where ``positives`` and ``decoys`` count the training split.

    Raises:
        HistodetectError: on invalid arguments, or when ``out/train`` (or ``out/test``, if
            a test split is asked for) already contains files.
    """
    _check_arguments(n, n_test, seed, positive_fraction, decoy_fraction)
    n, n_test, seed = int(n), int(n_test), int(seed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HistodetectError(f"{out} exists and is not a folder; choose another output path.")
    train_dir, test_dir = out / "train", out / "test"
    _require_empty(train_dir)
    if n_test:
        _require_empty(test_dir)

    splits, submission_order = _plan(seed, n, n_test, positive_fraction, decoy_fraction)
    n_pos = int(np.sum(splits[0][3] == POSITIVE))
    n_decoy = int(np.sum(splits[0][3] == DECOY))

    train_dir.mkdir(parents=True, exist_ok=True)
    if n_test:
        test_dir.mkdir(exist_ok=True)
    # The marker goes first so that even a half-written folder says it is synthetic.
    (out / "SYNTHETIC.md").write_text(
        _marker_text(seed, n, n_pos, n_decoy, n_test), encoding="utf-8", newline="\n"
    )
    labels = _write_patches(out, seed, splits, n + n_test, progress)
    _write_label_files(out, labels, submission_order)
    return {
        "synthetic": True,
        "seed": seed,
        "n_train": n,
        "n_test": n_test,
        "positives": n_pos,
        "decoys": n_decoy,
        "path": str(out),
    }


def _check_arguments(
    n: int, n_test: int, seed: int, positive_fraction: float, decoy_fraction: float
) -> None:
    """Raise HistodetectError unless the counts and seed are integers and fractions in [0, 1]."""
    for name, value, low in (("n", n, 1), ("n_test", n_test, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise HistodetectError(f"{name} must be an integer >= {low}, got {value!r}.")
    for name, value in (
        ("positive_fraction", positive_fraction),
        ("decoy_fraction", decoy_fraction),
    ):
        if not 0.0 <= float(value) <= 1.0:
            raise HistodetectError(f"{name} must be between 0 and 1, got {value!r}.")


def _plan(
    seed: int, n: int, n_test: int, positive_fraction: float, decoy_fraction: float
) -> tuple[list[_Split], np.ndarray]:
    """Ids and kinds of every patch per split, and the row order of ``sample_submission.csv``."""
    plan = _patch_rng(seed, 0, 0)
    ids = _unique_ids(plan, n + n_test)
    splits = [("train", 1, ids[:n], _plan_kinds(plan, n, positive_fraction, decoy_fraction))]
    if n_test:
        kinds = _plan_kinds(plan, n_test, positive_fraction, decoy_fraction)
        splits.append(("test", 2, ids[n:], kinds))
    return splits, plan.permutation(n_test)


def _write_patches(
    out: Path, seed: int, splits: list[_Split], total: int, progress: bool
) -> dict[str, list[tuple[str, int]]]:
    """Render and write every patch as ``out/<split>/<id>.tif``; return (id, label) per split."""
    import tifffile
    from tqdm.auto import tqdm

    labels: dict[str, list[tuple[str, int]]] = {}
    with tqdm(total=total, disable=not progress, desc="synthetic patches", unit="patch") as bar:
        for split, stream, split_ids, kinds in splits:
            rows = []
            for i, (patch_id, kind) in enumerate(zip(split_ids, kinds, strict=True)):
                label = int(kind == POSITIVE)
                image, _ = render_patch(_patch_rng(seed, stream, i), label, kind == DECOY)
                tifffile.imwrite(out / split / f"{patch_id}.tif", image, photometric="rgb")
                rows.append((patch_id, label))
                bar.update()
            labels[split] = rows
    return labels


def _write_label_files(
    out: Path, labels: dict[str, list[tuple[str, int]]], submission_order: np.ndarray
) -> None:
    """``train_labels.csv``; with a test split also the blank submission and its answers."""
    _write_csv(out / "train_labels.csv", labels["train"])
    if "test" in labels:
        answers = [labels["test"][i] for i in submission_order]
        _write_csv(out / "sample_submission.csv", [(patch_id, 0) for patch_id, _ in answers])
        _write_csv(out / "test_labels_SYNTHETIC.csv", answers)


def _patch_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The generator of one patch: a function of (seed, split, index) only, not of run order."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))


def _plan_kinds(
    rng: np.random.Generator, n: int, positive_fraction: float, decoy_fraction: float
) -> np.ndarray:
    """Exact class counts (rounded), in a random order: an array of PLAIN/POSITIVE/DECOY."""
    n_pos = round(n * positive_fraction)
    n_decoy = round((n - n_pos) * decoy_fraction)
    kinds = np.full(n, PLAIN)
    kinds[:n_pos] = POSITIVE
    kinds[n_pos : n_pos + n_decoy] = DECOY
    return rng.permutation(kinds)


def _unique_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct Kaggle-style ids: 40 lowercase hex characters (a SHA-1's length)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        candidate = rng.bytes(20).hex()
        if candidate not in seen:  # a repeat is astronomically unlikely, but must not happen
            seen.add(candidate)
            ids.append(candidate)
    return ids


def _require_empty(folder: Path) -> None:
    """Raise HistodetectError unless ``folder`` is absent or an empty directory."""
    if folder.exists() and not folder.is_dir():
        raise HistodetectError(f"{folder} exists and is not a folder; choose another output path.")
    if folder.is_dir() and any(folder.iterdir()):
        raise HistodetectError(
            f"{folder} is not empty; refusing to mix new synthetic patches with existing files. "
            "Choose a new output folder or empty this one."
        )


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    """Write an ``id,label`` CSV."""
    # "\n" line ends, as in Kaggle's files, and identical bytes on every platform.
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("id", "label"))
        writer.writerows(rows)


def _marker_text(seed: int, n: int, n_pos: int, n_decoy: int, n_test: int) -> str:
    """The SYNTHETIC.md note: what made the data, from which seed, and not to trust it."""
    from histodetect import __version__

    test = (
        f"{n_test} patches in test/, a blank sample_submission.csv, and the true labels in "
        "test_labels_SYNTHETIC.csv"
        if n_test
        else "none"
    )
    return (
        "# SYNTHETIC DATA - not real histopathology\n\n"
        "Every image here was generated by histodetect synth (`histodetect.synth`, histodetect "
        f"{__version__}); none comes from a patient or a microscope.\n\n"
        f"- seed: {seed}\n"
        f"- train: {n} patches in train/, labels in train_labels.csv ({n_pos} label 1; "
        f"{n_decoy} decoys: label 0 with tumour-like cells outside the centre 32x32 box only)\n"
        f"- test: {test}\n\n"
        "The layout mimics Kaggle's Histopathologic Cancer Detection data so that pipelines can "
        "be run end to end. Do not use these data, or any model or score obtained from them, "
        "to judge real-world performance.\n"
    )
