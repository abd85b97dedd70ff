"""Camelyon16-style scoring of slide maps: detections, lesions, FROC, slide AUC, Dice, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box

from histodetect.errors import HistodetectError
from histodetect.slides.annotations.readers import read_annotation
from histodetect.slides.annotations.writers import asap_xml_bytes, qupath_geojson_bytes
from histodetect.slides.evaluation.froc import (
    Detection,
    SlideHits,
    detections_csv_bytes,
    find_detections,
    froc,
    lesion_map,
    read_detections_csv,
    score_detections,
    sensitivity_at,
)
from histodetect.slides.evaluation.scoring import (
    EvalOptions,
    evaluate_slides,
    overlap,
    read_reference,
    slide_auc,
)
from histodetect.slides.maps.folders import load_slide_map

CAMELYON16 = Path(__file__).resolve().parents[3].parent / "shared" / "annotations" / "camelyon16"
# Hand-made maps: level 0 at 1 µm/px, stride 25 px on a level downsampled 4x, so a cell is
# 100 x 100 level-0 px (100 µm) and cell (r, c) has its centre at (100 c + 50, 100 r + 50).
MPP, CELL, GRID = 1.0, 100, (20, 20)
# Every cell above the floor is a detection (the radius is half a cell).
HAND = EvalOptions(nms_radius_um=50.0, floor=0.05, n_boot=200)


def write_map(root: Path, name: str, hot: dict, *, mpp=MPP, grid=GRID, cell=CELL, **extra) -> Path:
    """A slide folder as `histodetect slide` writes it, with ``hot`` {(r, c): p} cells."""
    folder = root / name
    folder.mkdir(parents=True)
    prob = extra.pop("prob", None)
    if prob is None:
        prob = np.zeros(grid, np.float32)
        for (r, c), p in hot.items():
            prob[r, c] = p
    tissue = extra.pop("tissue", np.ones(prob.shape, bool))
    np.save(folder / "prob.npy", prob.astype(np.float32))
    Image.fromarray(tissue.astype(np.uint8) * 255).save(folder / "tissue.png")
    summary = {
        "slide": f"/slides/{name}.tif",
        "synthetic": extra.pop("synthetic", False),
        "level0_size_px": [prob.shape[1] * cell, prob.shape[0] * cell],
        "level0_mpp": mpp,
        "level": 1,
        "level_downsample": cell / 25,
        "resample_factor": 1.0,
        "stride_px": 25,
        "grid": list(prob.shape),
        "threshold": 0.5,
        "score": float(prob[tissue].max()),
        **extra,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


# ----------------------------------------------------------------------------- detections


def test_nms_takes_local_maxima_once_per_plateau_within_the_radius():
    prob = np.zeros((6, 8))
    prob[1, 1] = prob[1, 2] = 0.8  # a plateau: one detection, top-left cell
    prob[4, 6], prob[4, 4] = 0.9, 0.7  # 2 cells apart
    prob[0, 7] = 0.05  # below the floor
    prob[5, 0] = 0.99  # not tissue
    tissue = np.ones_like(prob, bool)
    tissue[5, 0] = False
    wide = find_detections(prob, 10, mpp=1.0, radius_um=25, floor=0.1, tissue=tissue)
    assert wide == [Detection(0.9, 65, 45), Detection(0.8, 15, 15)]
    narrow = find_detections(prob, 10, mpp=1.0, radius_um=15, floor=0.1, tissue=tissue)
    assert narrow == [Detection(0.9, 65, 45), Detection(0.8, 15, 15), Detection(0.7, 45, 45)]
    # The floor only cuts the list: what is above any confidence does not depend on it.
    low = find_detections(prob, 10, mpp=1.0, radius_um=25, floor=0.01, tissue=tissue)
    assert low[:2] == wide and low[2] == Detection(0.05, 75, 5)
    # Level-0 coordinates of cell centres, rounded to whole pixels (a 127.6 px cell).
    one = np.zeros((3, 3))
    one[2, 1] = 0.5
    assert find_detections(one, 127.6, mpp=0.25) == [Detection(0.5, 191, 319)]


def test_detection_csv_is_the_challenge_format():
    dets = [Detection(0.953125, 1550, 1550), Detection(0.1, 3, 70000)]
    data = detections_csv_bytes(dets).decode()
    assert data == "0.953125,1550,1550\n0.1,3,70000\n"  # no header
    # Parsed as the challenge's script does: float, int, int on every line.
    rows = [line.split(",") for line in data.splitlines()]
    assert [(float(a), int(b), int(c)) for a, b, c in rows] == [
        (0.953125, 1550, 1550),
        (0.1, 3, 70000),
    ]


def test_read_detections_csv_skips_a_header_and_names_bad_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("confidence,X,Y\n0.5,10,20\n\n0.25,30.0,40\n")
    assert read_detections_csv(path) == [Detection(0.5, 10, 20), Detection(0.25, 30, 40)]
    path.write_text("0.5,10,20\n0.5,ten,20\n")
    with pytest.raises(HistodetectError, match="line 2"):
        read_detections_csv(path)


# ----------------------------------------------------------------------------- lesions


def _ann(tmp_path: Path, tumours, exclusions=(), dots=(), name="a") -> object:
    path = tmp_path / f"{name}.xml"
    path.write_bytes(asap_xml_bytes(tumours, exclusions, dots))
    return read_annotation(path)


def test_lesions_closer_than_75_um_merge_and_small_ones_are_itc(tmp_path):
    # 250 µm squares 50 µm apart: one lesion; 100 µm apart: two.
    merged = lesion_map(_ann(tmp_path, [box(0, 0, 250, 250), box(300, 0, 550, 250)]), mpp=MPP)
    apart = lesion_map(_ann(tmp_path, [box(0, 0, 250, 250), box(350, 0, 600, 250)]), mpp=MPP)
    assert merged.n_lesions == 1 and apart.n_lesions == 2
    # Grown by 37.5 µm, a 150 µm square's major axis is under 275 µm: ITC; 200 µm: a lesion.
    sizes = lesion_map(
        _ann(tmp_path, [box(1000, 1000, 1150, 1150), box(2000, 2000, 2200, 2200)]), mpp=MPP
    )
    by_x = sorted(sizes.lesions, key=lambda les: les.x)
    assert [les.itc for les in by_x] == [True, False]
    assert by_x[0].major_axis_um < 275 < by_x[1].major_axis_um
    assert by_x[1].area_um2 == pytest.approx(200**2, rel=0.1)
    assert by_x[1].longest_diameter_um == pytest.approx(200 * 2**0.5, rel=0.1)
    assert by_x[1].x == pytest.approx(2100, abs=8) and by_x[1].y == pytest.approx(2100, abs=8)
    # A dot alone is one pixel grown by 37.5 µm: an ITC.
    dot = lesion_map(_ann(tmp_path, [], dots=[(5000, 5000)]), mpp=MPP)
    assert len(dot.lesions) == 1 and dot.lesions[0].itc
    # At 0.243 µm/px the same physical sizes give the same verdicts.
    scaled = [box(1000, 1000, 1000 + 150 / 0.243, 1000 + 150 / 0.243)]
    assert lesion_map(_ann(tmp_path, scaled), mpp=0.243).lesions[0].itc


def test_hits_lesions_itc_double_hits_and_normal_slides(tmp_path):
    ann = _ann(
        tmp_path, [box(0, 0, 400, 400), box(1000, 1000, 1040, 1040)], [box(100, 100, 200, 200)]
    )
    lmap = lesion_map(ann, mpp=MPP)
    assert lmap.n_lesions == 1 and len(lmap.lesions) == 2
    dets = [
        Detection(0.9, 300, 300),
        Detection(0.6, 150, 150),  # in the excluded hole: filled, so a second hit, not an FP
        Detection(0.95, 1020, 1020),  # on the ITC: ignored
        Detection(0.7, 3000, 3000),  # nowhere: FP
    ]
    hits = score_detections(dets, lmap)
    assert hits.kinds == ["lesion", "lesion", "itc", "fp"] and hits.fp == [0.7]
    assert list(hits.best.values()) == [0.9] and hits.n_lesions == 1
    normal = score_detections(dets, lesion_map(None, mpp=MPP))
    assert normal.kinds == ["fp"] * 4 and normal.n_lesions == 0


def test_mask_annotations_give_the_same_lesions_as_polygons(tmp_path):
    polys = [box(200, 200, 600, 600), box(1000, 200, 1400, 600)]
    mask = np.zeros((250, 250), np.uint8)  # 8 level-0 px per mask pixel
    mask[25:75, 25:75] = mask[25:75, 125:175] = 1
    Image.fromarray(mask).save(tmp_path / "m_Mask.png")
    from_mask = lesion_map(read_annotation(tmp_path / "m_Mask.png", downsample=8), mpp=MPP)
    from_polys = lesion_map(_ann(tmp_path, polys), mpp=MPP)
    assert from_mask.n_lesions == from_polys.n_lesions == 2
    assert from_mask.origin == from_polys.origin
    assert np.array_equal(from_mask.labels, from_polys.labels)


# ----------------------------------------------------------------------------- FROC


def test_sensitivity_is_read_off_the_curve_as_numpy_interp_does():
    rng = np.random.default_rng(0)
    for _ in range(300):
        fps = np.r_[0.0, np.sort(rng.integers(0, 7, 7) / 2)]
        sens = np.sort(rng.integers(0, 5, 8) / 4)
        xs = [0.25, 0.5, 1, 2, 4, 8, 1.5, 0.0]
        assert np.allclose(sensitivity_at(fps, sens, xs), np.interp(xs, fps, sens))


def test_froc_needs_slides_and_lesions():
    assert froc([]) is None
    assert froc([SlideHits(fp=[0.5], n_lesions=0)]) is None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def hand_case(tmp_path) -> tuple[Path, Path]:
    """Three slides, three lesions, one ITC, by hand (cells are 100 µm; see the test)."""
    maps, ann = tmp_path / "maps", tmp_path / "annotations"
    ann.mkdir()
    # tumor_a (ASAP): L1 = [200, 600]² with the hole [300, 400]² cut out, L2 = [1000, 1400] x
    # [200, 600], and an ITC [1500, 1540]².
    (ann / "tumor_a.xml").write_bytes(
        asap_xml_bytes(
            [box(200, 200, 600, 600), box(1000, 200, 1400, 600), box(1500, 1500, 1540, 1540)],
            [box(300, 300, 400, 400)],
        )
    )
    # tumor_b (QuPath): L3 = [800, 1200] x [1200, 1600]; normal_c has no annotation.
    (ann / "tumor_b.geojson").write_bytes(qupath_geojson_bytes([box(800, 1200, 1200, 1600)]))
    hot_a = {(4, 4): 0.9, (3, 3): 0.6, (3, 11): 0.85, (15, 15): 0.95, (15, 3): 0.7}
    write_map(maps, "tumor_a", hot_a)
    write_map(maps, "tumor_b", {(2, 2): 0.3})
    write_map(maps, "normal_c", {(5, 5): 0.85, (10, 10): 0.5})
    return maps, ann


def test_hand_computed_froc_auc_and_dice(hand_case, tmp_path):
    maps, ann = hand_case
    result = evaluate_slides(maps, ann, options=HAND)
    slides = {s.name: s for s in result.slides}
    a, b, c = slides["tumor_a"], slides["tumor_b"], slides["normal_c"]
    # tumor_a: L1 hit at 0.9 (centre 450, 450) and again at 0.6 in its excluded hole, which the
    # filling puts back (not an FP); L2 hit at 0.85; the ITC hit at 0.95 counts for nothing;
    # (15, 3) at 0.7 is an FP. tumor_b: L3 missed, 0.3 an FP. normal_c: 0.85 and 0.5 are FPs.
    assert (a.n_detections, a.n_lesions, a.lesions_detected, a.n_itc, a.false_positives) == (
        5,
        2,
        2,
        1,
        1,
    )
    assert (b.n_lesions, b.lesions_detected, b.false_positives) == (1, 0, 1)
    assert (c.n_lesions, c.false_positives, c.tumour) == (0, 2, False)
    # FROC over 3 slides and 3 lesions; thresholds from the top:
    #   0.9: 1 lesion, 0 FP -> (0, 1/3);  0.85: L2 and normal_c's 0.85 -> (1/3, 2/3);
    #   0.7 -> (2/3, 2/3);  0.5 -> (1, 2/3);  0.3 -> (4/3, 2/3).  (0.6 and 0.95 are no points.)
    f = result.froc
    assert f.n_slides == 3 and f.n_lesions == 3
    assert np.allclose(f.fps, [0, 0, 1 / 3, 2 / 3, 1, 4 / 3])
    assert np.allclose(f.sensitivity, [0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    # 1/4 FP lies between (0, 1/3) and (1/3, 2/3): 1/3 + 3/4 * 1/3 = 7/12; beyond 4/3 the
    # curve stays at 2/3.
    assert np.allclose(f.at_rates, [7 / 12, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert f.score == pytest.approx((7 / 12 + 5 * 2 / 3) / 6)  # 47/72
    # Slide AUC: tumour slides score 0.95 and 0.3, the normal one 0.85: 1 pair of 2 right.
    assert result.auc["auc"] == pytest.approx(0.5) and result.auc["n_tumour"] == 2
    lo, hi = result.auc["ci95"]
    assert 0 <= lo <= hi <= 1
    # Dice at the cells: tumor_a predicts 5 cells (>= 0.5) against 15 + 16 annotated cells
    # (L1 less the excluded cell (3, 3); the ITC covers no cell centre): 2 in common.
    assert a.dice == pytest.approx(2 * 2 / (5 + 31)) and a.iou == pytest.approx(2 / 34)
    assert b.dice == 0 and b.iou == 0 and c.dice == 0
    assert result.mean_dice == pytest.approx((1 / 9 + 0) / 2)  # annotated slides only
    assert result.mean_iou == pytest.approx((1 / 17 + 0) / 2)
    assert len(result.lesions) == 4 and sum(les.itc for les in result.lesions) == 1
    l1 = next(les for les in result.lesions if les.slide == "tumor_a" and les.x < 700)
    assert l1.best_score == 0.9 and l1.area_um2 == pytest.approx(400**2 - 100**2, rel=0.05)
    l3 = next(les for les in result.lesions if les.slide == "tumor_b")
    assert l3.detected is False and l3.best_score is None
    assert (l3.x, l3.y) == pytest.approx((1000, 1400), abs=8)
    itc = next(les for les in result.lesions if les.itc)
    assert itc.detected and itc.best_score == 0.95 and itc.major_axis_um < 275


def test_outputs_json_png_and_official_csvs(hand_case, tmp_path):
    maps, ann = hand_case
    out = tmp_path / "eval"
    result = evaluate_slides(maps, ann, out=out, options=HAND)
    doc = json.loads((out / "slide-eval.json").read_text())
    assert doc["froc"]["score"] == pytest.approx(47 / 72)
    assert doc["froc"]["sensitivity_at"]["0.25"] == pytest.approx(7 / 12)
    assert doc["froc"]["curve"]["threshold"][0] is None  # the origin
    assert doc["slide_auc"]["auc"] == pytest.approx(0.5) and doc["warning"] is None
    assert len(doc["slides"]) == 3 and len(doc["lesions"]) == 4
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "detections" / "old_slide.csv").write_text("0.5,1,1\n")  # from an earlier run
    evaluate_slides(maps, ann, out=out, options=HAND)
    csvs = sorted(p.name for p in (out / "detections").iterdir())
    assert csvs == ["normal_c.csv", "tumor_a.csv", "tumor_b.csv"]
    assert (out / "detections" / "tumor_a.csv").read_text().splitlines()[0] == "0.95,1550,1550"
    assert not list(maps.glob("*.json"))  # nothing written beside the maps
    header, rows = result.table()
    assert header[0] == "slide" and [r[0] for r in rows] == ["normal_c", "tumor_a", "tumor_b"]
    assert rows[1][4] == "2/2" and any("FROC score 0.653" in line for line in result.headline())


def test_reference_csv_decides_the_slide_truth(hand_case, tmp_path):
    maps, ann = hand_case
    ref = tmp_path / "reference.csv"
    ref.write_text(
        "tumor_a,Tumor,IDC,Macro\ntumor_b,Normal,,None\nnormal_c,Normal,,None\ntest_999,Normal\n"
    )
    assert read_reference(ref) == {
        "tumor_a": True,
        "tumor_b": False,
        "normal_c": False,
        "test_999": False,
    }
    result = evaluate_slides(maps, ann, reference=ref, out=tmp_path / "e", options=HAND)
    # tumour 0.95 against normal 0.3 and 0.85: AUC 1. The FROC still follows the annotations.
    assert result.auc["auc"] == pytest.approx(1.0) and result.auc["n_normal"] == 2
    assert result.froc.score == pytest.approx(47 / 72)
    b = next(s for s in result.slides if s.name == "tumor_b")
    assert any("reference says normal" in n for n in b.notes)
    assert any("test_999" in n for n in result.notes)
    # A tumour slide without annotation cannot be scored for lesions: out of the FROC.
    ref.write_text("tumor_a,Tumor\ntumor_b,Tumor\nnormal_c,Tumor\n")
    result = evaluate_slides(maps, ann, reference=ref, out=tmp_path / "e", options=HAND)
    c = next(s for s in result.slides if s.name == "normal_c")
    assert not c.in_froc and result.froc.n_slides == 2 and result.auc is None
    ref.write_text("tumor_a,Tumor\ntumor_b,Maybe\n")
    with pytest.raises(HistodetectError, match="line 2"):
        read_reference(ref)


def test_the_shared_camelyon16_reference_reads():
    if not (CAMELYON16 / "reference.csv").is_file():
        pytest.skip(f"real Camelyon16 reference not found at {CAMELYON16} (only in CI/dev)")
    truth = read_reference(CAMELYON16 / "reference.csv")
    assert len(truth) == 129 and sum(truth.values()) == 49 and truth["test_001"]


def test_slide_auc_by_hand():
    # Tumour 0.9, 0.8, 0.4 against normal 0.5, 0.1: 5 of the 6 pairs are ordered right.
    auc = slide_auc([True, True, True, False, False], [0.9, 0.8, 0.4, 0.5, 0.1], n_boot=100)
    assert auc["auc"] == pytest.approx(5 / 6) and auc["n_boot"] == 100
    assert slide_auc([True, True], [0.1, 0.2]) is None
    assert overlap(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (None, None)


def test_maps_folder_errors(tmp_path):
    with pytest.raises(HistodetectError, match="no slide maps"):
        evaluate_slides(tmp_path, None)
    folder = write_map(tmp_path, "s", {(0, 0): 0.5})
    assert load_slide_map(folder).cell == CELL  # 25 px stride x 4
    (folder / "summary.json").write_text("{")
    with pytest.raises(HistodetectError, match=r"summary\.json"):
        load_slide_map(folder)
    # One slide's folder works as MAPS too; without annotations every slide is normal.
    good = write_map(tmp_path / "x", "one", {(1, 1): 0.7}, level0_mpp=None)
    result = evaluate_slides(good, None, out=tmp_path / "o", options=HAND)
    assert result.froc is None and result.slides[0].false_positives == 1
    assert any("0.243" in n for n in result.slides[0].notes)  # Camelyon16's mpp assumed


def test_slide_eval_sizes_a_slide_without_resolution_as_slide_analysed_it(tmp_path):
    # `slide` analysed a file without a recorded resolution as if it were at 0.972 µm/px:
    # two hot cells 200 level-0 px apart are then 194 µm apart and both survive a 120 µm
    # suppression radius; at Camelyon16's 0.243 µm/px (49 µm) one would be suppressed.
    maps = tmp_path / "maps"
    write_map(maps, "a", {(2, 2): 0.9, (2, 4): 0.8}, mpp=None, level0_mpp_assumed=0.972)
    options = EvalOptions(nms_radius_um=120.0, floor=0.05, n_boot=200)
    result = evaluate_slides(maps, None, out=tmp_path / "o", options=options)
    (slide,) = result.slides
    assert any("0.972" in n and "as `slide` analysed it" in n for n in slide.notes)
    assert not any("0.243" in n for n in slide.notes)
    assert slide.false_positives == 2  # 2 cells apart = 194 µm > 120 µm: both kept


def test_windowed_lesions_equal_a_whole_slide_evaluation_mask(tmp_path):
    """The lesion map is drawn only around the tumour; the challenge draws the whole slide.
    Both must label every detection alike (independent whole-slide computation here)."""
    from scipy import ndimage
    from skimage.measure import label

    from histodetect.slides.annotations.shapes import annotation_raster

    ann = _ann(
        tmp_path,
        [box(200, 200, 600, 600), box(640, 200, 800, 400), box(1500, 1500, 1540, 1540)],
        [box(300, 300, 400, 400)],
    )
    lmap = lesion_map(ann, mpp=MPP, slide_size=(2000, 2000))
    scale = lmap.scale
    shape = (int(np.ceil(2000 / scale)),) * 2
    tumour = annotation_raster(ann, shape, scale, dots=True)
    grown = ndimage.distance_transform_edt(~tumour) < 37.5 / scale
    whole = label(ndimage.binary_fill_holes(grown), connectivity=2)
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(0, 2000, 4000), rng.uniform(0, 2000, 4000)
    ours = np.array([lmap.label_at(x, y) for x, y in zip(xs, ys, strict=True)])
    theirs = whole[(ys // scale).astype(int), (xs // scale).astype(int)]
    assert np.array_equal(ours > 0, theirs > 0) and len(np.unique(theirs)) == 3
    # Same partition: each of our labels is exactly one of theirs.
    for lab in np.unique(ours[ours > 0]):
        assert len(np.unique(theirs[ours == lab])) == 1


# ----------------------------------------------------------------------------- synthetic slides


def test_synthetic_slides_with_planted_tumours_and_slidesynth_annotations(tmp_path):
    """Planted tumours, their annotations as slidesynth writes them, maps built from the
    planted truth (``truth_cells``) rather than by running the model: the scoring must find
    exactly what was planted. (`histodetect slide` itself is tested in test_slide.py.)"""
    from histodetect.slides.synthetic.slide import (
        truth_cells,
        write_synthetic_slide,
        write_truth_annotations,
    )

    tissue = [(512.0, 384.0, 480.0, 360.0)]
    # A 330 x 272 µm tumour (a lesion) and a 58 µm one (isolated tumour cells), at 0.972 µm/px.
    tumours = [(380.0, 300.0, 170.0, 140.0), (850.0, 600.0, 30.0, 30.0)]
    slides, ann_dir, maps = tmp_path / "slides", tmp_path / "annotations", tmp_path / "maps"
    slides.mkdir()
    planted = write_synthetic_slide(
        slides / "planted.tif", 1024, 768, tissue, tumours, downsamples=(1, 4)
    )
    clean = write_synthetic_slide(slides / "clean.tif", 1024, 768, tissue, [], downsamples=(1, 4))
    files = write_truth_annotations(planted, ann_dir)
    write_truth_annotations(clean, ann_dir)
    xml, geo = read_annotation(files["asap"]), read_annotation(files["geojson"])
    assert xml.n_tumour == geo.n_tumour == 2
    assert xml.tumour.symmetric_difference(geo.tumour).area < 1e-3
    ellipses = np.pi * (170 * 140 + 30 * 30)
    assert xml.area_px == pytest.approx(ellipses, rel=1e-3)
    assert not read_annotation(ann_dir / "clean.geojson").has_tumour

    grid = (24, 32)  # analysed at level 0 (0.972 µm/px) with 32 px cells
    on_tissue = truth_cells(tissue, grid, 32)
    tumour_cells = truth_cells(tumours, grid, 32) & on_tissue
    prob = np.where(tumour_cells, 0.9, 0.05) * on_tissue
    prob[21, 16] = 0.6  # a false positive on tissue, > 250 µm from both tumours
    common = {"mpp": 0.972, "grid": grid, "cell": 32, "tissue": on_tissue, "synthetic": True}
    write_map(maps, "planted", {}, prob=prob, **common)
    normal = np.where(on_tissue, 0.05, 0.0)
    normal[12, 16] = 0.4
    write_map(maps, "clean", {}, prob=normal, **common)

    result = evaluate_slides(maps, ann_dir, options=EvalOptions(n_boot=100))
    slides_by = {s.name: s for s in result.slides}
    p, c = slides_by["planted"], slides_by["clean"]
    assert (p.n_lesions, p.n_itc, p.lesions_detected, p.false_positives) == (1, 1, 1, 1)
    assert c.false_positives == 1 and c.tumour is False and c.annotation.endswith("clean.xml")
    # The lesion's best hit (0.9) beats every FP (0.6, 0.4): sensitivity 1 at every rate.
    assert result.froc.at_rates == (1.0,) * 6 and result.froc.score == 1.0
    assert result.auc["auc"] == 1.0
    # The map's regions are the planted cells plus the FP cell: Dice 2N / (2N + 1).
    n = int(tumour_cells.sum())
    assert p.dice == pytest.approx(2 * n / (2 * n + 1)) and p.iou == pytest.approx(n / (n + 1))
    lesion = next(les for les in result.lesions if not les.itc)
    assert lesion.major_axis_um > 275 and lesion.detected and lesion.best_score == 0.9
    assert lesion.longest_diameter_um == pytest.approx(340 * 0.972, rel=0.05)
    assert result.synthetic and "SYNTHETIC" in result.headline()[0]


def test_missing_annotations_folder_and_annotations_past_the_slide(hand_case, tmp_path):
    maps, ann = hand_case
    with pytest.raises(HistodetectError, match="no such annotations folder"):
        evaluate_slides(maps, tmp_path / "typo", options=HAND)
    # An outline far beyond the slide: wrong slide, level or scale; scored, but said so.
    (ann / "tumor_b.geojson").write_bytes(
        qupath_geojson_bytes([box(9e5, 9e5, 9e5 + 400, 9e5 + 400)])
    )
    result = evaluate_slides(maps, ann, out=tmp_path / "o", options=HAND)
    slide_b = next(s for s in result.slides if s.name == "tumor_b")
    assert any("reaches past the slide" in n for n in slide_b.notes)
    slide_a = next(s for s in result.slides if s.name == "tumor_a")
    assert not any("reaches past" in n for n in slide_a.notes)
