"""A run's own validation data: where `evaluate` chooses thresholds, never on the data scored."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from histodetect.data.folds import ALL_FOLDS, run_rows
from histodetect.data.loaders import run_data_config
from histodetect.data.store import Store, open_store
from histodetect.errors import HistodetectError
from histodetect.inference.calibration import apply_temperature
from histodetect.inference.predictor import Predictor

OOF_FILE = "oof.csv"


def read_oof(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and out-of-fold probabilities from a cross-validation's ``oof.csv``."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        y = np.array([int(r["label"]) for r in rows], np.int64)
        p = np.array([float(r["probability"]) for r in rows], np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise HistodetectError(f"{path}: cannot read out-of-fold predictions ({exc}).") from None
    return y, p


def _fingerprint(run: Path) -> str | None:
    """The fingerprint of the data a run was trained on (``data.json``), if recorded."""
    try:
        return json.loads((run / "data.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _split_key(run: Path) -> tuple:
    d = run_data_config(run)
    return (_fingerprint(run), d.valid_fraction, d.split_seed, d.folds, d.fold, d.groups)


def _own_store(run: Path, store: Store | None) -> Store | None:
    """The packed store a run trained on: ``store`` itself when it is that data, else its own."""
    if store is not None and _fingerprint(run) == store.manifest.get("fingerprint"):
        return store
    try:
        own = Path(json.loads((run / "data.json").read_text())["store"])
        return open_store(own, verify=False)
    except (OSError, ValueError, KeyError, HistodetectError):
        return None


def own_validation(
    predictor: Predictor, runs: list[Path], store: Store | None, tta: int
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """(labels, probabilities) of the predictor on its own validation data, and what that is.

    A cross-validation ensemble uses its out-of-fold predictions; a run (or several runs
    sharing one train/valid split) its validation split, re-read from the store it was trained
    on. Returns ``(None, why)`` when no such data is reachable.
    """
    if "validation" in predictor.meta:
        path = Path(os.path.normpath(runs[0] / predictor.meta["validation"]))
        y, p = read_oof(path)
        if predictor.temperature != 1.0:  # scored probabilities carry it: so must these
            p = apply_temperature(p, predictor.temperature)
        return (y, p), (
            f"its cross-validation's out-of-fold predictions ({path}, {len(y)} patches; each "
            "from a single fold model at TTA 1, so less smoothed than the ensemble's)"
        )
    keys = {_split_key(r) for r in runs}
    if len(keys) > 1:
        return None, "nothing: the runs were validated on different patches (only their threshold)"
    own = _own_store(runs[0], store)
    if own is None:
        return None, "nothing: the run's training data is not reachable (only its threshold)"
    rows = run_rows(own, run_data_config(runs[0]), "valid")
    rows = rows[own.labels[rows] >= 0]
    if not len(rows) or len(np.unique(own.labels[rows])) < 2:
        return None, "nothing: the run has no validation patches of both classes"
    p = predictor.predict_proba(own.read(rows), tta=tta)
    return (own.labels[rows].astype(np.int64), p), (
        f"the run's own validation split ({len(rows)} patches of {own.path})"
    )


def training_overlap(
    runs: list[Path], store: Store, idx: np.ndarray, split: str
) -> tuple[str, ...]:
    """Notes on scored patches a run trained on (the score is then optimistic) or, scoring
    another split than ``valid``, chose its thresholds on."""
    notes = []
    for run in runs:
        if _fingerprint(run) != store.manifest.get("fingerprint"):
            continue
        cfg = run_data_config(run)
        seen = np.intersect1d(run_rows(store, cfg, "train"), idx)
        if len(seen):
            notes.append(
                f"{len(seen)} of the {len(idx)} scored patches were in {run.name}'s training "
                "data: this score is optimistic."
            )
        if split != "valid" and not (cfg.folds and cfg.fold == ALL_FOLDS):
            chose = np.intersect1d(run_rows(store, cfg, "valid"), idx)
            if len(chose):
                notes.append(
                    f"{len(chose)} of the scored patches are {run.name}'s validation patches, "
                    "where its thresholds were chosen."
                )
    return tuple(notes)


def scored_data(runs: list[Path], data: str | Path, store: Store, split: str, n: int) -> dict:
    """What an evaluation scored, as saved beside its metrics so that a report can name it.

    ``run_data`` is True when DATA is the data every run was trained on (same fingerprint in
    ``data.json``); otherwise the evaluation is external and is shown apart from the run's own.
    """
    fingerprint = store.manifest.get("fingerprint")
    source = store.manifest.get("source") or {}
    return {
        "path": str(Path(data).resolve()),
        "kind": source.get("kind"),
        "store": str(store.path),
        "fingerprint": fingerprint,
        "split": split,
        "n": n,
        "run_data": fingerprint is not None and all(_fingerprint(r) == fingerprint for r in runs),
    }
