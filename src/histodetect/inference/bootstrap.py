"""The bootstrap interval of a ROC AUC alone, as `cv` and `slide-eval` report it.

`evaluate` keeps :func:`histodetect.inference.evaluate.bootstrap_intervals` for its full
metrics table; where only the AUC is wanted this is faster (one rank sum per resample instead
of eleven metrics) and never draws a resample without one of the classes.
"""

from __future__ import annotations

import warnings

import numpy as np

# Up to this many scores (slides, small patch sets) the interval is BCa, bias-corrected and
# accelerated: better coverage for few, skewed values. Its jackknife costs n statistics of
# n - 1 values, too much for hundreds of thousands of patches, which take percentiles.
BCA_MAX = 1000


def _auc(positives: np.ndarray, negatives: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC from the Mann–Whitney U of the positives' scores, along ``axis`` (vectorised)."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(positives, negatives, axis=axis, method="asymptotic").statistic
    return u / (positives.shape[axis] * negatives.shape[axis])


def auc_interval(
    y: np.ndarray,
    p: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap confidence interval of the ROC AUC of scores ``p`` for labels ``y`` (0/1).

    scipy's ``bootstrap`` resamples the positives and the negatives separately (each class
    keeps its size, so no resample lacks a class) and evaluates every resample's AUC at once.
    BCa up to :data:`BCA_MAX` scores, percentiles above. Patches of one slide are correlated,
    so a patch-level interval is optimistic when many patches share a slide.

    Returns:
        ``(low, high)``; NaNs when a class is absent. When every resample has the same AUC
        (e.g. perfectly separated slides, or one score of each class) the interval is that
        value at both ends.
    """
    from scipy.stats import bootstrap

    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    positives, negatives = p[y], p[~y]
    if not len(positives) or not len(negatives):
        return float("nan"), float("nan")
    # A class of one score is that score in every resample (and scipy resamples only samples
    # of two or more): it stays fixed and the other class is resampled.
    moving = [s for s in (positives, negatives) if len(s) > 1]
    if not moving:
        auc = float(_auc(positives, negatives))
        return auc, auc

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        it = iter(resampled)
        pos = next(it) if len(positives) > 1 else positives
        neg = next(it) if len(negatives) > 1 else negatives
        return _auc(pos, neg, axis=axis)

    with warnings.catch_warnings():
        # A degenerate distribution makes BCa NaN (and warn); handled below.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap(
            tuple(moving),
            statistic,
            n_resamples=n_resamples,
            confidence_level=level,
            method="BCa" if len(y) <= BCA_MAX else "percentile",
            vectorized=True,
            paired=False,
            batch=max(1, 2_000_000 // len(y)),  # resamples at a time: bounded memory
            rng=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval
    if not np.isfinite([low, high]).all():
        alpha = (1 - level) / 2
        low, high = np.quantile(result.bootstrap_distribution, [alpha, 1 - alpha])
    return float(low), float(high)
