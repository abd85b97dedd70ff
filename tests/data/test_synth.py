"""Tests for the synthetic PCam-like patch generator and its Kaggle-layout writer."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histodetect import CENTRE, PATCH_SIZE
from histodetect.data.synth import render_patch
from histodetect.data.synth_kaggle import generate
from histodetect.errors import HistodetectError

LO, HI = CENTRE
KINDS = {"positive": (1, False), "decoy": (0, True), "plain": (0, False)}


def _patches(kind: str, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    label, decoy = KINDS[kind]
    root = np.random.SeedSequence(seed)
    return [render_patch(np.random.default_rng(s), label, decoy) for s in root.spawn(n)]


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    n_pos = labels.sum()
    return float(
        (ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(labels) - n_pos))
    )


# --------------------------------------------------------------------------- render_patch


def test_render_patch_returns_rgb_uint8_patch_and_bool_mask():
    image, mask = render_patch(np.random.default_rng(0), 1)
    assert image.shape == (PATCH_SIZE, PATCH_SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (PATCH_SIZE, PATCH_SIZE) and mask.dtype == bool
    # Not a flat colour: real tissue structure spans a wide intensity range.
    assert int(image.max()) - int(image.min()) > 100


@pytest.mark.parametrize("kind", list(KINDS))
def test_masks_obey_the_centre_rule(kind):
    for _, mask in _patches(kind, 300, seed=1):
        in_centre = mask[LO:HI, LO:HI].any()
        if kind == "positive":
            assert in_centre
        elif kind == "decoy":
            assert mask.any() and not in_centre
        else:
            assert not mask.any()


def test_render_patch_is_a_pure_function_of_the_rng():
    a = render_patch(np.random.default_rng(42), 1)
    b = render_patch(np.random.default_rng(42), 1)
    c = render_patch(np.random.default_rng(43), 1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_render_patch_rejects_labels_other_than_0_and_1():
    with pytest.raises(ValueError, match="label"):
        render_patch(np.random.default_rng(0), 2)


def test_tumour_nuclei_are_visible_where_the_mask_says():
    darker = 0
    patches = _patches("positive", 100, seed=2)
    for image, mask in patches:
        grey = image.astype(np.float32).mean(axis=2)
        darker += grey[mask].mean() < np.median(grey[~mask]) - 20
    assert darker >= 0.95 * len(patches)


def test_label_lives_in_the_centre_box_not_in_the_patch_colour():
    """Positives vs decoys: whole-patch colour is near chance, the centre box is informative."""
    pos = _patches("positive", 400, seed=3)
    dec = _patches("decoy", 400, seed=4)
    images = np.stack([im for im, _ in pos + dec]).astype(np.float32)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(dec))]
    train = np.arange(len(labels)) % 2 == 0

    def probe_auc(region: np.ndarray) -> float:
        px = region.reshape(len(region), -1, 3)
        feats = np.c_[px.mean(axis=1), px.std(axis=1), np.ones(len(px))]
        w = np.linalg.lstsq(feats[train], labels[train], rcond=None)[0]
        return _auc(feats[~train] @ w, labels[~train])

    assert probe_auc(images) < 0.65
    assert probe_auc(images[:, LO:HI, LO:HI]) > 0.7


# --------------------------------------------------------------------------- generate


def test_generate_writes_the_kaggle_training_layout(tmp_path):
    out = tmp_path / "ds"
    summary = generate(out, n=50, seed=5)
    assert summary == {
        "synthetic": True,
        "seed": 5,
        "n_train": 50,
        "n_test": 0,
        "positives": 20,
        "decoys": 9,  # 30% of the 30 label-0 patches
        "path": str(out),
    }
    rows = _read_csv(out / "train_labels.csv")
    assert rows[0] == ["id", "label"]
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == 50 == len(set(ids))
    assert all(re.fullmatch(r"[0-9a-f]{40}", i) for i in ids)
    assert sorted(r[1] for r in rows[1:]) == ["0"] * 30 + ["1"] * 20
    assert sorted(p.stem for p in (out / "train").iterdir()) == sorted(ids)
    with tifffile.TiffFile(out / "train" / f"{ids[0]}.tif") as tif:
        assert tif.pages[0].compression == 1  # uncompressed, so pixels round-trip exactly
        image = tif.asarray()
    assert image.shape == (PATCH_SIZE, PATCH_SIZE, 3) and image.dtype == np.uint8
    assert not (out / "test").exists() and not (out / "sample_submission.csv").exists()


def test_generate_marks_the_folder_as_synthetic(tmp_path):
    generate(tmp_path, n=10, seed=123, n_test=4)
    note = (tmp_path / "SYNTHETIC.md").read_text()
    assert "synthetic" in note.lower() and "histodetect synth" in note
    assert "seed: 123" in note and "10 patches" in note and "4 patches" in note
    assert "real-world performance" in note


def test_generate_writes_a_test_split_with_hidden_answers(tmp_path):
    generate(tmp_path, n=20, seed=6, n_test=15)
    test_ids = sorted(p.stem for p in (tmp_path / "test").iterdir())
    submission = _read_csv(tmp_path / "sample_submission.csv")
    answers = _read_csv(tmp_path / "test_labels_SYNTHETIC.csv")
    assert submission[0] == answers[0] == ["id", "label"]
    assert sorted(r[0] for r in submission[1:]) == test_ids
    assert all(r[1] == "0" for r in submission[1:])
    assert [r[0] for r in answers[1:]] == [r[0] for r in submission[1:]]
    assert sum(r[1] == "1" for r in answers[1:]) == 6  # 40% of 15
    # Shuffled, so that row order carries no label information.
    assert [r[1] for r in answers[1:]] != sorted(r[1] for r in answers[1:])
    train_ids = {r[0] for r in _read_csv(tmp_path / "train_labels.csv")[1:]}
    assert train_ids.isdisjoint(test_ids)


def test_generate_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate(tmp_path / name, n=12, seed=seed, n_test=4)
    tree_a, tree_b, tree_c = (_tree(tmp_path / name) for name in "abc")
    assert tree_a == tree_b
    assert tree_a["train_labels.csv"] != tree_c["train_labels.csv"]
    pixels_a = [tifffile.imread(p) for p in sorted((tmp_path / "a" / "train").iterdir())]
    pixels_c = [tifffile.imread(p) for p in sorted((tmp_path / "c" / "train").iterdir())]
    assert not any(np.array_equal(x, y) for x in pixels_a for y in pixels_c)


def test_generate_refuses_a_non_empty_train_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "old.tif").write_bytes(b"keep me")
    with pytest.raises(HistodetectError, match="not empty"):
        generate(tmp_path, n=5)
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["old.tif"]
    assert not (tmp_path / "SYNTHETIC.md").exists()


def test_generate_accepts_an_existing_empty_train_folder(tmp_path):
    (tmp_path / "train").mkdir()
    assert generate(tmp_path, n=3)["n_train"] == 3


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"n_test": -1}, {"seed": -1}, {"positive_fraction": 1.5}, {"decoy_fraction": -0.1}],
)
def test_generate_rejects_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(HistodetectError):
        generate(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_generate_shows_a_progress_bar_when_asked(tmp_path, capsys):
    generate(tmp_path / "quiet", n=3)
    assert capsys.readouterr().err == ""
    generate(tmp_path / "loud", n=3, progress=True)
    assert "3/3" in capsys.readouterr().err
