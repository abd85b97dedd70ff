"""A slide's output files: the probability map as a TIFF that viewers place at the right scale."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

from histodetect.slides.maps.outputs import prob_tiff_bytes


def test_probability_tiff_is_tiled_0_to_255_with_the_cell_size_as_its_pixel_size():
    prob = np.linspace(0, 1, 40 * 300, dtype=np.float32).reshape(40, 300)
    data = prob_tiff_bytes(prob, 32 * 0.972, "Größe 1.svs")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.shape == (40, 300) and page.dtype == np.uint8
        assert np.array_equal(page.asarray(), np.round(prob * 255).astype(np.uint8))
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = page.tags["XResolution"].value
        assert 1e4 * den / num == pytest.approx(32 * 0.972, rel=1e-6)  # µm per map cell
        assert "255 x P(tumour)" in page.description and "31.104 um" in page.description


def test_probability_tiff_of_a_slide_without_resolution_claims_none():
    data = prob_tiff_bytes(np.zeros((3, 4), np.float32), None, "boxes.tiff")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
        assert "unknown size" in page.description
