"""The `Source` interface every patch collection implements, and seeded splits."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect import PATCH_SIZE
from histodetect.data.patchio import PatchDecodeError
from histodetect.errors import BadInputError, HistodetectWarning, describe_problems

SPLITS = ("train", "valid", "test")


PCAM_PREFIX = "camelyonpatch_level_2_split_"


UNLABELLED = -1


@dataclass
class Source:
    """Patches with ids, labels (-1 = unlabelled), splits, optional slide ids and positions.

    ``coords`` is each patch's level-0 (x, y) top-left corner on its slide, when known
    (patches extracted from slides, or a Kaggle folder's ``meta.csv``).

    Subclasses implement :meth:`read_one`; :meth:`read` and :meth:`read_checked` build on it.
    """

    kind: str
    path: Path
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    slides: np.ndarray | None = None
    coords: np.ndarray | None = None
    synthetic: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        """Where the location of patch ``i`` is described in error messages."""
        return str(self.path)

    def where(self, i: int) -> str:
        """Human-readable location of patch ``i`` (a file path or dataset row)."""
        return str(self.ids[i])

    def read_one(self, i: int) -> np.ndarray:
        """Decode patch ``i`` as (96, 96, 3) uint8; raises PatchDecodeError."""
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Decode patches as a (k, 96, 96, 3) uint8 array; a bad patch raises BadInputError."""
        out, bad = self.read_checked(indices)
        if bad:
            raise BadInputError(
                f"{len(bad)} patch(es) in {self.describe()} cannot be read:\n"
                + describe_problems(bad),
                bad,
            )
        return out

    def read_checked(self, indices: Sequence[int]) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Decode patches, zero-filling bad ones; returns the array and ``(where, why)`` pairs."""
        out = np.zeros((len(indices), PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
        bad: list[tuple[str, str]] = []
        for k, i in enumerate(indices):
            try:
                out[k] = self.read_one(int(i))
            except PatchDecodeError as exc:
                bad.append((self.where(int(i)), str(exc)))
        return out, bad

    def counts(self) -> dict[str, dict[str, int]]:
        """Patch counts per split and label, e.g. ``{"train": {"0": 10, "1": 7}}``."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            mask = self.splits == split
            if mask.any():
                labels, n = np.unique(self.labels[mask], return_counts=True)
                out[split] = {
                    ("unlabelled" if lab == UNLABELLED else str(int(lab))): int(c)
                    for lab, c in zip(labels, n, strict=True)
                }
        return out


def split_indices(
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Reproducible stratified train/valid assignment, grouped by slide when groups are given.

    Without groups each class gives ``valid_fraction`` of its patches. With groups (slides),
    whole slides go to validation, one fold of scikit-learn's ``StratifiedGroupKFold``, so
    that validation's labels mirror the whole set's and both sides hold every class (a
    checkpoint, threshold and temperature chosen on one class are chosen on nothing). The fold
    is one of ``round(1 / valid_fraction)``, or of fewer (a larger share) when no fold of that
    many holds every class.

    When that is impossible (one slide in all, or a class on one slide only) the split is made
    as well as it can be (training keeps every class; one slide is split by patch, as without
    groups) and a :class:`HistodetectWarning` says why.

    Returns:
        An array of "train"/"valid" strings.
    """
    n = len(labels)
    splits = np.full(n, "train", dtype="<U5")
    if n < 2 or valid_fraction <= 0:
        return splits
    if groups is not None and len(np.unique(groups)) >= 2:
        splits[_valid_slides(labels, np.asarray(groups).astype(str), valid_fraction, seed)] = (
            "valid"
        )
        return splits
    if groups is not None:
        warnings.warn(
            f"all {n} patches come from one slide ({groups[0]}): validation is split by patch, "
            "so its scores are optimistic (neighbouring patches are in training). Add slides.",
            HistodetectWarning,
            stacklevel=2,
        )
    rng = np.random.default_rng(seed)
    valid = np.zeros(n, bool)
    for label in np.unique(labels):  # stratified: each class gets the same share
        members = rng.permutation(np.flatnonzero(labels == label))
        valid[members[: round(valid_fraction * len(members))]] = True
    splits[valid] = "valid"
    return splits


def _valid_slides(
    labels: np.ndarray, groups: np.ndarray, valid_fraction: float, seed: int
) -> np.ndarray:
    """Row indices of the validation slides (at least two slides): the stratified fold that
    leaves every class to training and holds every class itself, closest to the wanted size."""
    from sklearn.model_selection import StratifiedGroupKFold

    classes, inverse = np.unique(labels, return_inverse=True)
    # scikit-learn refuses more folds than there are slides or patches of the largest class.
    most = min(
        max(round(1 / valid_fraction), 2), len(np.unique(groups)), np.bincount(inverse).max()
    )
    target = valid_fraction * len(labels)
    scored = []  # ((training has every class, validation has every class, -size miss), rows)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits": classes are checked here.
        warnings.simplefilter("ignore", UserWarning)
        for k in range(most, 1, -1):
            folds = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
            for _, rows in folds.split(np.zeros(len(labels)), labels, groups):
                train_all = np.isin(classes, np.delete(labels, rows)).all()
                valid_all = len(np.unique(labels[rows])) == len(classes)
                scored.append(((train_all, valid_all, -abs(len(rows) - target)), rows))
            if any(key[0] and key[1] for key, _ in scored):
                break
    (train_all, valid_all, _), rows = max(scored, key=lambda item: item[0])
    if not (train_all and valid_all):
        lonely = [c for c in classes if len(np.unique(groups[labels == c])) < 2]
        why = (
            f"label {int(lonely[0])} patches come from one slide only "
            f"({groups[labels == lonely[0]][0]})"
            if lonely
            else "no split of these slides keeps every class on both sides"
        )
        warnings.warn(
            f"validation cannot hold every class while split by slide: {why}, so the best "
            "checkpoint, threshold and temperature are chosen without it. Add slides with "
            "that class.",
            HistodetectWarning,
            stacklevel=3,
        )
    return rows
