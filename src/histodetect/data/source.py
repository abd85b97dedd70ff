"""The `Source` interface every patch collection implements, and seeded splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect import PATCH_SIZE
from histodetect.data.patchio import PatchDecodeError
from histodetect.errors import BadInputError, describe_problems

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

    Returns an array of "train"/"valid" strings. Groups (slides) never straddle the split, so
    patches of one slide cannot leak from training into validation.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    splits = np.full(n, "train", dtype="<U5")
    if n < 2 or valid_fraction <= 0:
        return splits
    valid = np.zeros(n, bool)
    if groups is not None and len(np.unique(groups)) >= 2:
        # Whole slides go to validation, in random order, until it holds its share of patches.
        names, inverse = np.unique(groups, return_inverse=True)
        sizes = np.bincount(inverse)
        chosen = np.zeros(len(names), bool)
        target = valid_fraction * n
        for g in rng.permutation(len(names)):
            if sizes[chosen].sum() >= target or chosen.sum() == len(names) - 1:
                break
            chosen[g] = True
        valid = chosen[inverse]
    else:
        for label in np.unique(labels):  # stratified: each class gets the same share
            members = rng.permutation(np.flatnonzero(labels == label))
            valid[members[: round(valid_fraction * len(members))]] = True
    splits[valid] = "valid"
    return splits
