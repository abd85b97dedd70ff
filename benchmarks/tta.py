"""Test-time augmentation: validation AUC with 1, 2, 4 and 8 dihedral views of the same run.

Usage: python benchmarks/tta.py --run RUN [DATA]      (DATA defaults to ../shared/pcam-sample)
       python benchmarks/tta.py [DATA] --minutes 5    (trains a default-recipe run first)

Every view count scores the same patches of the seeded validation split with the same model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import SAMPLE, train_cli

from histodetect.data.loaders import ensure_store, split_indices_of
from histodetect.inference.evaluate import bootstrap_intervals, point_metrics
from histodetect.inference.predictor import Predictor

DEFAULT = SAMPLE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--run", type=Path, help="a trained run folder (else one is trained)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget if no --run")
    args = parser.parse_args()
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="hd-tta-")) / "run"
        train_cli(args.data, run, "--epochs", "1000", "--max-minutes", str(args.minutes))
    store = ensure_store(args.data, progress=False)
    valid = split_indices_of(store, "valid")
    images, labels = store.read(valid), store.labels[valid].astype(int)
    predictor = Predictor.from_run(run)
    print(f"run {run} ({predictor.meta['arch']}), {len(valid)} validation patches of {args.data}")
    for tta in (1, 2, 4, 8):
        t0 = time.perf_counter()
        probs = predictor.predict_proba(images, tta=tta)
        seconds = time.perf_counter() - t0
        auc = point_metrics(labels, probs)["auc"]
        lo, hi = bootstrap_intervals(labels, probs, 0.5, n_boot=500)["auc"]
        print(
            f"TTA x{tta}: AUC {auc:.4f} (95% CI {lo:.4f}-{hi:.4f}), "
            f"{len(valid) / seconds:.0f} patches/s"
        )


if __name__ == "__main__":
    main()
