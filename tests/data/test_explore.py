"""Tests for `histodetect explore`: the files users read and the numbers they copy from them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histodetect.data.explore import explore, stratified_sample
from histodetect.data.explore_render import FIGURES
from histodetect.data.pack import pack

OUTPUTS = (*FIGURES, "colour_stats.csv", "summary.json", "summary.md", "summary.html")


def read_labels(root: Path) -> dict[str, int]:
    with open(root / "train_labels.csv", newline="") as fh:
        return {row["id"]: int(row["label"]) for row in csv.DictReader(fh)}


def read_images(root: Path) -> dict[str, np.ndarray]:
    return {pid: tifffile.imread(root / "train" / f"{pid}.tif") for pid in read_labels(root)}


def add_copy(root: Path, pid: str, new_id: str) -> None:
    """Copy patch ``pid`` to a new id, with its csv row, as a duplicate would appear."""
    shutil.copy(root / "train" / f"{pid}.tif", root / "train" / f"{new_id}.tif")
    with open(root / "train_labels.csv", "a", newline="") as fh:
        csv.writer(fh).writerow([new_id, read_labels(root)[pid]])


def test_writes_every_output_file(kaggle_dir, tmp_path):
    out = tmp_path / "nested" / "explore"  # missing parents are created
    explore(kaggle_dir(n=20), out)
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name not in OUTPUTS]  # no temp files left


def test_figures_are_valid_pngs_of_readable_size(kaggle_dir, tmp_path):
    explore(kaggle_dir(n=20), tmp_path / "out")
    for name in FIGURES:
        with Image.open(tmp_path / "out" / name) as img:
            img.verify()
        with Image.open(tmp_path / "out" / name) as img:
            assert img.format == "PNG"
            assert 400 <= img.width <= 4000 and 250 <= img.height <= 4000, (name, img.size)


def test_counts_match_the_csv(kaggle_dir, tmp_path):
    root = kaggle_dir(n=30)
    summary = explore(root, tmp_path / "out")
    labels = list(read_labels(root).values())
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))  # the returned dict is what was written
    assert summary["patches"] == 30
    assert summary["label_counts"] == {"0": labels.count(0), "1": labels.count(1)}
    per_split = summary["counts"]
    assert sum(n for split in per_split.values() for n in split.values()) == 30
    assert summary["positive_fraction"] == pytest.approx(labels.count(1) / 30)
    assert summary["image_checks"] == {
        **summary["image_checks"],
        "checked": 30,
        "ok": 30,
        "problems": 0,
    }
    assert summary["synthetic"] is False
    assert summary["source"] == {"kind": "kaggle", "path": str(root.resolve())}


def test_unlabelled_test_patches_are_counted_as_unlabelled(kaggle_dir, tmp_path):
    summary = explore(kaggle_dir(n=10, n_test=4), tmp_path / "out")
    assert summary["counts"]["test"] == {"unlabelled": 4}
    assert summary["label_counts"]["unlabelled"] == 4
    assert summary["positive_fraction"] == pytest.approx(0.5)  # over labelled patches only
    assert "unlabelled" in summary["colour_stats"]["classes"]


def test_exact_duplicate_is_found(kaggle_dir, tmp_path):
    root = kaggle_dir(n=20)
    original = next(iter(read_labels(root)))
    add_copy(root, original, "copy" + "0" * 36)
    dup = explore(root, tmp_path / "out")["duplicates"]
    assert dup["groups"] == 1 and dup["images_in_groups"] == 2
    assert sorted(dup["examples"][0]["ids"]) == sorted([original, "copy" + "0" * 36])
    assert dup["groups_with_conflicting_labels"] == 0


def test_no_duplicates_reported_in_distinct_patches(kaggle_dir, tmp_path):
    assert explore(kaggle_dir(n=20), tmp_path / "out")["duplicates"]["groups"] == 0


def test_synthetic_data_is_flagged_everywhere(kaggle_dir, tmp_path):
    root = kaggle_dir(n=12)
    (root / "SYNTHETIC.md").write_text("generated patches\n")
    summary = explore(root, tmp_path / "out")
    assert summary["synthetic"] is True
    assert "SYNTHETIC DATA" in (tmp_path / "out" / "summary.md").read_text()
    assert "SYNTHETIC DATA" in (tmp_path / "out" / "summary.html").read_text()


def test_real_data_is_not_flagged_synthetic(kaggle_dir, tmp_path):
    explore(kaggle_dir(n=12), tmp_path / "out")
    assert "SYNTHETIC" not in (tmp_path / "out" / "summary.md").read_text()


def test_colour_stats_equal_direct_numpy(kaggle_dir, tmp_path):
    root = kaggle_dir(n=24)
    summary = explore(root, tmp_path / "out")
    labels, images = read_labels(root), read_images(root)
    stats = summary["colour_stats"]
    groups = {
        "0": np.stack([images[p] for p, lab in labels.items() if lab == 0]),
        "1": np.stack([images[p] for p, lab in labels.items() if lab == 1]),
        "overall": np.stack(list(images.values())),
    }
    with open(tmp_path / "out" / "colour_stats.csv", newline="") as fh:
        rows = {(r["class"], r["channel"]): r for r in csv.DictReader(fh)}
    for cls, stack in groups.items():
        entry = stats["overall"] if cls == "overall" else stats["classes"][cls]
        assert entry["images"] == len(stack)
        pixels = stack.reshape(-1, 3).astype(np.float64)
        per_image = stack.reshape(len(stack), -1, 3).mean(axis=1)
        for c, ch in enumerate("RGB"):
            got = entry["channels"][ch]
            assert got["mean"] == pytest.approx(pixels[:, c].mean(), rel=1e-9)
            assert got["std"] == pytest.approx(pixels[:, c].std(), rel=1e-9)
            assert got["mean_of_image_means"] == pytest.approx(per_image[:, c].mean(), rel=1e-9)
            assert got["std_of_image_means"] == pytest.approx(per_image[:, c].std(), rel=1e-6)
            assert got["mean_0_1"] == pytest.approx(pixels[:, c].mean() / 255, rel=1e-9)
            assert float(rows[(cls, ch)]["mean"]) == pytest.approx(got["mean"], abs=1e-4)
            assert float(rows[(cls, ch)]["std"]) == pytest.approx(got["std"], abs=1e-4)
    overall = groups["overall"].reshape(-1, 3) / 255
    norm = stats["normalisation_0_1"]
    assert norm["mean"] == pytest.approx(overall.mean(axis=0).tolist(), abs=1e-4)
    assert norm["std"] == pytest.approx(overall.std(axis=0).tolist(), abs=1e-4)


def test_bad_patch_is_reported_not_fatal(kaggle_dir, tmp_path):
    root = kaggle_dir(n=20)
    victim = next(iter(read_labels(root)))
    (root / "train" / f"{victim}.tif").write_bytes(b"not a tiff at all")
    summary = explore(root, tmp_path / "out")
    checks = summary["image_checks"]
    assert (checks["checked"], checks["ok"], checks["problems"]) == (20, 19, 1)
    assert victim in checks["problem_examples"][0]["where"]
    # The zero-filled placeholder must not leak into the statistics.
    assert summary["colour_stats"]["overall"]["images"] == 19
    assert summary["colour_stats"]["overall"]["channels"]["R"]["mean"] > 100


def test_folder_problems_are_reported_not_fatal(kaggle_dir, tmp_path):
    root = kaggle_dir(n=20)
    (root / "train" / f"{next(iter(read_labels(root)))}.tif").unlink()
    summary = explore(root, tmp_path / "out")
    assert summary["patches"] == 19
    assert summary["source_problems"]["count"] == 1
    assert "no file" in summary["source_problems"]["examples"][0]["why"]


def test_packed_store_gives_same_numbers(kaggle_dir, tmp_path):
    root = kaggle_dir(n=20)
    pack(root, tmp_path / "store", workers=1, progress=False)
    direct = explore(root, tmp_path / "out_kaggle")
    packed = explore(tmp_path / "store", tmp_path / "out_store")
    assert packed["source"]["kind"] == "store"
    assert packed["counts"] == direct["counts"]
    assert packed["colour_stats"] == direct["colour_stats"]
    for name in OUTPUTS:
        assert (tmp_path / "out_store" / name).exists()


def test_pcam_h5_folder(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(12, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1] * 6, np.uint8).reshape(-1, 1, 1, 1)  # PCam's own label shape
    root = tmp_path / "pcam"
    root.mkdir()
    with h5py.File(root / "camelyonpatch_level_2_split_valid_x.h5", "w") as fh:
        fh["x"] = x
    with h5py.File(root / "camelyonpatch_level_2_split_valid_y.h5", "w") as fh:
        fh["y"] = y
    summary = explore(root, tmp_path / "out")
    assert summary["source"]["kind"] == "pcam"
    assert summary["counts"] == {"valid": {"0": 6, "1": 6}}
    assert summary["colour_stats"]["overall"]["channels"]["G"]["mean"] == pytest.approx(
        x[..., 1].mean(), rel=1e-9
    )


def test_sample_is_capped_stratified_and_seeded(kaggle_dir, tmp_path):
    root = kaggle_dir(n=40)
    a = explore(root, tmp_path / "a", max_images=10, seed=3)
    b = explore(root, tmp_path / "b", max_images=10, seed=3)
    assert a["sample"]["images"] == 10 and a["image_checks"]["checked"] == 10
    assert a["sample"]["per_class"] == {"0": 5, "1": 5}  # the 50/50 balance is kept
    assert a["colour_stats"] == b["colour_stats"]


def test_stratified_sample_keeps_class_shares():
    labels = np.array([0] * 700 + [1] * 300, np.int8)
    picked = stratified_sample(labels, 100, seed=0)
    assert len(picked) == len(set(picked.tolist())) == 100
    assert np.bincount(labels[picked]).tolist() == [70, 30]
    assert stratified_sample(labels, 5000, seed=0).tolist() == list(range(1000))


def test_html_is_self_contained(kaggle_dir, tmp_path):
    explore(kaggle_dir(n=12), tmp_path / "out")
    page = (tmp_path / "out" / "summary.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert '.png"' not in page  # no link to a file beside the page


def test_real_sample(shared_sample, tmp_path):
    summary = explore(shared_sample, tmp_path / "out")
    assert summary["patches"] == 6259
    assert summary["positive_fraction"] == pytest.approx(0.407, abs=0.001)
    assert summary["image_checks"]["ok"] == 6259
    assert summary["synthetic"] is False
    assert summary["seconds"] < 30
