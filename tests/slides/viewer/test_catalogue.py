"""The viewer's catalogue: which slides it lists, where it finds their files, what it reads."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from histodetect.errors import HistodetectError
from histodetect.slides.viewer.catalogue import Catalogue
from histodetect.slides.viewer.library import SlideLibrary


def _copy_maps(maps: Path, dest: Path) -> Path:
    shutil.copytree(maps, dest)
    return dest


def test_lists_every_slide_of_several_folders_with_its_score_regions_and_tissue(
    synthetic_maps, tmp_path
):
    maps, _ = synthetic_maps
    other = _copy_maps(maps, tmp_path / "other")  # the same slide name in a second folder
    catalogue = Catalogue([maps, other])
    rows = [catalogue.listing(e) for e in catalogue.entries()]
    assert [r["id"] for r in rows] == ["synthetic_00_tumour", "synthetic_00_tumour~2"]
    summary = json.loads((maps / "synthetic_00_tumour" / "summary.json").read_text())
    row = rows[0]
    assert row["name"] == "synthetic_00_tumour.tif"
    assert row["score"] == summary["score"] and row["n_regions"] == summary["n_regions"]
    assert row["tissue_area_mm2"] == summary["tissue_area_mm2"] > 0
    assert row["synthetic"] and row["has_thumbnail"]
    assert row["out_of_scope_share"] == summary["out_of_scope"].get("share")
    # A slide mapped later shows up without restarting; one whose summary is broken does not.
    shutil.copytree(maps / "synthetic_00_tumour", other / "later")
    (other / "broken").mkdir()
    (other / "broken" / "summary.json").write_text("{not json")
    assert len(catalogue.refresh()) == 3


def test_a_folder_without_maps_or_a_missing_one_is_a_clear_error(tmp_path):
    with pytest.raises(HistodetectError, match="no such folder of slide maps"):
        Catalogue([tmp_path / "nowhere"])
    with pytest.raises(HistodetectError, match="no slide maps here"):
        Catalogue([tmp_path])
    with pytest.raises(HistodetectError, match="no such annotations folder"):
        Catalogue([tmp_path], annotations=tmp_path / "nope")


def test_slide_files_are_found_where_recorded_or_by_name_in_slide_dirs(synthetic_maps, tmp_path):
    maps, _ = synthetic_maps
    moved = _copy_maps(maps, tmp_path / "maps")
    summary_path = moved / "synthetic_00_tumour" / "summary.json"
    summary = json.loads(summary_path.read_text())
    slide = Path(summary["slide"])
    # Recorded relative to where `slide` ran: found from the working folder.
    old = Path.cwd()
    os.chdir(slide.parent.parent)
    try:
        summary["slide"] = f"slides/{slide.name}"
        summary_path.write_text(json.dumps(summary))
        entry = Catalogue([moved]).entries()[0]
        assert Catalogue([moved]).slide_path(entry).resolve() == slide.resolve()
    finally:
        os.chdir(old)
    # The slide moved away: not found, and the message says what to do.
    summary["slide"] = str(tmp_path / "elsewhere" / slide.name)
    summary_path.write_text(json.dumps(summary))
    catalogue = Catalogue([moved])
    with pytest.raises(
        HistodetectError, match=r"not found; pass the folder holding it with --slide-dir"
    ):
        catalogue.slide_path(catalogue.entries()[0])
    with_dir = Catalogue([moved], slide_dirs=[slide.parent])
    assert with_dir.slide_path(with_dir.entries()[0]) == slide


def test_only_listed_outputs_inside_the_folder_are_given_out(synthetic_maps, tmp_path):
    maps, _ = synthetic_maps
    copy = _copy_maps(maps, tmp_path / "maps")
    secret = tmp_path / "secret.csv"
    secret.write_text("private")
    folder = copy / "synthetic_00_tumour"
    (folder / "regions.csv").unlink()
    (folder / "regions.csv").symlink_to(secret)  # a link out of the folder is not followed
    catalogue = Catalogue([copy])
    entry = catalogue.entries()[0]
    assert catalogue.output_file(entry, "regions.geojson") == folder / "regions.geojson"
    assert catalogue.output_file(entry, "regions.csv") is None
    for name in ("prob.npy", "../secret.csv", "summary.json/..", "", "/etc/passwd"):
        assert catalogue.output_file(entry, name) is None, name


def test_regions_come_most_probable_first_with_their_boxes(synthetic_maps):
    maps, _ = synthetic_maps
    catalogue = Catalogue([maps])
    regions = catalogue.regions(catalogue.entries()[0])
    geojson = json.loads((maps / "synthetic_00_tumour" / "regions.geojson").read_text())
    assert len(regions) == len(geojson["features"]) > 1
    probs = [r["max_prob"] for r in regions]
    assert probs == sorted(probs, reverse=True)
    for r in regions:
        xs = [p[0] for p in r["rings"][0]]
        ys = [p[1] for p in r["rings"][0]]
        assert r["box"] == [min(xs), min(ys), max(xs), max(ys)]


def test_annotations_and_slide_eval_detections_are_read_as_slide_eval_reads_them(
    synthetic_maps, tmp_path
):
    from histodetect.slides.annotations.readers import read_annotation
    from histodetect.slides.evaluation.scoring import evaluate_slides

    maps, annotations = synthetic_maps
    copy = _copy_maps(maps, tmp_path / "maps")
    catalogue = Catalogue([copy], annotations=annotations)
    entry = catalogue.entries()[0]
    assert catalogue.detections(entry) is None  # slide-eval has not run yet
    shapes = catalogue.annotation(entry)
    truth = read_annotation(annotations / "synthetic_00_tumour.geojson")
    assert shapes["file"] == "synthetic_00_tumour.geojson" and shapes["format"] == "geojson"
    assert len(shapes["tumour"]) == sum(len(getattr(g, "geoms", [g])) for g in truth.lesions) > 0
    outline = shapes["tumour"][0][0]
    assert outline[0] == outline[-1]  # closed rings in level-0 px
    evaluate_slides(copy, annotations)
    detections = catalogue.detections(entry)
    assert detections and all({"confidence", "x", "y"} <= set(d) for d in detections)
    (copy / "detections" / "synthetic_00_tumour.csv").write_text("0.9,12,40\n0.8,12\n")
    library = SlideLibrary(Catalogue([copy], annotations=annotations))
    detail = library.detail(library.catalogue.entries()[0])
    assert any("detections" in p and "synthetic_00_tumour.csv" in p for p in detail["problems"])
    assert detail["annotation"] is not None and detail["regions"]


def test_many_slides_list_without_rereading_unchanged_summaries(
    synthetic_maps, tmp_path, monkeypatch
):
    maps, _ = synthetic_maps
    summary = (maps / "synthetic_00_tumour" / "summary.json").read_text()
    root = tmp_path / "many"
    for i in range(300):
        (root / f"slide_{i:03d}").mkdir(parents=True)
        (root / f"slide_{i:03d}" / "summary.json").write_text(summary)
    reads = []
    original = Catalogue._read_summary
    monkeypatch.setattr(
        Catalogue, "_read_summary", staticmethod(lambda f: reads.append(f) or original(f))
    )
    library = SlideLibrary(Catalogue([root]))
    assert len(reads) == 300
    rows = library.listing()
    assert len(rows) == 300 and len(reads) == 300  # the second scan only looked at the dates
    changed = root / "slide_007" / "summary.json"
    changed.write_text(json.dumps({**json.loads(summary), "n_regions": 12345}))
    os.utime(changed, (time.time() + 5, time.time() + 5))
    rows = library.listing()
    assert len(reads) == 301 and reads[-1].name == "slide_007"
    assert [r["n_regions"] for r in rows if r["id"] == "slide_007"] == [12345]
