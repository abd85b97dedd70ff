"""Tissue detection keeps every piece of tissue and leaves out glass, ink, dirt and blur."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from histodetect.data.synth import render_patch
from histodetect.slides import DEFAULT_MIN_TISSUE
from histodetect.slides.tissue import (
    in_focus,
    tissue_mask,
    window_tissue,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GLASS = (242, 240, 244)
PX_UM = 8 * 0.972  # thumbnail pixels of 8 px at PCam's resolution


def _glass(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(GLASS, 1.5, (h, w, 3)), 0, 255).astype(np.uint8)


def test_pale_eosin_and_fat_are_tissue_glass_is_not():
    thumb = _glass(60, 60)
    thumb[10:20, 10:20] = (236, 214, 228)  # pale eosin: faint, barely saturated
    thumb[30:51, 30:51] = (244, 242, 245)  # fat: glass-white cells ...
    thumb[30:51:5, 30:51] = (215, 190, 210)  # ... inside thin pink membranes
    thumb[30:51, 30:51:5] = (215, 190, 210)
    mask = tissue_mask(thumb, PX_UM)
    assert mask[10:20, 10:20].all()
    assert mask[30:51, 30:51].all()  # the fat cells between the membranes are filled in
    mask[10:20, 10:20] = mask[30:51, 30:51] = False
    assert not mask.any()  # glass, with its noise, is never tissue


def test_ink_borders_dust_and_blank_are_not_tissue():
    rng = np.random.default_rng(1)
    thumb = _glass(80, 80)
    thumb[:, :5] = 15  # black scanner border
    thumb[10:13, 10:70] = (45, 70, 150)  # blue pen
    thumb[20:23, 10:70] = (40, 140, 70)  # green pen
    thumb[30:33, 10:70] = (20, 20, 25)  # black pen
    for y, x in rng.integers(40, 75, (12, 2)):  # dust: grey specks
        thumb[y, x] = 150
    thumb[60:75, 10:25] = 250  # a blank patch brighter than the glass
    assert not tissue_mask(thumb, PX_UM).any()


def test_a_few_stained_cells_alone_on_the_glass_are_kept():
    thumb = _glass(40, 40)
    thumb[20:22, 20:22] = (150, 90, 170)  # 2x2 px: a small cluster of tumour cells
    assert tissue_mask(thumb, PX_UM)[20:22, 20:22].all()


def test_window_share_is_what_the_model_sees():
    # Thumbnail at 8 px per pixel, cells of 32 px: 4 thumbnail pixels a cell, 12 a window.
    mask = np.zeros((40, 40), bool)
    mask[16:20, 16:20] = True  # tissue in cell (4, 4) only
    share = window_tissue(mask, (10, 10), 32, 8)
    assert share[4, 4] == pytest.approx(16 / 144)
    hit = np.argwhere(share > 0)
    assert hit.min(0).tolist() == [3, 3] and hit.max(0).tolist() == [5, 5]  # the 3x3 windows


def test_blurred_tissue_is_out_of_focus_sharp_and_flat_windows_are_not():
    rng = np.random.default_rng(2)
    sharp = render_patch(rng, 1)[0]  # synthetic H&E: nuclei in stroma
    band = np.concatenate([render_patch(rng, 0)[0] for _ in range(3)], axis=1)
    blurred = ndimage.gaussian_filter(band.astype(np.float32), (4, 4, 0))  # 3 patches wide
    flat = np.full((96, 96, 3), 238.0) + rng.normal(0, 0.5, (96, 96, 3))
    tile = np.concatenate([sharp, blurred, flat], axis=1).astype(np.uint8)
    focus = in_focus(tile, (1, 5), 96)[0]
    assert focus[0] and focus[4]  # sharp tissue; flat glass is not judged
    assert not focus[2]  # the middle of the blurred band
    # A window mostly of glass with a sharp strand in one corner is in focus.
    edge = np.full((96, 96, 3), 240, np.uint8)
    edge[64:, 64:] = sharp[64:, 64:]
    assert in_focus(edge, (1, 1), 96).all()


@pytest.mark.skipif(not (SHARED / "pcam-sample").is_dir(), reason="../shared/pcam-sample absent")
def test_real_patches_on_glass_are_all_found():
    """300 real Kaggle patches, each alone on glass as on a slide: (nearly) all are tissue."""
    import tifffile

    sample = SHARED / "pcam-sample"
    with open(sample / "train_labels.csv") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)][:300]
    found = 0
    for pid in ids:
        canvas = _glass(288, 288).astype(np.float32)
        canvas[96:192, 96:192] = tifffile.imread(sample / "train" / f"{pid}.tif")
        thumb = canvas.reshape(36, 8, 36, 8, 3).mean((1, 3)).round().astype(np.uint8)
        share = window_tissue(tissue_mask(thumb, PX_UM), (9, 9), 32, 8)
        found += share[4, 4] >= DEFAULT_MIN_TISSUE  # the cell whose window is the patch
    assert found >= 0.99 * len(ids)  # the misses are blank patches (slide_fidelity.py)
