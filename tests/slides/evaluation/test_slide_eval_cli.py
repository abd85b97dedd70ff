"""`histodetect slide` then `histodetect slide-eval`, run as a user runs them, on SYNTHETIC slides.

The scoring's figures are computed by hand in test_evaluation.py; here the commands are
joined end to end: slides written by ``write_synthetic_slide`` with their annotations written
by ``write_truth_annotations``, mapped by an exported (untrained) model, then scored.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from histodetect.slides.synthetic.slide import write_synthetic_slide, write_truth_annotations

W, H = 768, 576  # level 0 at PCam's 0.972 µm/px: analysed as it is, 24 x 18 cells of 32 px
TISSUE = [(384.0, 288.0, 352.0, 256.0)]
SLIDES = {
    # A 253 x 214 µm tumour: grown by 37.5 µm it is over 275 µm across, a lesion.
    "tumour_one": [(330.0, 260.0, 130.0, 110.0)],
    # A lesion and, far from it, a 58 µm tumour: isolated tumour cells, not a lesion.
    "tumour_two": [(250.0, 250.0, 120.0, 110.0), (560.0, 380.0, 30.0, 30.0)],
    "normal": [],
}
ERROR_PREFIX = "histodetect slide-eval: error: "

pytestmark = pytest.mark.slow  # three commands in subprocesses: about 10-20 s on 2 cores


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histodetect.cli", *map(str, args)],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def mapped(tmp_path_factory, fcn_run) -> tuple[Path, Path]:
    """(maps, annotations): the slides mapped by `histodetect slide`, their truth as files."""
    root = tmp_path_factory.mktemp("slide_eval")
    ann = root / "annotations"
    paths = []
    for i, (name, tumours) in enumerate(SLIDES.items()):
        path = root / "slides" / f"{name}.tif"
        path.parent.mkdir(exist_ok=True)
        truth = write_synthetic_slide(path, W, H, TISSUE, tumours, downsamples=(1, 4), seed=i)
        write_truth_annotations(truth, ann)  # ASAP XML and QuPath GeoJSON, as a lab has them
        paths.append(path)
    maps = root / "maps"
    proc = cli("slide", fcn_run, *paths, "--out", maps, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return maps, ann


def test_slide_eval_scores_the_slide_maps_against_the_annotations(mapped, tmp_path):
    maps, ann = mapped
    out = tmp_path / "eval"
    proc = cli("slide-eval", maps, "--annotations", ann, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    doc = json.loads((out / "slide-eval.json").read_text())
    assert "SYNTHETIC" in doc["warning"]
    froc = doc["froc"]
    assert 0 <= froc["score"] <= 1 and (froc["n_slides"], froc["n_lesions"]) == (3, 2)
    assert set(froc["sensitivity_at"]) == {"0.25", "0.5", "1", "2", "4", "8"}
    auc = doc["slide_auc"]
    assert 0 <= auc["auc"] <= 1 and (auc["n_tumour"], auc["n_normal"]) == (2, 1)
    assert len(auc["ci95"]) == 2
    assert 0 <= doc["mean_dice"] <= 1 and 0 <= doc["mean_iou"] <= doc["mean_dice"]
    slides = {s["name"]: s for s in doc["slides"]}
    assert set(slides) == set(SLIDES)
    # The planted truth came through the annotation files: lesions, ITCs and slide truth.
    counts = {n: (s["tumour"], s["n_lesions"], s["n_itc"]) for n, s in slides.items()}
    assert counts == {
        "tumour_one": (True, 1, 0),
        "tumour_two": (True, 1, 1),
        "normal": (False, 0, 0),
    }
    assert slides["tumour_one"]["annotation"].endswith("tumour_one.xml")  # ASAP preferred
    assert slides["normal"]["dice"] in (0.0, None)  # nothing annotated to overlap
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One CSV per slide in the challenge's submission format: confidence,X,Y with level-0
    # integer pixels, no header, as many rows as detections.
    csvs = sorted(p.name for p in (out / "detections").iterdir())
    assert csvs == sorted(f"{name}.csv" for name in SLIDES)
    for name, slide in slides.items():
        lines = (out / "detections" / f"{name}.csv").read_text().splitlines()
        assert len(lines) == slide["n_detections"]
        for line in lines:
            confidence, x, y = line.split(",")
            assert 0 < float(confidence) <= 1
            assert 0 <= int(x) < W and 0 <= int(y) < H

    said = proc.stdout
    assert "SYNTHETIC" in said and "FROC score" in said and "slide AUC" in said
    table = said.splitlines()
    assert table[0].split()[0] == "slide"
    for name in SLIDES:
        assert any(line.split()[0] == name for line in table[1:]), said


def test_a_malformed_annotation_fails_with_one_paragraph_naming_the_file(mapped, tmp_path):
    maps, ann = mapped
    broken = tmp_path / "annotations"
    shutil.copytree(ann, broken)
    bad = broken / "tumour_two.xml"  # ASAP is taken before the GeoJSON beside it
    bad.write_text("<ASAP_Annotations><Annotations><Annotation")
    proc = cli("slide-eval", maps, "--annotations", broken, "--out", tmp_path / "eval")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith(ERROR_PREFIX) and "\n" not in err, err
    assert str(bad) in err and "not well-formed XML" in err
    assert "Traceback" not in proc.stderr
