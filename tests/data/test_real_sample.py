"""The real PCam sample (6,259 Kaggle patches) packs to exactly what tifffile reads."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from histodetect.data.pack import pack
from histodetect.data.store import open_store


@pytest.mark.slow
def test_real_sample_packs_exact_pixels_and_labels(shared_sample, tmp_path):
    result = pack(shared_sample, tmp_path / "store", progress=False)
    assert result.patches == 6259 and result.skipped == 0 and not result.synthetic
    store = open_store(tmp_path / "store")
    with open(shared_sample / "train_labels.csv") as fh:
        truth = {r["id"]: int(r["label"]) for r in csv.DictReader(fh)}
    assert dict(zip(store.ids, store.labels.tolist(), strict=True)) == truth
    for i, pid in enumerate(store.ids):
        expected = tifffile.imread(shared_sample / "train" / f"{pid}.tif")
        assert np.array_equal(store.read_one(i), expected), pid
    valid = store.splits == "valid"
    assert valid.sum() == pytest.approx(626, abs=2)
    assert store.labels[valid].mean() == pytest.approx(store.labels.mean(), abs=0.01)
