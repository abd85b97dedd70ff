"""Every data source kind reads the same patches, labels and splits; bad input is named."""

from __future__ import annotations

import csv
import gzip
import shutil

import h5py
import numpy as np
import pytest
import tifffile

from histodetect.data.patchio import PatchDecodeError, decode_patch
from histodetect.data.source import split_indices
from histodetect.data.sources import detect_kind, open_source
from histodetect.errors import BadInputError, HistodetectError, HistodetectWarning
from tests.conftest import fake_patches


def write_pcam(root, splits=("train", "valid", "test"), n=20, gz=False, meta=False):
    """Write PCam-style HDF5 files; returns {split: (x, y)}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, split in enumerate(splits):
        x, y = fake_patches(n, seed=k)
        for part, arr in (("x", x), ("y", y.reshape(-1, 1, 1, 1))):
            path = root / f"camelyonpatch_level_2_split_{split}_{part}.h5"
            with h5py.File(path, "w") as fh:
                fh.create_dataset(part, data=arr)
            if gz:
                with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                path.unlink()
        if meta:
            with open(root / f"camelyonpatch_level_2_split_{split}_meta.csv", "w") as fh:
                w = csv.writer(fh)
                w.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
                w.writerows([i, 0, 0, False, False, f"slide_{i % 5}"] for i in range(n))
        out[split] = (x, y)
    return out


def test_kaggle_folder_reads_exact_pixels_and_labels(kaggle_dir):
    root = kaggle_dir(n=30)
    src = open_source(root)
    assert src.kind == "kaggle" and len(src) == 30
    for i in range(len(src)):
        assert np.array_equal(src.read_one(i), tifffile.imread(src.files[i]))
    with open(root / "train_labels.csv") as fh:
        truth = {r["id"]: int(r["label"]) for r in csv.DictReader(fh)}
    assert {pid: int(lab) for pid, lab in zip(src.ids, src.labels, strict=True)} == truth
    assert set(src.splits) == {"train", "valid"}


def test_kaggle_test_folder_follows_sample_submission_order(kaggle_dir):
    root = kaggle_dir(n=10, n_test=6)
    test_ids = sorted(p.stem for p in (root / "test").glob("*.tif"))[::-1]
    (root / "sample_submission.csv").write_text(
        "id,label\n" + "".join(f"{i},0\n" for i in test_ids)
    )
    src = open_source(root)
    mask = src.splits == "test"
    assert list(src.ids[mask]) == test_ids
    assert (src.labels[mask] == -1).all()


def test_split_is_reproducible_stratified_and_seeded():
    labels = np.array([0] * 600 + [1] * 400)
    a, b = split_indices(labels, seed=3), split_indices(labels, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, split_indices(labels, seed=4))
    valid = a == "valid"
    assert valid.sum() == 100 and labels[valid].mean() == pytest.approx(0.4)


def test_split_keeps_slides_on_one_side():
    labels = np.tile([0, 1], 200)
    groups = np.repeat([f"s{i}" for i in range(40)], 10)
    splits = split_indices(labels, groups, valid_fraction=0.2, seed=1)
    for g in np.unique(groups):
        assert len(set(splits[groups == g])) == 1
    assert 0.15 <= (splits == "valid").mean() <= 0.3


def _slides(tumour: int, normal: int, per_slide: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Labels and slide ids as `extract` makes them: tumour slides hold tumour and normal
    patches, normal slides normal patches only."""
    labels = [np.r_[np.ones(per_slide // 2), np.zeros(per_slide // 2)]] * tumour
    labels += [np.zeros(per_slide)] * normal
    groups = np.repeat([f"s{i}" for i in range(tumour + normal)], per_slide)
    return np.concatenate(labels).astype(np.int8), groups


def test_a_split_by_slide_puts_both_classes_in_validation_for_every_seed():
    labels, groups = _slides(tumour=6, normal=2)
    for seed in range(100):
        splits = split_indices(labels, groups, valid_fraction=0.1, seed=seed)
        for side in ("train", "valid"):
            assert set(labels[splits == side]) == {0, 1}, (seed, side)
        for g in np.unique(groups):
            assert len(set(splits[groups == g])) == 1
    # Slides of one class each: validation needs a slide of each.
    pure = np.repeat([1] * 6 + [0] * 2, 50).astype(np.int8)
    for seed in range(100):
        splits = split_indices(pure, groups, valid_fraction=0.1, seed=seed)
        assert set(pure[splits == "valid"]) == set(pure[splits == "train"]) == {0, 1}, seed


def test_a_split_by_slide_that_cannot_hold_both_classes_says_why():
    labels, groups = _slides(tumour=1, normal=3)
    with pytest.warns(HistodetectWarning, match=r"label 1 patches come from one slide only \(s0\)"):
        splits = split_indices(labels, groups, valid_fraction=0.1)
    assert set(labels[splits == "train"]) == {0, 1}  # training keeps the lone slide
    assert set(split_indices(labels, groups, valid_fraction=0)) == {"train"}


@pytest.mark.parametrize("gz", [False, True])
def test_pcam_h5_and_h5gz(tmp_path, gz, monkeypatch):
    monkeypatch.setenv("HISTODETECT_CACHE", str(tmp_path / "cache"))
    truth = write_pcam(tmp_path / "pcam", gz=gz)
    src = open_source(tmp_path / "pcam")
    assert src.kind == "pcam" and len(src) == 60
    for split, (x, y) in truth.items():
        idx = np.flatnonzero(src.splits == split)
        assert np.array_equal(src.read(idx), x)
        assert np.array_equal(src.labels[idx], y)


def test_pcam_without_valid_file_splits_train_by_slide(tmp_path):
    write_pcam(tmp_path / "pcam", splits=("train",), n=50, meta=True)
    src = open_source(tmp_path / "pcam", valid_fraction=0.2)
    assert src.slides is not None and (src.splits == "valid").any()
    for slide in np.unique(src.slides):
        assert len(set(src.splits[src.slides == slide])) == 1


def test_pcam_bad_label_is_named(tmp_path):
    write_pcam(tmp_path / "pcam", splits=("train",))
    path = tmp_path / "pcam" / "camelyonpatch_level_2_split_train_y.h5"
    with h5py.File(path, "r+") as fh:
        fh["y"][3] = 7
    with pytest.raises(BadInputError, match=r"split_train_y\.h5.*not 0 or 1"):
        open_source(tmp_path / "pcam")


def test_unknown_and_empty_folders_say_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistodetectError, match="is empty") as err:
        detect_kind(tmp_path / "empty")
    assert "train_labels.csv" in str(err.value) and ".h5" in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(HistodetectError, match=r"notes\.txt"):
        open_source(tmp_path / "other")
    with pytest.raises(HistodetectError, match="no such file"):
        open_source(tmp_path / "missing")


def test_csv_problems_are_all_listed(kaggle_dir):
    root = kaggle_dir(n=12)
    lines = (root / "train_labels.csv").read_text().splitlines()
    first_id = lines[1].split(",")[0]
    lines[2] = lines[2].split(",")[0] + ",2"  # bad label
    lines.append(lines[3])  # duplicate id
    lines.append("f" * 40 + ",1")  # id with no file
    (root / "train_labels.csv").write_text("\n".join(lines) + "\n")
    shutil.copy(root / "train" / f"{first_id}.tif", root / "train" / "orphan.tif")
    with pytest.raises(BadInputError) as err:
        open_source(root)
    text = str(err.value)
    assert "label '2' is not 0 or 1" in text
    assert "duplicate id" in text
    assert "f" * 40 + ".tif: listed in train_labels.csv, no file" in text
    assert "orphan.tif: file has no row in train_labels.csv" in text
    skipped = open_source(root, skip_bad=True)
    assert len(skipped.problems) == 4 and len(skipped) == 11  # the bad-label row is left out


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64, 3), np.uint8), "wrong size 64x64"),
        (np.zeros((96, 96), np.uint8), "not an RGB image"),
        (np.zeros((96, 96, 4), np.uint8), "4 channel"),
        (np.zeros((96, 96, 3), np.uint16), "uint16"),
    ],
)
def test_decode_rejects_wrong_shapes(tmp_path, image, message):
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, image)
    with pytest.raises(PatchDecodeError, match=message):
        decode_patch(path)


