"""The viewer's state: bounded open slides and cache, and maps that do not fit their slide."""

from __future__ import annotations

import json
import shutil

from histodetect.slides.viewer.catalogue import Catalogue
from histodetect.slides.viewer.library import SlideLibrary


def test_at_most_max_open_slides_stay_open_and_an_evicted_one_opens_again(synthetic_maps, tmp_path):
    maps, _ = synthetic_maps
    root = tmp_path / "maps"
    shutil.copytree(maps / "synthetic_00_tumour", root / "a")
    shutil.copytree(maps / "synthetic_00_tumour", root / "b")
    library = SlideLibrary(Catalogue([root]), tile_cache_mb=0.05, max_open=1)
    a, b = library.entry("a"), library.entry("b")
    top = library.detail(a)["slide"]["levels"] - 1
    tiles = {}
    for entry in (a, b, a, b):
        for col in range(4):
            tile = library.slide_tile(entry, top, col, 0)
            assert tiles.setdefault((col, 0), tile) == tile  # the same slide: the same tile
        stats = library.stats()
        assert stats["open_slides"] == 1 and stats["open_maps"] <= 1
        assert stats["cached_bytes"] <= 0.05 * (1 << 20)
    assert library.stats()["cache_misses"] > 8  # the small cache had to drop tiles


def test_a_map_made_for_another_slide_is_reported_instead_of_drawn_misaligned(
    synthetic_maps, tmp_path
):
    maps, _ = synthetic_maps
    folder = tmp_path / "maps" / "s"
    shutil.copytree(maps / "synthetic_00_tumour", folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary["level0_size_px"] = [4096, 4096]
    (folder / "summary.json").write_text(json.dumps(summary))
    library = SlideLibrary(Catalogue([folder.parent]))
    detail = library.detail(library.entry("s"))
    assert detail["slide"] is None and detail["layers"]["width"] == 4096
    assert any("not the same slide" in p for p in detail["problems"]), detail["problems"]
