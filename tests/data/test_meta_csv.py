"""A Kaggle folder's meta.csv gives slide ids (so splits never share a slide) and coordinates."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from histodetect.data.pack import pack
from histodetect.data.sources import open_source
from histodetect.data.store import open_store
from histodetect.errors import BadInputError, HistodetectError


def _write_meta(root, header, rows) -> None:
    with open(root / "meta.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _ids(root) -> list[str]:
    with open(root / "train_labels.csv", newline="") as fh:
        return [r["id"] for r in csv.DictReader(fh)]


def test_meta_csv_groups_the_split_by_slide_and_keeps_coordinates(kaggle_dir, tmp_path):
    root = kaggle_dir(n=60)
    ids = _ids(root)
    rows = [(pid, f"slide_{k % 6}", 10 * k, 20 * k, 0) for k, pid in enumerate(ids)]
    _write_meta(root, ["id", "slide", "x", "y", "label"], rows)
    src = open_source(root, valid_fraction=0.3)
    want = {r[0]: r for r in rows}
    for pid, slide, (x, y) in zip(src.ids, src.slides, src.coords, strict=True):
        assert (slide, x, y) == want[pid][1:4]
    for s in set(src.slides):
        assert len(set(src.splits[src.slides == s])) == 1  # never straddles the split
    assert set(src.splits) == {"train", "valid"}
    pack(root, tmp_path / "store", progress=False, workers=1, valid_fraction=0.3)
    store = open_store(tmp_path / "store")
    assert store.manifest["has_coords"] and store.manifest["has_slides"]
    order = {pid: i for i, pid in enumerate(src.ids)}
    rows_of = [order[pid] for pid in store.ids]
    assert np.array_equal(store.coords, src.coords[rows_of])
    assert list(store.slides) == list(src.slides[rows_of])


def test_pcam_style_meta_names_and_patches_missing_from_it(kaggle_dir):
    root = kaggle_dir(n=20)
    ids = _ids(root)
    # PCam's own column names; the last five patches have no row (each is then its own group).
    rows = [(k, 7, 5, "False", "False", f"wsi_{k % 2}", pid) for k, pid in enumerate(ids[:15])]
    _write_meta(
        root, ["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi", "id"], rows
    )
    src = open_source(root)
    by_id = dict(zip(src.ids, zip(src.slides, map(tuple, src.coords), strict=True), strict=True))
    assert by_id[ids[0]] == ("wsi_0", (5, 7)) and by_id[ids[3]] == ("wsi_1", (5, 7))
    assert by_id[ids[19]] == (ids[19], (-1, -1))


def test_meta_csv_without_slides_or_with_bad_coordinates_is_named(kaggle_dir):
    root = kaggle_dir(n=10)
    ids = _ids(root)
    _write_meta(root, ["id", "x", "y"], [(pid, 1, 2) for pid in ids])
    with pytest.raises(HistodetectError, match=r"meta\.csv: needs an 'id' and a 'slide'"):
        open_source(root)
    _write_meta(root, ["id", "slide", "x", "y"], [(pid, "a", "one", 2) for pid in ids])
    with pytest.raises(BadInputError, match=r"meta\.csv line 2"):
        open_source(root)
    assert len(open_source(root, skip_bad=True)) == 10


def test_a_store_packed_without_coordinates_still_opens(kaggle_dir, tmp_path):
    pack(kaggle_dir(n=12), tmp_path / "store", progress=False, workers=1)
    store = open_store(tmp_path / "store")
    assert store.coords is None and store.slides is None and len(store) == 12
