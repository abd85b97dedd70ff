"""Deep Zoom tiles of slides and maps: the right pixels, in the right place, at every level."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histodetect.slides.maps.folders import SlideMap
from histodetect.slides.viewer.tiles import (
    OVERLAP,
    TILE_SIZE,
    MapTiles,
    SlideTiles,
    TileCache,
    TileNotFound,
    colour_table,
    map_colour,
)
from tests.slides.viewer.conftest import CMU1


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB"))


def _slide_map(prob: np.ndarray, tissue: np.ndarray, cell: float) -> SlideMap:
    return SlideMap(
        name="s",
        stem="s",
        folder=Path("."),
        prob=prob.astype(np.float32),
        tissue=tissue,
        cell=cell,
        size=None,
        mpp=None,
        threshold=0.5,
        score=float(prob.max()),
    )


@pytest.fixture(scope="module")
def cmu1_tiles():
    if not CMU1.is_file():
        pytest.skip(f"real slide not found at {CMU1}")
    tiles = SlideTiles(CMU1)
    yield tiles
    tiles.close()


def test_full_resolution_tiles_are_the_slide_pixels_at_their_deep_zoom_place(cmu1_tiles):
    import openslide

    info = cmu1_tiles.info()
    assert (info["width"], info["height"]) == (2220, 2967)
    assert info["levels"] == 13  # ceil(log2(2967)) + 1: halving down to 1x1
    top = info["levels"] - 1
    with openslide.OpenSlide(str(CMU1)) as slide:
        for col, row in [(0, 0), (3, 5), (8, 11)]:  # corner, interior, bottom-right edge
            tile = _decode(cmu1_tiles.tile(top, col, row))
            x0 = col * TILE_SIZE - (OVERLAP if col else 0)
            y0 = row * TILE_SIZE - (OVERLAP if row else 0)
            h, w = tile.shape[:2]
            truth = np.asarray(slide.read_region((x0, y0), 0, (w, h)).convert("RGB"))
            # JPEG at quality 80 moves pixels a little; a shift by two pixels, a lot more.
            error = np.abs(tile.astype(int) - truth).mean()
            assert error < 8, (col, row)
            if (col, row) == (3, 5):  # within the tissue, where a shift shows
                shifted = slide.read_region((x0 + 2, y0), 0, (w, h)).convert("RGB")
                moved = np.abs(tile.astype(int) - np.asarray(shifted)).mean()
                assert moved > 2 * error
    # The last column and row stop at the slide's edge, overlap on the inner side only.
    assert _decode(cmu1_tiles.tile(top, 8, 11)).shape[:2] == (
        2967 - 11 * 254 + 1,
        2220 - 8 * 254 + 1,
    )


def test_coarse_levels_of_a_one_level_slide_match_openslides_deep_zoom(cmu1_tiles):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(CMU1)) as slide:
        reference = DeepZoomGenerator(slide, TILE_SIZE, OVERLAP)
        for level in (6, 8, 9, 10):  # cut from one whole-level picture, not read tile by tile
            cols, rows = reference.level_tiles[level]
            for col, row in {(0, 0), (cols - 1, rows - 1)}:
                ours = _decode(cmu1_tiles.tile(level, col, row)).astype(int)
                theirs = np.asarray(reference.get_tile(level, (col, row)))
                assert ours.shape == theirs.shape, (level, col, row)
                assert np.abs(ours - theirs).mean() < 10, (level, col, row)


def test_a_plain_tiff_gets_tiles_through_the_projects_reader(tmp_path):
    yy, xx = np.mgrid[0:600, 0:900]
    image = np.stack(
        [xx * 255 // 900, yy * 255 // 600, ((xx // 16 + yy // 16) % 2) * 200], axis=-1
    ).astype(np.uint8)
    image[:, 450:] //= 4  # a dark right half: coarse levels must keep it on the right
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, photometric="rgb")  # strips: OpenSlide does not take these
    tiles = SlideTiles(path)
    try:
        assert tiles.backend == "tifffile"
        top = tiles.info()["levels"] - 1
        tile = _decode(tiles.tile(top, 1, 1))
        x0, y0 = TILE_SIZE - OVERLAP, TILE_SIZE - OVERLAP
        h, w = tile.shape[:2]
        error = np.abs(tile.astype(int) - image[y0 : y0 + h, x0 : x0 + w]).mean()
        shifted = np.abs(tile.astype(int) - image[y0 : y0 + h, x0 + 8 : x0 + 8 + w]).mean()
        assert error < 12 and shifted > 3 * error
        small = _decode(tiles.tile(top - 3, 0, 0)).astype(int)  # 8x smaller: 113 x 75 px
        assert small.shape[:2] == (75, 113)
        assert small[:, :50].mean() > 2.5 * small[:, 63:].mean()
    finally:
        tiles.close()


def test_map_tile_pixels_take_the_colour_of_the_cell_under_them_at_every_level():
    rng = np.random.default_rng(1)
    prob = rng.random((20, 30))
    tissue = rng.random((20, 30)) > 0.2
    cell = 62.33  # CMU-1's: 32 analysed px of 1.948 level-0 px; not a whole number
    size = (1850, 1240)  # the grid reaches a little past the slide
    tiles = MapTiles(_slide_map(prob, tissue, cell), size)
    info = tiles.info()
    assert (info["width"], info["height"], info["format"]) == (*size, "png")
    top = info["levels"] - 1
    table = colour_table()

    def expected(x: float, y: float) -> np.ndarray:
        r, c = int(y // cell), int(x // cell)
        if not tissue[r, c]:
            return np.zeros(4, np.uint8)
        return table[round(prob[r, c] * 255)]

    for level, step in ((top, 1), (top - 1, 2), (top - 3, 8)):
        cols, rows = tiles.dz.level_tiles[level]
        for col in range(cols):
            for row in range(rows):
                rgba = _decode(tiles.tile("map", level, col, row))
                x0 = col * TILE_SIZE - (OVERLAP if col else 0)
                y0 = row * TILE_SIZE - (OVERLAP if row else 0)
                for i, j in ((0, 0), (rgba.shape[0] // 2, rgba.shape[1] // 3), (-1, -1)):
                    i, j = i % rgba.shape[0], j % rgba.shape[1]
                    x, y = (x0 + j + 0.5) * step, (y0 + i + 0.5) * step
                    assert np.array_equal(rgba[i, j], expected(x, y)), (level, col, row, i, j)
    # At full resolution a cell's edge falls on the right pixel: x = 62.33 is in cell 1.
    tile = _decode(tiles.tile("map", top, 0, 0))
    assert np.array_equal(tile[10, 61], expected(61.5, 10.5))
    assert np.array_equal(tile[10, 62], expected(62.5, 10.5))
    assert not np.array_equal(expected(61.5, 10.5), expected(62.5, 10.5))


def test_map_colours_are_jet_with_more_alpha_for_higher_probability_and_none_off_tissue():
    low, high = map_colour(0.05), map_colour(0.95)
    assert high[0] > 100 and high[2] < 50 and low[2] > 100 and low[0] < 50  # red vs blue
    assert high[3] > low[3] > 0
    prob = np.full((2, 2), 0.95)
    tissue = np.array([[True, False], [True, True]])
    tile = _decode(MapTiles(_slide_map(prob, tissue, 10.0), (20, 20)).tile("map", 5, 0, 0))
    assert tile[5, 15, 3] == 0 and tuple(tile[5, 5]) == high
    wash = _decode(MapTiles(_slide_map(prob, tissue, 10.0), (20, 20)).tile("tissue", 5, 0, 0))
    assert wash[5, 15, 3] == 0 and wash[15, 15, 3] > 0


def test_addresses_outside_the_pyramid_are_not_found():
    tiles = MapTiles(_slide_map(np.zeros((3, 3)), np.ones((3, 3), bool), 32.0), (96, 96))
    for layer, level, col, row in (
        ("map", 99, 0, 0),
        ("map", -1, 0, 0),
        ("map", 7, 1, 0),
        ("map", 7, 0, -1),
        ("prob", 7, 0, 0),
    ):
        with pytest.raises(TileNotFound):
            tiles.tile(layer, level, col, row)


def test_the_tile_cache_keeps_recent_tiles_within_its_byte_budget():
    cache = TileCache(max_bytes=1000)
    made = []

    def make(key, size=300):
        def build():
            made.append(key)
            return bytes(size)

        return build

    for key in "abc":
        cache.get_or_make(key, make(key))
    cache.get_or_make("a", make("a"))  # a hit: "a" becomes the most recent
    cache.get_or_make("d", make("d"))  # 1200 bytes: the oldest, "b", goes
    assert made == ["a", "b", "c", "d"]
    assert cache.nbytes <= 1000 and len(cache) == 3
    cache.get_or_make("b", make("b"))
    assert made[-1] == "b"
    cache.get_or_make("a", make("a"))
    assert made.count("a") == 1
    cache.get_or_make("huge", make("huge", 5000))  # larger than the budget: not kept
    assert cache.nbytes <= 1000
