"""Cross-validation folds: stratified, whole slides together, reproducible, holdout kept out."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from histodetect.config import DataConfig
from histodetect.data.folds import assign_folds, read_groups, run_rows
from histodetect.data.store import Store
from histodetect.errors import HistodetectError


def _store(n: int = 200, slides: bool = True) -> Store:
    rng = np.random.default_rng(0)
    splits = np.where(rng.random(n) < 0.15, "valid", "train")
    return Store(
        kind="store",
        path=None,
        ids=np.array([f"p{i}" for i in range(n)]),
        labels=(rng.random(n) < 0.4).astype(np.int8),
        splits=splits,
        slides=np.array([f"s{i % 20}" for i in range(n)], dtype=object) if slides else None,
    )


def test_folds_partition_the_train_rows_and_keep_each_slide_in_one_fold():
    store = _store()
    cfg = replace(DataConfig(), folds=5, split_seed=3)
    valid = [run_rows(store, replace(cfg, fold=k), "valid") for k in range(5)]
    train_rows = np.flatnonzero(store.splits == "train")
    assert np.array_equal(np.sort(np.concatenate(valid)), train_rows)  # each row once
    for k, rows in enumerate(valid):
        trained = run_rows(store, replace(cfg, fold=k), "train")
        assert not set(store.slides[rows]) & set(store.slides[trained])
    held_out = run_rows(store, cfg, "test")
    assert np.array_equal(held_out, np.flatnonzero(store.splits == "valid"))
    # The same seed gives the same folds; the ensemble (fold -1) trains on all of them.
    again = run_rows(store, replace(cfg, fold=2), "valid")
    assert np.array_equal(again, valid[2])
    assert np.array_equal(run_rows(store, replace(cfg, fold=-1), "train"), train_rows)


def test_folds_without_slide_ids_are_stratified_by_label():
    store = _store(slides=False)
    labels = store.labels[store.splits == "train"]
    folds = assign_folds(labels, None, 4, seed=0)
    shares = [labels[folds == k].mean() for k in range(4)]
    assert max(shares) - min(shares) < 0.05


def test_a_groups_file_supplies_slide_ids_and_names_what_it_lacks(tmp_path):
    ids = np.array(["a", "b", "c"])
    path = tmp_path / "groups.csv"
    path.write_text("\ufeffslide_note,group,id\r\nx,s1,a\r\nx,s1,b\r\nx,s2,c\r\n")
    assert list(read_groups(path, ids)) == ["s1", "s1", "s2"]
    with pytest.raises(HistodetectError, match=r"1 patch id.*e.g. d"):
        read_groups(path, np.array(["a", "d"]))
    with pytest.raises(HistodetectError, match="cannot make 5 folds"):
        assign_folds(np.array([0, 1, 0, 1]), np.array(["s1", "s1", "s2", "s2"]), 5)
    with pytest.raises(HistodetectError, match="--split must be one of"):
        run_rows(_store(), DataConfig(), "holdout")


def test_with_a_groups_file_the_holdout_shares_no_slide_with_any_fold(tmp_path):
    store = _store(slides=False)
    path = tmp_path / "groups.csv"
    path.write_text("id,group\n" + "".join(f"p{i},s{i % 20}\n" for i in range(len(store))))
    cfg = replace(DataConfig(), folds=3, groups=str(path))
    slides = read_groups(path, store.ids)
    held_out = set(slides[run_rows(store, cfg, "test")])
    assert held_out and not held_out & set(slides[run_rows(store, cfg, "train")])
    for k in range(3):
        assert not held_out & set(slides[run_rows(store, replace(cfg, fold=k), "valid")])


def test_an_ensemble_has_no_validation_split_and_says_which_split_to_use():
    cfg = replace(DataConfig(), folds=3, fold=-1)
    with pytest.raises(HistodetectError, match="use --split test"):
        run_rows(_store(), cfg, "valid")