def test_decode_rejects_corrupt_and_truncated(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, fake_patches(1)[0][0], photometric="rgb")
    decode_patch(good)  # teaches the fast path this layout
    data = good.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all" * 10)
    for name in ("cut.tif", "junk.tif"):
        with pytest.raises(PatchDecodeError, match="corrupt or truncated"):
            decode_patch(tmp_path / name)


def test_fast_tiff_path_matches_tifffile_even_with_other_dates(tmp_path):
    images, _ = fake_patches(4, seed=9)
    for k, image in enumerate(images):
        tifffile.imwrite(
            tmp_path / f"{k}.tif", image, photometric="rgb", datetime=f"2020:01:0{k + 1} 10:00:00"
        )
    for k, image in enumerate(images):
        assert np.array_equal(decode_patch(tmp_path / f"{k}.tif"), image)


def _labels_csv(root, text: str, encoding: str = "utf-8") -> list[str]:
    """A 6-patch Kaggle folder whose train_labels.csv is ``text`` (ids as ``{id0}``...)."""
    from tests.conftest import write_kaggle

    ids, _, _ = write_kaggle(root, n=6)
    (root / "train_labels.csv").write_bytes(text.format(*ids).encode(encoding))
    return ids


def test_labels_csv_saved_by_excel_or_reordered_reads_by_column_name(tmp_path):
    cases = {
        "excel": ("\ufeffid,label\r\n" + "".join(f"{{{i}}},{i % 2}\r\n" for i in range(6))),
        "reordered": (
            "label,slide,id\n" + "".join(f"{i % 2},s{i // 3},{{{i}}}\n" for i in range(6))
        ),
        "blank_tail": ("ID, Label\n" + "".join(f"{{{i}}},{i % 2}\n" for i in range(6)) + "\n\n"),
    }
    for name, text in cases.items():
        ids = _labels_csv(tmp_path / name, text)
        source = open_source(tmp_path / name)
        labels = dict(zip(source.ids, source.labels.tolist(), strict=True))
        assert labels == {pid: i % 2 for i, pid in enumerate(ids)}, name


def test_labels_csv_without_a_label_column_or_with_bad_rows_is_a_clear_error(tmp_path):
    _labels_csv(tmp_path / "a", "id,target\n" + "".join(f"{{{i}}},0\n" for i in range(6)))
    with pytest.raises(HistodetectError, match=r"no 'label' column.*found 'id,target'"):
        open_source(tmp_path / "a")
    text = "id,label\n{0},2\n{1},0\n{1},0\n" + "".join(f"{{{i}}},1\n" for i in range(2, 6))
    _labels_csv(tmp_path / "b", text)
    with pytest.raises(BadInputError) as err:
        open_source(tmp_path / "b")
    where = dict(err.value.problems)
    assert "label '2' is not 0 or 1" in where["train_labels.csv line 2"]
    assert "duplicate id" in where["train_labels.csv line 4"]
