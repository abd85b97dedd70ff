"""The AUC bootstrap of `cv` and `slide-eval`: the old intervals, faster, never one class."""

from __future__ import annotations

import numpy as np
import pytest

from histodetect.inference import bootstrap
from histodetect.inference.bootstrap import auc_interval
from histodetect.inference.evaluate import bootstrap_intervals


def _colour_scores(sample) -> tuple[np.ndarray, np.ndarray]:
    """Labels and deterministic out-of-fold scores of the real patches: a logistic regression
    on colour statistics of the whole patch and of its labelled centre (AUC about 0.8)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from histodetect.data.sources import open_source

    source = open_source(sample)
    images = source.read(np.arange(len(source)))

    def stats(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / 255
        saturation = x.max(-1) - x.min(-1)
        return np.c_[x.mean((1, 2)), x.std((1, 2)), saturation.mean((1, 2))]

    features = np.c_[stats(images[:, ::3, ::3]), stats(images[:, 32:64, 32:64])]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    y = source.labels.astype(np.int64)
    return y, cross_val_predict(model, features, y, cv=5, method="predict_proba")[:, 1]


@pytest.mark.slow
def test_auc_interval_matches_the_full_bootstrap_on_the_real_sample(shared_sample):
    y, p = _colour_scores(shared_sample)
    assert len(y) == 6259 and 0.75 < auc_interval(y, p, n_resamples=50)[0] < 0.85
    old = bootstrap_intervals(y, p, 0.5, n_boot=1000)["auc"]
    new = auc_interval(y, p, n_resamples=1000)
    assert np.abs(np.subtract(old, new)).max() < 0.002, (old, new)


def test_every_resample_holds_both_classes_at_their_sizes(monkeypatch):
    # 2 tumour slides in 12: a plain resample of 12 lacks them one time in nine.
    y = np.array([1, 1] + [0] * 10)
    p = np.r_[0.9, 0.3, np.linspace(0.0, 0.8, 10)]
    seen = []

    def recording(positives, negatives, axis=-1):
        seen.append((positives.shape[axis], negatives.shape[axis]))
        return real(positives, negatives, axis=axis)

    real = bootstrap._auc
    monkeypatch.setattr(bootstrap, "_auc", recording)
    low, high = auc_interval(y, p, n_resamples=500)
    assert set(seen) >= {(2, 10)} and all(n_pos >= 1 and n_neg >= 1 for n_pos, n_neg in seen)
    assert 0 <= low < high <= 1


def test_a_perfect_separation_gives_a_point_and_one_class_gives_nan():
    assert auc_interval([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9]) == (1.0, 1.0)
    low, high = auc_interval([0, 0, 0, 1], [0.1, 0.5, 0.2, 0.3])  # one tumour slide: kept
    assert 0 <= low <= 2 / 3 <= high <= 1
    assert np.isnan(auc_interval([1, 1, 1], [0.1, 0.2, 0.3])).all()
