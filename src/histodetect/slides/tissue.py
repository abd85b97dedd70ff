"""Tissue detection: stained tissue on a thumbnail (Otsu on saturation), as fractions per cell."""

from __future__ import annotations

import math

import numpy as np

DEFAULT_MIN_TISSUE = 0.25


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = 0
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Stained tissue in a thumbnail: saturated, H&E-coloured pixels (Otsu on saturation).

    Glass is unsaturated; Otsu finds the cut between glass and stain, clipped to [0.07, 0.2]
    so that a slide with only glass (or only tissue) is not split in two. Haematoxylin and
    eosin both absorb green most, so stained tissue is never green-dominant, and never has a
    fully absorbed channel (saturation ~1): that rejects ink, pen marks, labels and drawings.
    Specks smaller than 3x3 thumbnail pixels are removed.
    """
    from scipy import ndimage

    rgb = rgb.astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = rgb.max(axis=-1)
    sat = (hi - rgb.min(axis=-1)) / np.maximum(hi, 1)
    cut = min(max(otsu_threshold(sat), 0.07), 0.2)
    mask = (sat > cut) & (sat < 0.9) & (g < np.maximum(r, b)) & (hi >= 40)
    return ndimage.binary_opening(mask, np.ones((3, 3), bool))


def tissue_cells(mask: np.ndarray, grid: tuple[int, int], cell_px: float) -> np.ndarray:
    """Fraction of tissue per cell, from a mask with ``cell_px`` mask pixels per cell side."""
    from PIL import Image

    rows, cols = grid
    need_h, need_w = math.ceil(rows * cell_px), math.ceil(cols * cell_px)
    padded = np.zeros((max(need_h, mask.shape[0]), max(need_w, mask.shape[1])), np.float32)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    img = Image.fromarray(padded)  # float32: mode "F"
    small = img.resize(
        (cols, rows), Image.Resampling.BOX, box=(0, 0, cols * cell_px, rows * cell_px)
    )
    return np.asarray(small)
