"""`histodetect slidesynth`: a SYNTHETIC slide set that `extract` and `slide-eval` take as is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely

from histodetect.data.store import open_store
from histodetect.slides.annotations.readers import read_annotation
from histodetect.slides.evaluation.scoring import read_reference
from histodetect.slides.synthetic.dataset import write_synthetic_set
from histodetect.slides.wsi.readers import open_slide

NAMES = ["synthetic_00_tumour", "synthetic_01_normal", "synthetic_02_tumour"]
SIZE = ["--width", "768", "--height", "640"]  # tiny: each slide takes a fraction of a second


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`histodetect ARGS...` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "HISTODETECT_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "histodetect.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The command's output folder (three tiny slides, two with tumours) and its process."""
    root = tmp_path_factory.mktemp("slidesynth")
    proc = cli("slidesynth", "--out", root / "set", "--slides", "3", *SIZE, "--seed", "1", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "set", proc


def test_writes_the_set_and_says_synthetic(made):
    out, proc = made
    assert sorted(p.stem for p in (out / "slides").glob("*.tif")) == NAMES
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        f"{n}.geojson" for n in NAMES
    ]
    assert not list(out.rglob(".*tmp*"))  # no temporary file left behind
    assert "SYNTHETIC" in (out / "SYNTHETIC.md").read_text()
    assert proc.stdout.startswith("SYNTHETIC slides: 3 of 768x640 px, 2 with planted tumours")
    assert str(out / "reference.csv") in proc.stdout
    # The Camelyon16 layout slide-eval --reference reads: no header, slide,Tumor|Normal,...
    lines = (out / "reference.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in lines] == [
        [NAMES[0], "Tumor"],
        [NAMES[1], "Normal"],
        [NAMES[2], "Tumor"],
    ]
    assert read_reference(out / "reference.csv") == {n: "tumour" in n for n in NAMES}


def test_slides_open_as_synthetic_pyramids(made):
    out, _ = made
    for name in NAMES:
        reader = open_slide(out / "slides" / f"{name}.tif")
        try:
            assert reader.dims[0] == (768, 640)
            assert reader.downsamples == [1.0, 4.0, 16.0]
            assert reader.mpp == pytest.approx(0.972)
            assert reader.read(0, 0, 0, 64, 64).shape == (64, 64, 3)
        finally:
            reader.close()


def test_annotations_hold_the_planted_tumours(made):
    out, _ = made
    manifest = json.loads((out / "synthetic_set.json").read_text())
    truth = {r["name"]: r for r in manifest["slides"]}
    for name in NAMES:
        ann = read_annotation(out / "annotations" / f"{name}.geojson")
        planted = truth[name]["tumours"]
        assert ann.n_tumour == len(planted)
        if "normal" in name:
            assert planted == [] and ann.tumour.is_empty
            continue
        assert planted
        assert all(ann.tumour.contains(shapely.Point(cx, cy)) for cx, cy, *_ in planted)
        # The outline has the planted ellipses' area, clipped to tissue (which only trims it).
        assert 0.5 * sum(np.pi * rx * ry for *_, rx, ry in planted) < ann.tumour.area
        assert ann.tumour.area <= 1.001 * sum(np.pi * rx * ry for *_, rx, ry in planted)


def test_extract_takes_positives_from_tumour_slides_only(made, tmp_path):
    out, _ = made
    slides = sorted((out / "slides").glob("*.tif"))
    proc = cli(
        "extract", *slides, "--annotations", out / "annotations", "--out", tmp_path / "data",
        "--per-slide", "12", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    store = open_store(tmp_path / "data")
    positives = {s: int(store.labels[store.slides == s].sum()) for s in np.unique(store.slides)}
    assert positives == {NAMES[0]: 6, NAMES[1]: 0, NAMES[2]: 6}
    assert store.synthetic


def test_rerun_keeps_the_set_and_other_settings_replace_it(tmp_path):
    out = tmp_path / "set"
    first = write_synthetic_set(out, 2, 0.5, (512, 512), seed=3)
    assert [r["written"] for r in first] == [True, True]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "slides").iterdir()}
    again = write_synthetic_set(out, 2, 0.5, (512, 512), seed=3)
    assert [r["written"] for r in again] == [False, False]
    assert {p: p.stat().st_mtime_ns for p in (out / "slides").iterdir()} == stamps
    # Fewer slides, all normal: the earlier tumour slide and its annotation are gone.
    write_synthetic_set(out, 1, 0.0, (512, 512), seed=3)
    assert [p.name for p in (out / "slides").iterdir()] == ["synthetic_00_normal.tif"]
    assert [p.name for p in (out / "annotations").iterdir()] == ["synthetic_00_normal.geojson"]
    assert (out / "reference.csv").read_text() == "synthetic_00_normal,Normal\n"


def test_bad_settings_are_one_line_errors(tmp_path):
    proc = cli("slidesynth", "--out", tmp_path / "x", "--tumour-fraction", "1.5", cwd=tmp_path)
    assert proc.returncode != 0
    assert "--tumour-fraction must be within 0-1" in proc.stderr
    assert "Traceback" not in proc.stderr
