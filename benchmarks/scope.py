"""Out-of-scope flag on REAL data: held-out sample patches vs real tiles of other organs.

Usage: python benchmarks/scope.py RUN [DATA] [--ood ../shared/ood]

RUN must hold scope.safetensors (training writes it; `histodetect scope RUN --data DATA` fits it
for older runs). DATA (default ../shared/pcam-sample, or the run's packed store) gives the run's
own validation split; the tiles of --ood (about 0.5 um/px, see its tiles.csv) are resampled to
0.972 um/px and cut into 96 px patches as `predict --mpp 0.5` does. Printed: the AUROC of the
score (validation = 0, other organs = 1), the share of validation patches and of other-organ
patches and tiles (a tile counts when most of its patches are) flagged at the run's threshold,
and each tile's verdict. Targets of issue 19: AUROC >= 0.95, >= 90 % of tiles flagged, <= 5 %
of validation patches.

A control for false alarms: validation patches enlarged to 0.5 um/px and brought back through
the same resampling (what `predict --mpp 0.5` does to a lab's lymph-node tiles) should stay
about as much in scope as the validation patches themselves.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import SAMPLE
from PIL import Image
from sklearn.metrics import roc_auc_score

from histodetect import PCAM_MPP
from histodetect.data.loaders import labelled_split
from histodetect.data.tiles import TilePatches, tile_patches
from histodetect.inference.predictor import Predictor


def other_organ_patches(ood: Path) -> tuple[list[Path], TilePatches]:
    """The --ood tiles (about 0.5 um/px) resampled and cut into patches as `predict --mpp 0.5`."""
    files = sorted((ood / "tiles").iterdir())
    return files, tile_patches(files, 0.5)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """AUROC of an out-of-scope score, in-scope patches 0 and out-of-scope ones 1."""
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(truth, np.r_[inside, outside]))


def round_trip(images: np.ndarray, mpp: float = 0.5) -> np.ndarray:
    """Patches enlarged to ``mpp`` (Lanczos) and resampled back as `predict --mpp` does."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k, image in enumerate(images):
            side = round(image.shape[0] * PCAM_MPP / mpp)
            files.append(Path(tmp) / f"{k}.png")
            Image.fromarray(image).resize((side, side), Image.LANCZOS).save(files[-1])
        return tile_patches(files, mpp).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", nargs="?", type=Path, default=SAMPLE)
    parser.add_argument("--ood", type=Path, default=SAMPLE.parent / "ood")
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run)
    if predictor.scope_threshold is None:
        raise SystemExit(f"{args.run}: no scope.safetensors; run `histodetect scope` first")
    store, valid = labelled_split(args.run, args.data, "valid")
    files, cut = other_organ_patches(args.ood)
    inside = predictor.scope_scores(store.read(valid))
    control = predictor.scope_scores(round_trip(store.read(valid[:500])))
    probs, other = predictor.predict_and_score(cut.images)
    threshold = predictor.scope_threshold
    print(f"run {args.run} ({predictor.meta.get('arch')}), threshold {threshold:.3f}")
    print(f"validation patches (REAL, {len(inside)}): {np.mean(inside > threshold):.1%} flagged")
    print(
        f"the first {len(control)} of them resampled to 0.5 um/px and back: "
        f"{np.mean(control > threshold):.1%} flagged"
    )
    verdicts = []
    for t, f in enumerate(files):
        rows = np.flatnonzero(cut.tiles == t)
        if not len(rows):
            continue
        flagged = other[rows] > threshold
        verdicts.append(flagged.mean() > 0.5)
        print(
            f"  {f.name[:48]:<48s} {len(rows)} patch(es), {flagged.sum()} flagged, "
            f"P(tumour) {', '.join(f'{probs[k]:.2f}' for k in rows)}"
        )
    print(
        f"other organs (REAL, {len(other)} patches of {len(verdicts)} tiles): "
        f"{np.mean(other > threshold):.1%} of patches and {np.mean(verdicts):.1%} of tiles flagged"
        f"; P(tumour) >= 0.5 on {np.mean(probs >= 0.5):.1%}"
    )
    print(f"AUROC (validation vs other organs): {auroc(inside, other):.4f}")


if __name__ == "__main__":
    main()
