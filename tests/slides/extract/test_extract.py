"""`histodetect extract`: exact centre-rule labels, tissue only, resume, ranks, errors, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from histodetect.cli.main import main
from histodetect.data.sources import open_source
from histodetect.data.store import open_store
from histodetect.slides.extract import patches as extract_mod
from histodetect.slides.extract.patches import extract_patches
from histodetect.slides.extract.sampling import ExtractOptions, centre_labels
from histodetect.slides.synthetic.slide import write_synthetic_slide, write_truth_annotations
from tests.slides.conftest import TISSUE, TUMOURS

SHARED_SLIDES = Path(__file__).resolve().parents[3].parent / "shared" / "slides"
W, H = 1280, 1120

# A tumour outline with a hole, in level-0 px. On the slide of `hole_slide` (level 1 at PCam's
# resolution, level 0 twice as fine) the grid's centre boxes are the 64 px squares at multiples
# of 64: those beside x = 320 or y = 320 only touch the outline, those in the hole lie inside
# it, and those at x = 832 overlap the right edge (832.5) by a half-pixel sliver.
OUTER = (320.0, 320.0, 832.5, 704.0)
HOLE = (512.0, 448.0, 640.0, 576.0)


def _rect(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _geojson(path: Path, rings: list, cls: str = "Tumor") -> Path:
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": {"objectType": "annotation", "classification": {"name": cls}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def _overlap(box, rect) -> float:
    """Area shared by two axis-aligned rectangles (x0, y0, x1, y1): plain interval arithmetic."""
    w = min(box[2], rect[2]) - max(box[0], rect[0])
    h = min(box[3], rect[3]) - max(box[1], rect[1])
    return max(w, 0.0) * max(h, 0.0)


@pytest.fixture(scope="module")
def hole_slide(tmp_path_factory) -> tuple[Path, Path]:
    """A SYNTHETIC slide at 0.486 µm/px (levels 1, 2, 8) and the outline-with-hole GeoJSON."""
    root = tmp_path_factory.mktemp("hole")
    slide = root / "holey.tif"
    write_synthetic_slide(slide, W, H, TISSUE, [], mpp=0.486, downsamples=(1, 2, 8))
    ann = root / "ann"
    ann.mkdir()
    _geojson(ann / "holey.geojson", [_rect(*OUTER), _rect(*HOLE)])
    return slide, ann


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> tuple[list[Path], Path]:
    """Three small SYNTHETIC slides (two with planted tumours) and their annotations."""
    root = tmp_path_factory.mktemp("slides")
    paths = []
    for i, tumours in enumerate([TUMOURS, [], [(700.0, 600.0, 150.0, 150.0)]]):
        path = root / f"s{i}.tif"
        truth = write_synthetic_slide(path, W, H, TISSUE, tumours, seed=i)
        write_truth_annotations(truth, root / "ann")
        paths.append(path)
    for xml in (root / "ann").glob("*.xml"):
        xml.unlink()  # the GeoJSON files are the annotations here
    return paths, root / "ann"


def test_centre_rule_touching_is_negative_a_sliver_positive_the_hole_negative():
    tumour = shapely.Polygon(_rect(*OUTER)[:-1], [_rect(*HOLE)[:-1]])
    # Patches of side 96 at level 0: the centre box is [x + 32, x + 64).
    corners = {
        "touches the left edge": (320 - 64, 400 - 32),
        "touches a corner": (320 - 64, 320 - 64),
        "inside the hole": (544 - 32, 480 - 32),
        "straddles the hole's edge": (630 - 32, 480 - 32),
        "a sliver past the right edge": (832.4 - 32, 400 - 32),
        "just beyond the right edge": (832.5 - 32, 400 - 32),
        "well inside": (400 - 32, 400 - 32),
    }
    x, y = np.array(list(corners.values())).T
    got = dict(zip(corners, centre_labels(tumour, x, y, 96.0), strict=True))
    assert got == {
        "touches the left edge": 0,
        "touches a corner": 0,
        "inside the hole": 0,
        "straddles the hole's edge": 1,
        "a sliver past the right edge": 1,
        "just beyond the right edge": 0,
        "well inside": 1,
    }


def test_every_extracted_label_matches_its_centre_box(hole_slide, tmp_path):
    slide, ann = hole_slide
    # Ask for more than there are: every tissue window of the grid is extracted and checked.
    opts = ExtractOptions(per_slide=100_000)
    result = extract_patches([slide], ann, tmp_path / "data", opts, progress=False)
    store = open_store(tmp_path / "data")
    assert result.patches == len(store) > 200
    side = 96 * 2.0  # level-0 px per patch: level 1 is read, level 0 is twice as fine
    boxes = [
        (x + side / 3, y + side / 3, x + 2 * side / 3, y + 2 * side / 3) for x, y in store.coords
    ]
    truth = np.array([_overlap(b, OUTER) - _overlap(b, HOLE) > 0 for b in boxes])
    assert np.array_equal(store.labels == 1, truth)
    kinds = {
        "touching": [b for b in boxes if b[2] == OUTER[0] and OUTER[1] < b[1] < OUTER[3]],
        "in the hole": [b for b in boxes if _overlap(b, HOLE) == (side / 3) ** 2],
        "sliver": [b for b in boxes if b[0] == 832.0 and OUTER[1] <= b[1] < OUTER[3] - 64],
    }
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    label = dict(zip(map(tuple, boxes), store.labels, strict=True))
    assert {label[b] for b in kinds["touching"] + kinds["in the hole"]} == {0}
    assert {label[b] for b in kinds["sliver"]} == {1}
    # The pixels are the slide's at the model resolution: level 1 read as it is.
    from histodetect.slides.wsi.readers import open_slide

    reader = open_slide(slide)
    x, y = store.coords[7] // 2
    assert np.array_equal(store.read([7])[0], reader.read(1, int(x), int(y), 96, 96))
    reader.close()


def test_an_asap_exclusion_cuts_the_same_hole(hole_slide, tmp_path):
    slide, geojson_folder = hole_slide
    from histodetect.slides.annotations.writers import asap_xml_bytes

    ann = tmp_path / "ann"
    ann.mkdir()
    # The outline as ASAP group _0 and the hole as an exclusion (_2), as Camelyon16 has them.
    xml = asap_xml_bytes([shapely.box(*OUTER)], exclusions=[shapely.box(*HOLE)])
    (ann / "holey.xml").write_bytes(xml)
    opts = ExtractOptions(per_slide=100_000)
    extract_patches([slide], ann, tmp_path / "xml", opts, progress=False)
    extract_patches([slide], geojson_folder, tmp_path / "geojson", opts, progress=False)
    a, b = open_store(tmp_path / "xml"), open_store(tmp_path / "geojson")
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.labels, b.labels)
    assert 0 < a.labels.sum() < len(a)


def test_store_is_balanced_split_by_slide_and_says_synthetic(slides, tmp_path):
    paths, ann = slides
    opts = ExtractOptions(per_slide=60, positive_fraction=0.5)
    result = extract_patches(
        paths, ann, tmp_path / "data", opts, valid_fraction=0.3, progress=False
    )
    store = open_store(tmp_path / "data")
    assert result.assembled and store.synthetic and len(store) == result.patches
    per_slide = {s: store.labels[store.slides == s] for s in np.unique(store.slides)}
    assert [len(v) for v in per_slide.values()] == [60, 30, 60]  # s1: normal, negatives only
    assert [int(v.sum()) for v in per_slide.values()] == [30, 0, 30]
    for s in per_slide:  # no slide straddles the split
        assert len(set(store.splits[store.slides == s])) == 1
    assert {"train", "valid"} == set(store.splits)
    assert len(set(store.ids)) == len(store)
    assert all(
        i == f"{s}_{x}_{y}"
        for i, s, (x, y) in zip(store.ids, store.slides, store.coords, strict=True)
    )
    notes = next(d["notes"] for d in result.done if d["name"] == "s1")
    assert any("negatives only" in n for n in notes)


def test_kaggle_layout_with_meta_csv_splits_by_slide(slides, tmp_path):
    paths, ann = slides
    opts = ExtractOptions(per_slide=20)
    extract_patches(paths, ann, tmp_path / "k", opts, fmt="kaggle", progress=False)
    with open(tmp_path / "k" / "meta.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "slide", "x", "y", "label"]
    assert len(list((tmp_path / "k" / "train").glob("*.tif"))) == len(rows) == 50
    source = open_source(tmp_path / "k", valid_fraction=0.3)
    assert source.kind == "kaggle" and source.synthetic
    meta = {r["id"]: r for r in rows}
    for pid, slide, (x, y), label in zip(
        source.ids, source.slides, source.coords, source.labels, strict=True
    ):
        assert (meta[pid]["slide"], int(meta[pid]["x"]), int(meta[pid]["y"])) == (slide, x, y)
        assert int(meta[pid]["label"]) == label
    for s in set(source.slides):
        assert len(set(source.splits[source.slides == s])) == 1
    # The patches are those of the store format, pixel for pixel.
    extract_patches(paths, ann, tmp_path / "s", opts, progress=False)
    store = open_store(tmp_path / "s")
    order = {pid: i for i, pid in enumerate(store.ids)}
    pick = [order[pid] for pid in source.ids[:10]]
    assert np.array_equal(source.read(range(10)), store.read(pick))


@pytest.mark.parametrize("fmt", ["store", "kaggle"])
def test_an_interrupted_extraction_resumes_with_nothing_lost_or_doubled(
    slides, tmp_path, monkeypatch, fmt
):
    paths, ann = slides
    opts = ExtractOptions(per_slide=30, positions="random", seed=3)
    whole = extract_patches(paths, ann, tmp_path / "whole", opts, fmt=fmt, progress=False)
    real, calls = extract_mod.extract_slide, []

    def dies_on_the_second_slide(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: nothing after this line runs
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "extract_slide", dies_on_the_second_slide)
    with pytest.raises(KeyboardInterrupt):
        extract_patches(paths, ann, tmp_path / "cut", opts, fmt=fmt, progress=False)
    monkeypatch.setattr(extract_mod, "extract_slide", real)
    again = extract_patches(paths, ann, tmp_path / "cut", opts, fmt=fmt, progress=False)
    assert len(again.skipped) == 1 and len(again.done) == 2
    a, b = open_source(tmp_path / "whole"), open_source(tmp_path / "cut")
    assert list(a.ids) == list(b.ids) and len(set(b.ids)) == len(b.ids) == whole.patches
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.read(range(len(a))), b.read(range(len(b))))
    # A finished extraction rerun does nothing and keeps the output.
    third = extract_patches(paths, ann, tmp_path / "cut", opts, fmt=fmt, progress=False)
    assert len(third.skipped) == 3 and not third.done and third.assembled


def test_a_rerun_with_other_settings_removes_the_old_parts(slides, tmp_path):
    paths, ann = slides
    out = tmp_path / "out"
    first = extract_patches(paths, ann, out, ExtractOptions(per_slide=20), progress=False)
    assert first.stale_parts == 0
    old_parts = set((out / ".extract" / "parts").glob("*.npz"))
    assert len(old_parts) == 3
    size = sum(p.stat().st_size for p in old_parts)
    again = extract_patches(paths, ann, out, ExtractOptions(per_slide=25), progress=False)
    new_parts = set((out / ".extract" / "parts").glob("*.npz"))
    assert len(new_parts) == 3 and not new_parts & old_parts  # only this run's parts are left
    assert (again.stale_parts, again.stale_bytes) == (3, size)
    assert again.patches == len(open_store(out).ids)


def test_ranks_share_slides_and_the_last_assembles(slides, tmp_path):
    paths, ann = slides
    opts = ExtractOptions(per_slide=20)
    alone = extract_patches(paths, ann, tmp_path / "one", opts, progress=False)
    first = extract_patches(paths, ann, tmp_path / "two", opts, rank=0, world=2, progress=False)
    assert not first.assembled and len(first.assigned) == 2
    second = extract_patches(paths, ann, tmp_path / "two", opts, rank=1, world=2, progress=False)
    assert second.assembled and second.patches == alone.patches
    assert list(open_store(tmp_path / "two").ids) == list(open_store(tmp_path / "one").ids)


def test_worker_processes_give_the_same_patches(slides, tmp_path):
    paths, ann = slides
    opts = ExtractOptions(per_slide=20)
    extract_patches(paths, ann, tmp_path / "one", opts, progress=False)
    extract_patches(paths, ann, tmp_path / "two", opts, workers=2, progress=False)
    a, b = open_store(tmp_path / "one"), open_store(tmp_path / "two")
    assert list(a.ids) == list(b.ids)
    assert np.array_equal(a.images, b.images)


def test_hard_negatives_come_from_where_a_map_said_tumour(slides, tmp_path):
    paths, ann = slides
    normal = paths[1]
    maps = tmp_path / "maps" / "s1"
    maps.mkdir(parents=True)
    prob = np.zeros((H // 32, W // 32), np.float32)
    prob[:, : prob.shape[1] // 3] = 1.0  # the map called the left third tumour
    np.save(maps / "prob.npy", prob)
    (maps / "summary.json").write_text(json.dumps({"stride_px": 32, "slide": str(normal)}))
    share = {}
    for name, hard in (("plain", None), ("hard", str(tmp_path / "maps"))):
        opts = ExtractOptions(per_slide=80, positive_fraction=0.0, hard_negatives=hard)
        extract_patches([normal], ann, tmp_path / name, opts, progress=False)
        centres = open_store(tmp_path / name).coords[:, 0] + 48
        share[name] = float(np.mean(centres < W // 3 // 32 * 32))
    assert share["hard"] > share["plain"] + 0.3, share


def test_bad_slides_and_annotations_are_named_and_the_rest_go_on(slides, tmp_path, capsys):
    paths, ann = slides
    bad_ann = tmp_path / "ann"
    bad_ann.mkdir()
    for f in ann.iterdir():
        (bad_ann / f.name).write_bytes(f.read_bytes())
    (bad_ann / "s2.geojson").write_text("{ not json")
    garbage = tmp_path / "broken.svs"
    garbage.write_bytes(b"not a slide at all" * 50)
    out = tmp_path / "data"
    args = ["extract", *map(str, [*paths, garbage]), "--annotations", str(bad_ann)]
    code = main([*args, "--out", str(out), "--per-slide", "20", "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "broken.svs" in printed.out and "s2.geojson" in printed.out
    with open(out / "extract_problems.csv", newline="") as fh:
        problems = list(csv.DictReader(fh))
    assert sorted(Path(p["where"]).name for p in problems) == ["broken.svs", "s2.tif"]
    assert "not valid JSON" in " ".join(p["problem"] for p in problems)
    assert set(open_store(out).slides) == {"s0", "s1"}


def test_nothing_extracted_exits_2_naming_the_files(tmp_path, capsys):
    garbage = tmp_path / "broken.svs"
    garbage.write_bytes(b"x" * 1000)
    ann = tmp_path / "ann"
    ann.mkdir()
    code = main(["extract", str(garbage), "--annotations", str(ann), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nothing could be extracted" in err and "broken.svs" in err
    assert "Traceback" not in err
    code = main(["extract", str(garbage), "--annotations", str(tmp_path / "nope"), "--out", "x"])
    assert code == 2 and "no such annotations folder" in capsys.readouterr().err


def test_real_slide_positives_inside_a_hand_drawn_polygon_negatives_on_tissue(tmp_path):
    slide = SHARED_SLIDES / "CMU-1-Small-Region.svs"
    if not slide.exists():
        pytest.skip(f"real slide fixtures not found at {SHARED_SLIDES} (only present in CI/dev)")
    # A QuPath-style outline drawn over the middle of the tissue (level-0 px, 0.499 µm/px).
    outline = [[800, 1800], [1400, 1700], [1500, 2300], [1000, 2600], [750, 2200], [800, 1800]]
    ann = tmp_path / "ann"
    ann.mkdir()
    _geojson(ann / "CMU-1-Small-Region.geojson", [outline])
    opts = ExtractOptions(per_slide=120)
    result = extract_patches([slide], ann, tmp_path / "data", opts, progress=False)
    store = open_store(tmp_path / "data")
    assert not store.synthetic and result.positives == 60 and len(store) == 120
    assert len(set(store.ids)) == len(store)
    polygon = shapely.Polygon(outline)
    side = 96 * 0.972 / 0.499  # level-0 px per patch: level 0 read and downsampled ~1.95x
    for (x, y), label, image in zip(store.coords, store.labels, store.images, strict=True):
        centre = shapely.box(x + side / 3, y + side / 3, x + 2 * side / 3, y + 2 * side / 3)
        overlap = centre.intersection(polygon).area
        if label:
            assert overlap > 0
        else:
            assert overlap == 0
            # On tissue: this slide's glass is ~243 grey; a window of glass (even with dust)
            # has no pixels darker than 230, the faintest strand of tissue kept has 1.5 %.
            assert (image.astype(np.float32).mean(-1) < 230).mean() > 0.005


@pytest.mark.slow
def test_the_loop_closes_extract_train_slide_slide_eval(tmp_path, capsys):
    # SYNTHETIC slides with planted tumours and their annotations: three to learn from (all
    # with tumour, so a validation slide holds both classes), two held out.
    plan = {
        "learn_a": [(520.0, 520.0, 220.0, 180.0)],
        "learn_b": [(760.0, 600.0, 200.0, 160.0)],
        "learn_c": [(400.0, 400.0, 180.0, 180.0)],
        "held_tumour": [(640.0, 560.0, 240.0, 200.0)],
        "held_normal": [],
    }
    paths = {}
    for seed, (name, tumours) in enumerate(plan.items()):
        paths[name] = tmp_path / "slides" / f"{name}.tif"
        paths[name].parent.mkdir(exist_ok=True)
        truth = write_synthetic_slide(paths[name], W, H, TISSUE, tumours, seed=seed)
        write_truth_annotations(truth, tmp_path / "ann")
    learn = [str(paths[n]) for n in plan if n.startswith("learn")]
    held = [str(paths[n]) for n in plan if n.startswith("held")]
    data, run, maps = tmp_path / "data", tmp_path / "run", tmp_path / "maps"
    ann = str(tmp_path / "ann")
    steps = [
        ["extract", *learn, "--annotations", ann, "--out", str(data), "--per-slide", "64"],
        ["train", "--data", str(data), "--out", str(run), "--max-steps", "4", "--epochs", "1"],
        ["slide", str(run), *held, "--out", str(maps), "--quiet"],
        ["slide-eval", str(maps), "--annotations", ann],
    ]
    for argv in steps:
        assert main([*argv, "--quiet"] if argv[0] == "extract" else argv) == 0, argv[0]
    store = open_store(data)
    assert store.synthetic and set(store.slides) == {"learn_a", "learn_b", "learn_c"}
    doc = json.loads((maps / "slide-eval.json").read_text())
    assert doc["froc"]["n_slides"] == 2 and doc["slide_auc"]["n_tumour"] == 1
    assert 0.0 <= doc["froc"]["score"] <= 1.0
    assert "SYNTHETIC" in capsys.readouterr().out


def test_tissue_up_to_the_edges_gives_each_window_once(tmp_path):
    slide = tmp_path / "full.tif"
    write_synthetic_slide(slide, 640, 480, [(320.0, 240.0, 600.0, 600.0)], [], seed=4)
    opts = ExtractOptions(per_slide=10_000, positive_fraction=0.0)
    extract_patches([slide], None, tmp_path / "data", opts, progress=False)
    store = open_store(tmp_path / "data")
    assert len(set(store.ids)) == len(store) == (640 // 32) * (480 // 32) - 2 * 15 - 2 * 20 + 4
    assert store.coords.min() == 0 and (store.coords.max(0) == [640 - 96, 480 - 96]).all()


def test_hard_negatives_take_slide_maps_and_say_how_to_make_them_from_a_run(tmp_path):
    from histodetect.errors import HistodetectError

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text("{}")
    with pytest.raises(HistodetectError, match="is a run folder; map the slides with it first"):
        ExtractOptions(hard_negatives=str(run))
    with pytest.raises(HistodetectError, match="no such folder of slide maps"):
        ExtractOptions(hard_negatives=str(tmp_path / "missing"))
