"""Whole-slide maps: readers, levels, tissue, dense == patch-wise, regions, outputs, resume."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from histodetect.config import RunConfig, merge, to_dict
from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor
from histodetect.slides.maps import mapping as slide_module
from histodetect.slides.maps.batch import list_slides, run_slides, shard
from histodetect.slides.maps.mapping import RegionMap, analyse, map_image, overlay_png
from histodetect.slides.synthetic.slide import render_region, truth_cells, write_synthetic_slide
from histodetect.slides.wsi.readers import _TiffReader, open_slide
from histodetect.slides.wsi.resolution import choose_resolution
from histodetect.training.module import PatchModule
from histodetect.training.run_folder import export_model
from tests.slides.conftest import TISSUE, TUMOURS, export_run

SHARED_SLIDES = Path(__file__).resolve().parents[3].parent / "shared" / "slides"

# Level 0 at 0.486 µm/px (20x-like); level 1 is exactly PCam's 0.972 µm/px.
SLIDE_W, SLIDE_H, SLIDE_MPP = 1536, 1152, 0.486


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    return export_run(tmp_path_factory.mktemp("runs") / "cnn", "smallcnn", spread=False)


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    """A small SYNTHETIC 3-level pyramidal TIFF with one planted tumour region."""
    path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
    write_synthetic_slide(
        path, SLIDE_W, SLIDE_H, TISSUE, TUMOURS, mpp=SLIDE_MPP, downsamples=(1, 2, 8)
    )
    return path


@pytest.fixture(scope="module")
def fcn(fcn_run) -> Predictor:
    return Predictor.from_run(fcn_run, "cpu")


def _shared(name: str) -> Path:
    path = SHARED_SLIDES / name
    if not path.exists():
        pytest.skip(f"real slide fixtures not found at {SHARED_SLIDES} (only present in CI/dev)")
    return path


# ----------------------------------------------------------------------------- reading


def test_synthetic_slide_opens_in_openslide_and_tifffile_with_the_same_pixels(slide_file):
    slide = open_slide(slide_file)
    tiff = _TiffReader(slide_file)
    assert slide.backend == "openslide" and slide.synthetic and tiff.synthetic
    assert slide.dims == tiff.dims == [(1536, 1152), (768, 576), (192, 144)]
    assert slide.downsamples == tiff.downsamples == [1.0, 2.0, 8.0]
    assert slide.mpp == pytest.approx(SLIDE_MPP) and tiff.mpp == pytest.approx(SLIDE_MPP)
    for level, (x, y, w, h) in [(0, (300, 200, 300, 257)), (1, (700, 500, 120, 130))]:
        a, b = slide.read(level, x, y, w, h), tiff.read(level, x, y, w, h)
        assert a.shape == (h, w, 3) and np.array_equal(a, b)
    # Beyond the slide edge is white glass.
    edge = tiff.read(1, 700, 500, 120, 130)
    assert (edge[76:, :] == 255).all() and (edge[:, 68:] == 255).all()
    assert not (edge[:70, :60] == 255).all()


def test_level_choice_follows_the_slide_resolution(slide_file):
    res = choose_resolution(open_slide(slide_file))
    assert (res.level, res.factor, res.size) == (1, 1.0, (768, 576))
    assert res.mpp == pytest.approx(0.972)
    # A 0.25 µm/px claim: no level is near 0.972, so level 1 (0.5) is resampled by ~1.94.
    res = choose_resolution(open_slide(slide_file, slide_mpp=0.25))
    assert res.level == 1 and res.factor == pytest.approx(0.972 / 0.5)
    assert res.size == (int(768 / res.factor), int(576 / res.factor))
    assert choose_resolution(open_slide(slide_file), level=2).size == (192, 144)
    with pytest.raises(HistodetectError, match="levels 0 to 2"):
        choose_resolution(open_slide(slide_file), level=5)


def test_resolution_unknown_or_implausible_analyses_level_0(tmp_path):
    image = np.full((200, 300, 3), 240, np.uint8)
    Image.fromarray(image).save(tmp_path / "region.png", dpi=(72, 72))  # 352.8 µm/px: ignored
    reader = open_slide(tmp_path / "region.png")
    assert reader.backend == "pillow" and reader.mpp is None
    res = choose_resolution(reader)
    assert res.level == 0 and res.factor == 1.0 and "unknown" in res.note


# ----------------------------------------------------------------------------- mapping


def test_background_is_never_sent_to_the_model(fcn, slide_file, monkeypatch):
    sent = []
    original = fcn.predict_proba

    def spy(images, tta=1, batch_size=256):
        sent.append(np.asarray(images))
        return original(images, tta, batch_size)

    monkeypatch.setattr(fcn, "predict_proba", spy)
    reader = open_slide(slide_file)
    analysis = analyse(fcn, reader, choose_resolution(reader), mode="patch", progress=False)
    rm = analysis.region_map
    patches = np.concatenate(sent)
    assert len(patches) == rm.tissue.sum() == analysis.stats.patches
    assert analysis.stats.tiles_skipped == 0 or analysis.stats.tiles >= 1
    # Working level is 2x level 0: cells of 32 px there are 64 level-0 px. A cell is mapped
    # when its 96 px window holds tissue: the window reaches 48 px (96 level-0 px) from the
    # cell's centre, 68 px along a diagonal, plus one thumbnail pixel (8 px) of rounding.
    inside = truth_cells([(x, y, rx - 64, ry - 64) for x, y, rx, ry in TISSUE], rm.prob.shape, 64)
    reach = 2 * (68 + 8)
    outside = ~truth_cells(
        [(x, y, rx + reach, ry + reach) for x, y, rx, ry in TISSUE], rm.prob.shape, 64
    )
    assert rm.tissue[inside].mean() > 0.85  # synthetic tissue has glass-white fat vacuoles
    assert not rm.tissue[outside].any() and outside.sum() > 50
    assert (rm.prob[~rm.tissue] == 0).all()
    # Every patch sent has stained tissue in its 96 px window (what the model sees; glass is
    # ~(243, 241, 246)): the tissue test is per window, not per centre box.
    windows = patches.reshape(len(patches), -1, 3).astype(int)
    assert ((windows.max(-1) - windows.min(-1)) > 25).mean(axis=1).min() > 0.005


def test_tiles_without_tissue_are_not_read(fcn, tmp_path, monkeypatch):
    # Tissue in the top-left corner only of a 3x2-tile slide (tiles of 32 cells = 1024 px).
    path = tmp_path / "corner.tif"
    write_synthetic_slide(path, 3000, 2000, [(300, 300, 250, 250)], [], downsamples=(1, 4))
    reader = open_slide(path)
    reads = []
    real = slide_module.working_reader

    def counting(*args):
        read = real(*args)

        def counted(x, y, w, h):
            reads.append((x, y, w, h))
            return read(x, y, w, h)

        return counted

    monkeypatch.setattr(slide_module, "working_reader", counting)
    analysis = analyse(fcn, reader, choose_resolution(reader), mode="dense", progress=False)
    assert analysis.stats.tiles == 1 and analysis.stats.tiles_skipped == 5
    assert reads == [(-32, -32, 31 * 32 + 96, 31 * 32 + 96)]  # 32x32 cells with context


@pytest.mark.parametrize("tta", [1, 2, 8])
def test_dense_mode_equals_patch_wise_mode(fcn, slide_file, tta):
    reader = open_slide(slide_file)
    res = choose_resolution(reader)
    kw = {"tta": tta, "progress": False, "tile_cells": 12}  # several tiles, ragged edges
    patch = analyse(fcn, reader, res, mode="patch", **kw).region_map
    dense = analyse(fcn, reader, res, mode="dense", **kw).region_map
    assert patch.mode == "patch" and dense.mode == "dense"
    assert np.array_equal(patch.tissue, dense.tissue)
    values = patch.prob[patch.tissue]
    assert values.std() > 0.05  # a map that varies, so a misplaced cell would show
    assert np.abs(patch.prob - dense.prob).max() < 1e-4


def test_dense_needs_a_padding_free_model(cnn_run, fcn, slide_file):
    cnn = Predictor.from_run(cnn_run, "cpu")
    image = render_region(0, 0, 200, 160, 1, TISSUE, TUMOURS)
    with pytest.raises(HistodetectError, match=r"zero padding.*densecnn"):
        map_image(cnn, image, mode="dense")
    assert map_image(cnn, image).mode == "patch"  # auto falls back
    with pytest.raises(HistodetectError, match="multiple of 32"):
        map_image(fcn, image, stride=48, mode="dense")
    assert map_image(fcn, image, stride=48).mode == "patch"
    assert map_image(fcn, image, stride=64).mode == "dense"


def test_map_image_interface_and_overlay(fcn):
    image = render_region(400, 400, 400, 300, 1, TISSUE, TUMOURS)  # all inside the tissue
    image[:, 330:] = 245  # glass on the right
    rm = map_image(fcn, image, threshold=0.0, mpp=0.972)
    assert isinstance(rm, RegionMap) and rm.stride == 32
    assert rm.prob.shape == rm.tissue.shape == (10, 13) and rm.prob.dtype == np.float32
    # Glass from x = 330: cell 11's window [320, 416) still holds tissue, cell 12's does not.
    assert rm.tissue[:, :9].mean() > 0.85 and not rm.tissue[:, 12:].any()
    assert rm.regions and {"id", "area_px", "area_mm2", "max_prob", "mean_prob", "polygon"} <= set(
        rm.regions[0]
    )
    rr, cc = np.nonzero(rm.tissue)  # cells clipped to the 400x300 image at its edges
    clipped = (np.minimum(32, 400 - cc * 32) * np.minimum(32, 300 - rr * 32)).sum()
    assert sum(r["area_px"] for r in rm.regions) == pytest.approx(clipped)
    for r in rm.regions:
        pts = np.asarray(r["polygon"])
        assert (pts >= 0).all() and (pts[:, 0] <= 400).all() and (pts[:, 1] <= 300).all()
        assert r["polygon"][0] == r["polygon"][-1]
        assert r["area_mm2"] == pytest.approx(r["area_px"] * 0.972**2 / 1e6)
    assert map_image(fcn, image).regions is not None
    assert map_image(fcn, image, mpp=None, threshold=0.0).regions[0]["area_mm2"] is None
    png = overlay_png(image, rm)
    import io

    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == (400, 300)
    with pytest.raises(HistodetectError, match="smaller than one 96x96"):
        map_image(fcn, image[:90])
    with pytest.raises(HistodetectError, match="uint8 RGB"):
        map_image(fcn, image.astype(np.float32))


# ----------------------------------------------------------------------------- outputs


def test_slide_command_writes_every_output(fcn_run, fcn, slide_file, tmp_path, capsys):
    from histodetect.cli.main import main

    out = tmp_path / "maps"
    reader = open_slide(slide_file)
    probe = analyse(fcn, reader, choose_resolution(reader), progress=False).region_map
    threshold = float(np.quantile(probe.prob[probe.tissue], 0.7))
    args = ["slide", str(fcn_run), str(slide_file), "--out", str(out), "--quiet"]
    assert main([*args, "--threshold", f"{threshold}"]) == 0
    said = capsys.readouterr().out
    assert "SYNTHETIC" in said and "1 slide(s) mapped" in said
    folder = out / "synthetic"
    summary = json.loads((folder / "summary.json").read_text())
    prob = np.load(folder / "prob.npy")
    assert prob.shape == (18, 24) and np.allclose(prob, probe.prob, atol=1e-6)
    png = Image.open(folder / "prob.png")
    assert png.mode.startswith("I") and np.array_equal(
        np.asarray(png), np.round(prob * 65535).astype(np.uint16)
    )
    # prob.tif: the same map, tiled, 0-255, its pixel size the cell size (32 px x 0.972 µm).
    with tifffile.TiffFile(folder / "prob.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.dtype == np.uint8
        assert np.array_equal(page.asarray(), np.round(prob * 255).astype(np.uint8))
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        for tag in ("XResolution", "YResolution"):
            num, den = page.tags[tag].value
            assert 1e4 * den / num == pytest.approx(32 * 0.972, rel=1e-6)  # µm per pixel
    assert Image.open(folder / "overlay.png").size[0] == 768  # the analysed level, < 2048 px
    assert summary["level"] == 1 and summary["analysed_mpp"] == pytest.approx(0.972)
    assert summary["synthetic"] and summary["mode"] == "dense"
    assert summary["score"] == pytest.approx(float(prob.max()))
    assert summary["tissue_cells"] == int((np.asarray(Image.open(folder / "tissue.png")) > 0).sum())

    geo = json.loads((folder / "regions.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == summary["n_regions"] > 0
    for feature in geo["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        for ring in feature["geometry"]["coordinates"]:
            pts = np.asarray(ring)
            assert ring[0] == ring[-1] and len(ring) >= 5
            # Level-0 pixels: inside the 1536x1152 slide, not the 768x576 analysed level.
            assert (pts >= 0).all() and (pts[:, 0] <= SLIDE_W).all()
            assert (pts[:, 1] <= SLIDE_H).all()
    assert max(max(p[0] for p in f["geometry"]["coordinates"][0]) for f in geo["features"]) > 768
    with open(folder / "regions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["n_regions"]
    biggest = max(rows, key=lambda r: float(r["area_mm2"]))
    largest = summary["largest_region"]["area_mm2"]
    assert float(biggest["area_mm2"]) == pytest.approx(largest, rel=1e-4, abs=1e-6)
    assert float(rows[0]["max_prob"]) == pytest.approx(summary["score"], abs=1e-4)
    cells = sum(float(r["area_px"]) for r in rows) / 64**2  # level-0 px per cell
    assert cells <= (probe.tissue & (probe.prob >= threshold)).sum() + 1e-6


def test_manifest_shards_slides_and_skips_finished_ones(fcn_run, tmp_path):
    slides = []
    for i in range(3):
        path = tmp_path / f"s{i}.tif"
        write_synthetic_slide(path, 400 + 40 * i, 300, [(200, 150, 150, 100)], [], seed=i)
        slides.append(path)
    (tmp_path / "list.txt").write_text("# slides\ns0.tif\ns1.tif\n\n")
    assert list_slides([slides[2], slides[0]], tmp_path / "list.txt") == [
        slides[2],
        slides[0],
        slides[1],
    ]
    shares = [shard(slides, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(slides) and not set(shares[0]) & set(shares[1])

    out = tmp_path / "out"
    first = [run_slides(fcn_run, slides, out, rank=r, world=2, progress=False) for r in (0, 1)]
    assert sorted(len(r.done) for r in first) == [1, 2]
    assert {f.name for f in out.glob("manifest-rank*.jsonl")} == {
        "manifest-rank0.jsonl",
        "manifest-rank1.jsonl",
    }
    # A rerun, even split differently, redoes nothing.
    again = run_slides(fcn_run, slides, out, rank=0, world=1, progress=False)
    assert len(again.skipped) == 3 and not again.done
    # A changed slide, a deleted output and --redo bring work back.
    os.utime(slides[1], ns=(1, 1))
    (out / "s2" / "summary.json").unlink()
    again = run_slides(fcn_run, slides, out, rank=0, world=1, progress=False)
    assert sorted(Path(s["slide"]).name for s in again.done) == ["s1.tif", "s2.tif"]
    assert len(run_slides(fcn_run, slides, out, redo=True, progress=False).done) == 3


def test_one_bad_slide_does_not_stop_the_rest_and_is_retried(fcn_run, tmp_path, monkeypatch):
    good = tmp_path / "good.tif"
    write_synthetic_slide(good, 400, 300, [(200, 150, 150, 100)], [])
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide at all\n" * 50)
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    result = run_slides(fcn_run, [bad, good], out, progress=False)
    assert [Path(s["slide"]).name for s in result.done] == ["good.tif"]
    assert len(result.failed) == 1 and "bad.svs" in result.failed[0][1]
    lines = [json.loads(x) for x in (out / "manifest-rank0.jsonl").read_text().splitlines()]
    assert {x["status"] for x in lines} == {"done", "failed"}
    again = run_slides(fcn_run, [bad, good], out, progress=False)
    assert again.skipped == [good] and len(again.failed) == 1  # failures are retried


# ----------------------------------------------------------------------------- errors


def test_unreadable_files_give_a_clear_error_naming_the_file(fcn_run, tmp_path, capsys):
    from histodetect.cli.main import main

    cases = {
        "random.svs": b"\x13\x37 random bytes, not a slide" * 40,
        "truncated.tif": b"II*\x00\x08\x00\x00\x00\x0f\x00",
        "empty.png": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(HistodetectError, match=f"{name}: cannot open"):
            open_slide(tmp_path / name)
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(tmp_path / "tiny.png")
    for name, why in [("random.svs", "cannot open"), ("tiny.png", "smaller than one 96x96")]:
        code = main(["slide", str(fcn_run), str(tmp_path / name), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and name in err and why in err and "Traceback" not in err
    with pytest.raises(HistodetectError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_real_slide_fixtures(fcn_run, tmp_path, capsys):
    from histodetect.cli.main import main

    cmu = _shared("CMU-1-Small-Region.svs")
    out = tmp_path / "real"
    assert main(["slide", str(fcn_run), str(cmu), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "CMU-1-Small-Region" / "summary.json").read_text())
    assert summary["backend"] == "openslide" and summary["vendor"] == "aperio"
    assert summary["resample_factor"] == pytest.approx(0.972 / 0.499)  # one level at 0.499
    cells = summary["grid"][0] * summary["grid"][1]
    assert 0.15 < summary["tissue_cells"] / cells < 0.85  # tissue found, glass left out
    for name in ("prob.npy", "prob.png", "overlay.png", "regions.geojson", "regions.csv"):
        assert (out / "CMU-1-Small-Region" / name).stat().st_size > 0

    assert main(["slide", str(fcn_run), str(_shared("boxes-pyramid.tiff")), "--out", str(out)]) == 0
    boxes = json.loads((out / "boxes-pyramid" / "summary.json").read_text())
    assert boxes["tissue_cells"] == 0 and boxes["n_regions"] == 0 and boxes["level0_mpp"] is None
    # The file records no resolution: level 0 was analysed as if at the model's 0.972 µm/px.
    assert boxes["level0_mpp_assumed"] == pytest.approx(0.972)
    assert "level0_mpp_assumed" not in summary  # CMU-1 records its own
    capsys.readouterr()

    expected = {
        "aperio-16px.svs": "smaller than one 96x96 patch",
        "unreadable.svs": "Bogus marker length",
        "unopenable.tiff": "cannot open",
        "not-a-tiff.svs": "cannot open",
    }
    for name, why in expected.items():
        code = main(["slide", str(fcn_run), str(_shared(name)), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"{name}: " in err and why in err and "Traceback" not in err


def test_smallfcn_is_a_listed_model():
    from histodetect.models.classifier import RECOMMENDED, build_model

    assert "smallfcn" in RECOMMENDED
    model = build_model("smallfcn").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2,)
    with pytest.raises(HistodetectError, match="at least 94 px"):
        model(torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------------- a trained model


# smallfcn after 200 steps on SYNTHETIC patches (train_planted_fcn), kept so that tests load it
# in a second instead of training for half a minute; delete the file to train it again.
PLANTED_FCN = Path(__file__).with_name("planted_smallfcn.safetensors")


def train_planted_fcn(module: PatchModule, cfg: RunConfig) -> None:
    """Train ``module`` briefly on SYNTHETIC patches (label 1 = tumour in the centre box)."""
    from histodetect.data.synth import render_patch
    from histodetect.data.transforms import dihedral, to_model_input

    rng = np.random.default_rng(1)
    labels = np.arange(400) % 2
    images = np.stack(
        [render_patch(rng, int(y), decoy=i % 4 == 0)[0] for i, y in enumerate(labels)]
    )
    torch.manual_seed(0)
    model = module.model.train()
    x = to_model_input(torch.from_numpy(images), cfg.data.mean, cfg.data.std)
    y = torch.from_numpy(labels).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):  # 100 steps left it marginal with newer libraries (0.69 of 0.8)
        idx = torch.from_numpy(rng.choice(len(x), 32, replace=False))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(dihedral(x[idx], int(rng.integers(8)))), y[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained_fcn(tmp_path_factory) -> Path:
    """The run of a smallfcn trained to find SYNTHETIC tumour (saved, or trained when absent)."""
    from safetensors.torch import load_file, save_file

    cfg = merge(RunConfig(), {"model": {"arch": "smallfcn"}})
    module = PatchModule(to_dict(cfg))
    if PLANTED_FCN.exists():
        state = {k: v.float() for k, v in load_file(PLANTED_FCN).items()}
        module.model.load_state_dict(state)
    else:
        train_planted_fcn(module, cfg)
        weights = {k: v.half().contiguous() for k, v in module.model.state_dict().items()}
        save_file(weights, PLANTED_FCN)
    run = tmp_path_factory.mktemp("runs") / "trained"
    run.mkdir()
    export_model(module.eval(), run, {"synthetic": True})
    return run


@pytest.mark.slow
def test_the_planted_tumour_is_the_hot_region(trained_fcn, tmp_path):
    path = tmp_path / "planted.tif"
    tumour = (420.0, 400.0, 170.0, 140.0)
    write_synthetic_slide(
        path, 1280, 960, [(560.0, 480.0, 520.0, 420.0)], [tumour], downsamples=(1, 4)
    )
    out = tmp_path / "out"
    result = run_slides(trained_fcn, [path], out, progress=False)
    summary = result.done[0]
    rm = np.load(out / "planted" / "prob.npy")
    tissue = np.asarray(Image.open(out / "planted" / "tissue.png")) > 0
    planted = truth_cells([tumour], rm.shape, 32) & tissue
    near = truth_cells([(*tumour[:2], tumour[2] + 64, tumour[3] + 64)], rm.shape, 32)
    hot = tissue & (rm >= 0.5)
    assert hot[planted].mean() > 0.8
    assert rm[planted].mean() > 0.6 and rm[tissue & ~near].mean() < 0.25
    # The largest region is the planted tumour. (A briefly trained model also flags some
    # seams between the synthetic texture tiles: small, thin regions elsewhere.)
    geo = json.loads((out / "planted" / "regions.geojson").read_text())
    areas = [f["properties"]["measurements"]["area_px"] for f in geo["features"]]
    biggest = geo["features"][int(np.argmax(areas))]["geometry"]["coordinates"][0]
    cx, cy = np.asarray(biggest)[:-1].mean(0)
    assert ((cx - tumour[0]) / tumour[2]) ** 2 + ((cy - tumour[1]) / tumour[3]) ** 2 < 0.25
    assert max(areas) > 0.8 * planted.sum() * 32**2 > 2 * sorted(areas)[-2]
    assert summary["score"] > 0.9
    # The planted ellipse is 330 µm across; cells whose 32 px centre box only touches it are
    # positive too, and attached seam cells can lengthen the region a little.
    assert 0.25 < summary["largest_region"]["longest_diameter_mm"] < 0.6


def test_a_slide_unlike_the_training_data_is_flagged_out_of_scope(cnn_run, slide_file, tmp_path):
    import csv
    import shutil

    from histodetect.cli.main import main
    from histodetect.inference.scope import fit_scope, save_scope

    run = tmp_path / "run"
    shutil.copytree(cnn_run, run)
    args = ["slide", str(run), str(slide_file), "--out", str(tmp_path / "a"), "--quiet"]
    assert main([*args, "--mode", "patch", "--threshold", "0"]) == 0
    summary = json.loads((tmp_path / "a" / "synthetic" / "summary.json").read_text())
    assert "unavailable" in summary["out_of_scope"]  # a run without statistics still maps
    # Statistics of flat-coloured patches: every tissue cell of the slide is unlike them.
    rng = np.random.default_rng(0)
    flat = np.repeat(rng.integers(0, 256, (64, 1, 1, 3), dtype=np.uint8), 96, 1).repeat(96, 2)
    flat = np.clip(flat + rng.integers(-2, 3, flat.shape), 0, 255).astype(np.uint8)
    predictor = Predictor.from_run(run, "cpu")
    save_scope(run, fit_scope(predictor, flat[:48], np.arange(48) % 2, flat[48:]))
    args[4] = str(tmp_path / "b")
    assert main([*args, "--mode", "patch", "--threshold", "0"]) == 0
    folder = tmp_path / "b" / "synthetic"
    summary = json.loads((folder / "summary.json").read_text())
    scope = summary["out_of_scope"]
    assert scope["cells"] == summary["tissue_cells"] and scope["share"] > 0.5
    assert scope["mostly_out_of_scope"] and "OUT OF SCOPE" in summary["warning"]
    with open(folder / "regions.csv", newline="") as fh:
        shares = [float(r["out_of_scope_share"]) for r in csv.DictReader(fh)]
    assert shares and min(shares) >= 0.5
    geo = json.loads((folder / "regions.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in geo["features"]}
    assert names == {"Tumor (out of scope)"}  # no region is called tumour without the flag
