"""Speed of the AUC bootstrap interval: the full metrics bootstrap against the AUC-only one.

Usage: python benchmarks/bootstrap.py [--n 200000] [--old-resamples 100]

`cv` and `slide-eval` keep only the AUC interval. Before, they called `evaluate`'s
`bootstrap_intervals`, which recomputes eleven metrics per resample; now they call
`auc_interval` (scipy.stats.bootstrap over both classes separately, the AUC from the
Mann–Whitney U, every resample's AUC at once). Both run on the same SYNTHETIC out-of-fold
predictions (labels 40 % positive, scores a logistic of a normal shift, AUC about 0.85): the
new one with its 1,000 resamples; the old one with fewer, timed and scaled to 1,000 (it takes
about 0.1 s a resample at 200,000 predictions). About a minute on 2 CPU cores.
Results: benchmarks/results/bootstrap.txt
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import save_results

from histodetect.inference.bootstrap import auc_interval
from histodetect.inference.evaluate import bootstrap_intervals

RESAMPLES = 1000  # as `cv` and `slide-eval` use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="out-of-fold predictions")
    parser.add_argument("--old-resamples", type=int, default=100, help="old method's resamples")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    y = (rng.random(args.n) < 0.4).astype(np.int64)
    p = 1 / (1 + np.exp(-(rng.normal(size=args.n) + 1.5 * y)))

    start = time.perf_counter()
    old = bootstrap_intervals(y, p, 0.5, n_boot=args.old_resamples)["auc"]
    old_s = (time.perf_counter() - start) * RESAMPLES / args.old_resamples
    start = time.perf_counter()
    new = auc_interval(y, p, n_resamples=RESAMPLES)
    new_s = time.perf_counter() - start
    save_results(
        "bootstrap",
        [
            f"SYNTHETIC out-of-fold predictions: {args.n:,} ({y.mean():.0%} positive), "
            f"{RESAMPLES:,} resamples",
            f"old  bootstrap_intervals (11 metrics, patches resampled):  {old_s:7.1f} s"
            f"  (timed on {args.old_resamples} resamples, x{RESAMPLES // args.old_resamples})",
            f"new  auc_interval (AUC only, classes resampled apart):      {new_s:7.1f} s",
            f"speed-up: {old_s / new_s:.1f}x",
            f"95% interval old [{old[0]:.4f}, {old[1]:.4f}] ({args.old_resamples} resamples), "
            f"new [{new[0]:.4f}, {new[1]:.4f}]",
        ],
    )


if __name__ == "__main__":
    main()
