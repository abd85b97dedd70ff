"""Which descriptor sets the out-of-scope score should sum, measured on REAL data.

Usage: python benchmarks/scope_sets.py RUN [RUN ...] [--data DATA] [--ood DIR] [--slide-patches S]

For each run, the scope statistics of every set (the backbone's first stages "0", "1", "2" and
the texture sets "lbp", "glcm") are fitted on its whole training split (training itself fits
them on at most 20,000 of its patches: the same on the sample), then the score is computed from
subsets of the sets, each with its own threshold at 95 % of the validation split. Printed per
subset: the AUROC of validation patches vs the resampled tiles of --ood (other organs), the
share of those tiles flagged, the same for --slide-patches (a store of tissue patches of a
non-lymph-node slide, e.g. `histodetect extract CMU-1-Small-Region.svs --out S`), and the
share of validation patches resampled to 0.5 um/px and back that are flagged (false alarms on
the `--mpp` path; 5 % is the nominal rate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import SAMPLE
from scope import auroc, other_organ_patches, round_trip

from histodetect.data.loaders import labelled_split
from histodetect.data.store import open_store
from histodetect.inference.predictor import Predictor
from histodetect.inference.scope import descriptors, fit_scope, score_descriptors, set_names

SUBSETS = (
    ("0", "1", "2"),
    ("0", "1", "2", "lbp"),
    ("0", "1", "2", "glcm"),
    ("0", "1", "2", "lbp", "glcm"),
    ("lbp", "glcm"),
)


FIELDS = ("centre", "spread", "means", "precision", "scale")


def subset(stats: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The statistics of the descriptor sets ``names`` only."""
    keep = {f + n for f in FIELDS for n in names} | {"threshold"}
    return {k: v for k, v in stats.items() if k in keep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--ood", type=Path, default=SAMPLE.parent / "ood")
    parser.add_argument("--slide-patches", type=Path, help="store of a non-lymph-node slide")
    args = parser.parse_args()
    _, cut = other_organ_patches(args.ood)
    slide = None
    if args.slide_patches:
        store = open_store(args.slide_patches)
        slide = store.read(np.arange(len(store.labels)))
    for run in args.runs:
        predictor = Predictor.from_run(run)
        store, train = labelled_split(run, args.data, "train")
        _, valid = labelled_split(run, args.data, "valid")
        valid_images = store.read(valid)
        stats = fit_scope(predictor, store.read(train), store.labels[train], valid_images)
        assert set(set_names(stats)) == {n for s in SUBSETS for n in s}
        sets = {
            "valid": descriptors(predictor, valid_images),
            "other": descriptors(predictor, cut.images),
            "control": descriptors(predictor, round_trip(valid_images[:500])),
        }
        if slide is not None:
            sets["slide"] = descriptors(predictor, slide)
        print(f"run {run} (REAL: {len(valid)} validation patches, {len(cut.images)} other-organ)")
        for names in SUBSETS:
            scores = {k: score_descriptors(d, subset(stats, names)) for k, d in sets.items()}
            threshold = np.quantile(scores["valid"], 0.95)
            flagged = {k: s > threshold for k, s in scores.items()}
            tiles = np.mean([flagged["other"][cut.tiles == t].mean() > 0.5 for t in set(cut.tiles)])
            other = auroc(scores["valid"], scores["other"])
            line = f"  {'+'.join(names):<16s} other organs: AUROC {other:.3f}, {tiles:.0%} of tiles"
            if slide is not None:
                line += (
                    f" | slide: AUROC {auroc(scores['valid'], scores['slide']):.3f}, "
                    f"{flagged['slide'].mean():.0%} of patches"
                )
            print(line + f" | resampled validation: {flagged['control'].mean():.1%} flagged")


if __name__ == "__main__":
    main()
