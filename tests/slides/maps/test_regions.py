"""Tumour regions: 4-connected cells as valid polygons, measured from their geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, shape

from histodetect.slides.maps.outputs import geojson_bytes
from histodetect.slides.maps.regions import cell_regions, find_regions, measure_regions


def _polygon(region: dict) -> Polygon:
    return Polygon(region["polygon"], region["holes"])


def test_regions_outline_cells_with_holes_and_diagonal_neighbours_apart():
    mask = np.zeros((7, 8), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a hole
    mask[6, 6] = True  # touches the square only at a corner: a region of its own
    prob = np.where(mask, 0.9, 0.1).astype(np.float32)
    prob[1, 1] = 0.99
    regions = find_regions(prob, np.ones_like(mask), 0.5, 10.0, bounds=(75, 70), mpp=2.0)
    assert [r["id"] for r in regions] == [1, 2]
    square, corner = regions
    assert square["max_prob"] == pytest.approx(0.99) and square["cells"] == 24
    assert square["area_px"] == pytest.approx(2400.0)
    assert square["area_mm2"] == pytest.approx(2400 * 4 / 1e6)
    assert len(square["holes"]) == 1 and sorted(map(tuple, square["holes"][0][:-1])) == [
        (30, 30),
        (30, 40),
        (40, 30),
        (40, 40),
    ]
    outer = {tuple(p) for p in square["polygon"]}
    assert outer == {(10, 10), (60, 10), (60, 60), (10, 60)}
    assert square["longest_diameter_px"] == pytest.approx(50 * 2**0.5)
    # The corner cell (60..70) is clipped to the 75x70 bounds: x stays, y is cut at 70.
    assert {tuple(p) for p in corner["polygon"]} == {(60, 60), (70, 60), (70, 70), (60, 70)}


def test_cells_touching_at_a_corner_inside_one_region_give_a_valid_polygon():
    # The seven cells form one 4-connected ring, but cells (0, 1) and (1, 0) meet only at a
    # corner, which is also a corner of the enclosed empty cell: the outline pinches there.
    mask = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
    (region,) = find_regions(mask.astype(np.float32), np.ones_like(mask), 0.5, 1.0, bounds=(3, 3))
    poly = _polygon(region)
    assert poly.is_valid, shapely.is_valid_reason(poly)
    assert region["cells"] == 7 and region["area_px"] == 7.0 and poly.area == 7.0
    assert poly.equals(
        shapely.union_all(
            [shapely.box(c, r, c + 1, r + 1) for r, c in zip(*np.nonzero(mask), strict=True)]
        )
    )


@pytest.mark.parametrize("cell", [1.0, 2.5])
def test_random_masks_with_corner_touching_cells_give_only_valid_polygons_of_their_cells(cell):
    rng = np.random.default_rng(7)
    pinched = 0
    for _ in range(60):
        mask = rng.random((14, 11)) < 0.55  # dense enough for many diagonal contacts
        prob = np.where(mask, rng.uniform(0.5, 1.0, mask.shape), 0.1).astype(np.float32)
        regions = find_regions(prob, np.ones_like(mask), 0.5, cell, bounds=(11 * cell, 14 * cell))
        assert sum(r["cells"] for r in regions) == mask.sum()
        for r in regions:
            poly = _polygon(r)
            assert poly.is_valid, shapely.is_valid_reason(poly)
            assert r["area_px"] == pytest.approx(r["cells"] * cell**2)
            assert poly.area == pytest.approx(r["cells"] * cell**2)
            # Outer ring counter-clockwise in (x, y), holes clockwise (GeoJSON's right-hand rule).
            assert shapely.LinearRing(r["polygon"]).is_ccw
            assert not any(shapely.LinearRing(h).is_ccw for h in r["holes"])
            # The GeoJSON written for QuPath reads back as the same valid polygon.
        doc = json.loads(geojson_bytes(regions, "random.svs"))
        assert all(shape(f["geometry"]).is_valid for f in doc["features"])
        pinched += sum(
            not Polygon(r["polygon"]).is_simple
            or any(
                Polygon(r["polygon"]).exterior.intersects(shapely.LinearRing(h)) for h in r["holes"]
            )
            for r in regions
        )
    assert pinched  # the masks did contain regions whose outline touches itself at a corner


def test_cell_regions_measured_at_two_scales_agree():
    mask = np.zeros((6, 6), bool)
    mask[0:3, 0:2] = True
    mask[4:6, 3:6] = True
    prob = np.where(mask, 0.8, 0.0).astype(np.float32)
    prob[5, 5] = 0.95
    shapes = cell_regions(prob, np.ones_like(mask), 0.5)
    assert [s.shape.area for s in shapes] == [6.0, 6.0]
    working = measure_regions(shapes, 32, bounds=(180, 180), mpp=0.97)
    level0 = measure_regions(shapes, 64, bounds=(360, 360), mpp=0.485)
    assert [r["max_prob"] for r in working] == [pytest.approx(0.95), pytest.approx(0.8)]
    for a, b in zip(working, level0, strict=True):
        assert a["id"] == b["id"] and a["cells"] == b["cells"]
        assert b["area_px"] == pytest.approx(4 * a["area_px"])
        assert b["area_mm2"] == pytest.approx(a["area_mm2"])
        assert b["longest_diameter_mm"] == pytest.approx(a["longest_diameter_mm"])
    # The first region's last row and column reach past 180 px and are cut at the image's edge.
    assert working[0]["area_px"] == pytest.approx((180 - 3 * 32) * (180 - 4 * 32))
    assert working[1]["area_px"] == pytest.approx(6 * 32 * 32)
