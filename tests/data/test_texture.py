"""Texture descriptors: batched LBP and GLCM agree with scikit-image, synthetic and real."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

from histodetect.data.texture import (
    GLCM_ANGLES,
    GLCM_DISTANCES,
    GLCM_LEVELS,
    glcm_properties,
    grey,
    lbp_histogram,
    texture_descriptors,
)
from tests.conftest import fake_patches


def _with_flat_areas(images: np.ndarray) -> np.ndarray:
    """Patches with a blank corner and a flat block: ties between a pixel and its neighbours."""
    images = images.copy()
    images[:, :20, :20] = 255
    images[:, 40:60, 40:60] = (120, 60, 140)
    return images


def _greys(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in images])


def _skimage_lbp(g: np.ndarray, points: int, radius: int) -> np.ndarray:
    codes = local_binary_pattern(g, points, radius, "uniform").astype(int)
    return np.bincount(codes.ravel(), minlength=points + 2) / g.size


def _skimage_glcm(g: np.ndarray) -> np.ndarray:
    q = (g.astype(int) * GLCM_LEVELS // 256).astype(np.uint8)
    m = graycomatrix(q, GLCM_DISTANCES, GLCM_ANGLES, GLCM_LEVELS, symmetric=True, normed=True)
    props = ("contrast", "homogeneity", "energy", "correlation")
    return np.array(
        [graycoprops(m, p)[d].mean() for d in range(len(GLCM_DISTANCES)) for p in props]
    )


def _check_against_skimage(images: np.ndarray) -> None:
    g = grey(torch.from_numpy(images))
    assert np.array_equal(g.numpy(), _greys(images))  # PIL's luminance, to the grey level
    for points, radius in ((8, 1), (16, 2)):
        mine = lbp_histogram(g, points, radius).numpy()
        ref = np.stack([_skimage_lbp(x, points, radius) for x in g.numpy()])
        # A pixel or two may differ where skimage's float rounding breaks an exact tie.
        assert np.abs(mine - ref).max() < 1e-3, (points, radius)
    mine = glcm_properties(g).numpy()
    ref = np.stack([_skimage_glcm(x) for x in g.numpy()])
    assert np.allclose(mine, ref, rtol=1e-9, atol=1e-12)


def test_lbp_and_glcm_match_scikit_image_on_synthetic_patches_with_ties():
    images, _ = fake_patches(6, seed=3)
    _check_against_skimage(_with_flat_areas(images))


def test_lbp_and_glcm_match_scikit_image_on_real_patches(shared_sample):
    from histodetect.data.patchio import decode_patch

    files = sorted((shared_sample / "train").glob("*.tif"))[:12]
    _check_against_skimage(np.stack([decode_patch(f) for f in files]))


def test_texture_of_blank_patches_takes_its_known_values():
    blank = np.full((2, 96, 96, 3), 255, np.uint8)
    blank[1] = 0
    sets = texture_descriptors(torch.from_numpy(blank))
    assert set(sets) == {"lbp", "glcm"}
    # Every neighbour ties with its centre (code 8), except beyond the white patch's edge,
    # which reads 0: its border pixels see 3 or 5 dark neighbours in a row (codes 5 and 3).
    lbp = sets["lbp"].numpy()
    assert lbp[1, 8] == 1.0 and lbp[0, 8] == pytest.approx(94 * 94 / 96**2)
    assert lbp[0, [3, 5, 8]].sum() == pytest.approx(1.0)
    # A flat image: no contrast, fully homogeneous, all energy in one cell, correlation 1.
    per_distance = sets["glcm"].numpy().reshape(2, len(GLCM_DISTANCES), 4)
    assert np.allclose(per_distance, [0.0, 1.0, 1.0, 1.0])


def test_lbp_of_a_batch_larger_than_small_integer_offsets():
    tiny = torch.randint(0, 256, (4000, 6, 6), dtype=torch.uint8)
    shares = lbp_histogram(tiny, 8, 1)
    assert shares.shape == (4000, 10) and torch.allclose(shares.sum(1), torch.ones(4000).double())


@pytest.mark.parametrize("n", [1, 5])
def test_texture_of_a_batch_equals_texture_of_each_patch(n):
    images, _ = fake_patches(n, seed=1)
    whole = texture_descriptors(torch.from_numpy(images))
    for k in range(n):
        one = texture_descriptors(torch.from_numpy(images[k : k + 1]))
        for name in whole:
            assert torch.allclose(whole[name][k], one[name][0], atol=1e-6)
