"""Temperature scaling: how the predictor turns logits into calibrated probabilities."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """Temperature T minimising validation log-loss of sigmoid(logit(p) / T)."""
    from scipy.optimize import minimize_scalar

    q = np.clip(p, EPS, 1 - EPS)
    logits = np.log(q / (1 - q))

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - y * z))

    res = minimize_scalar(nll, bounds=(-3, 3), method="bounded")
    return float(np.exp(res.x))


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities by a fitted temperature (1 = unchanged)."""
    q = np.clip(p, EPS, 1 - EPS)
    return 1 / (1 + np.exp(-np.log(q / (1 - q)) / temperature))
