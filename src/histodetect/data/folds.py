"""Which rows a run trains, validates and is tested on: plain splits or cross-validation folds."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from histodetect.data.source import split_indices
from histodetect.data.store import Store
from histodetect.errors import HistodetectError

SPLITS = ("train", "valid", "test", "all")
ALL_FOLDS = -1  # the fold number of a cross-validation's ensemble: it trained on every fold


def read_groups(path: str | Path, ids: np.ndarray) -> np.ndarray:
    """Group (slide) of every id from an ``id,group`` csv; every id must have one.

    Args:
        path: csv with ``id`` and ``group`` columns (any order, other columns ignored).
        ids: the patch ids that need a group.

    Raises:
        HistodetectError: the file is missing, lacks a column, or leaves ids without a group.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise HistodetectError(f"{path}: cannot read the groups file ({exc.strerror}).") from None
    if not rows or not {"id", "group"} <= {k.strip().lower() for k in rows[0] if k}:
        raise HistodetectError(f"{path}: needs the columns 'id' and 'group' (e.g. a slide id).")
    key = {k.strip().lower(): k for k in rows[0] if k}
    groups = {r[key["id"]].strip(): r[key["group"]].strip() for r in rows}
    missing = [str(i) for i in ids if str(i) not in groups]
    if missing:
        raise HistodetectError(
            f"{path}: {len(missing)} patch id(s) have no group, e.g. {', '.join(missing[:3])}."
        )
    return np.array([groups[str(i)] for i in ids], dtype=object)


def assign_folds(
    labels: np.ndarray, groups: np.ndarray | None, k: int, seed: int = 0
) -> np.ndarray:
    """Fold number (0..k-1) of every row: stratified by label, whole groups kept together.

    Uses scikit-learn's StratifiedGroupKFold when groups are given (no slide straddles two
    folds), else StratifiedKFold; both shuffled with ``seed``, so the folds are reproducible.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if k < 2:
        raise HistodetectError(f"--folds must be at least 2, got {k}.")
    n_groups = len(np.unique(groups)) if groups is not None else len(labels)
    smallest = int(np.bincount(labels.astype(np.int64)).min()) if len(labels) else 0
    if n_groups < k or (groups is None and smallest < k):
        raise HistodetectError(
            f"cannot make {k} folds from {len(labels)} patches "
            f"({n_groups} slides, smallest class {smallest}); use fewer folds."
        )
    folds = np.full(len(labels), -1, np.int64)
    if groups is not None:
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(labels)), labels, groups.astype(str))
    else:
        parts = StratifiedKFold(k, shuffle=True, random_state=seed).split(labels, labels)
    for fold, (_, rows) in enumerate(parts):
        folds[rows] = fold
    return folds


def store_groups(store: Store, groups_file: str | Path | None) -> np.ndarray | None:
    """Slide ids of the store's rows: its own, else those of ``groups_file``, else None."""
    if store.slides is not None:
        return np.asarray(store.slides, dtype=object)
    if groups_file:
        return read_groups(groups_file, store.ids)
    return None


def scoring_split(data_cfg) -> str:
    """The split a run is scored on by default: its validation split, or for a cv ensemble
    (trained on every fold) the patches held out of all folds."""
    return "test" if data_cfg.folds and data_cfg.fold == ALL_FOLDS else "valid"


def _pool_and_holdout(store: Store, data_cfg, groups: np.ndarray | None) -> np.ndarray:
    """Which rows the folds share out (True) and which are held out of all of them (False).

    The store's own train/valid split, unless slide ids come from a groups file: the store was
    split without them, so the holdout is drawn again by slide (with the same settings) and no
    slide is both held out and in a fold.
    """
    labelled = store.labels >= 0
    if store.slides is not None or groups is None:
        return labelled & (store.splits == "train")
    rows = np.flatnonzero(labelled & (store.splits != "test"))
    split = split_indices(
        store.labels[rows], groups[rows], data_cfg.valid_fraction, data_cfg.split_seed
    )
    pool = np.zeros(len(store), bool)
    pool[rows[split == "train"]] = True
    return pool


def run_rows(store: Store, data_cfg, split: str) -> np.ndarray:
    """Rows of ``split`` (train, valid, test or all) for a run with data config ``data_cfg``.

    Without folds these are the store's own splits. With ``data_cfg.folds`` = K, the store's
    ``train`` rows are cut into K folds: fold ``data_cfg.fold`` validates and the others train
    (fold -1, an ensemble, trains on all and has no validation split); the store's other rows
    (its ``valid`` and ``test`` splits) are held out of every fold and form ``test``.
    """
    if split not in SPLITS:
        raise HistodetectError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}.")
    if split == "all":
        return np.arange(len(store))
    folds = getattr(data_cfg, "folds", 0)
    if not folds:
        return np.flatnonzero(store.splits == split)
    if split == "valid" and data_cfg.fold == ALL_FOLDS:
        raise HistodetectError(
            "a cross-validation ensemble trained on every fold, so it has no validation split: "
            "use --split test (the patches held out of all folds) or --split all."
        )
    groups = store_groups(store, data_cfg.groups)
    in_pool = _pool_and_holdout(store, data_cfg, groups)
    if split == "test":
        return np.flatnonzero(~in_pool)
    pool = np.flatnonzero(in_pool)
    fold_of = assign_folds(
        store.labels[pool], None if groups is None else groups[pool], folds, data_cfg.split_seed
    )
    if split == "valid":
        return pool[fold_of == data_cfg.fold]
    return pool[fold_of != data_cfg.fold]
