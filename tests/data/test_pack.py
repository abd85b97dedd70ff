"""Packing: exact pixels, validation of every file, resume after kill -9, damage detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from histodetect.data.pack import LOG, pack
from histodetect.data.sources import open_source
from histodetect.data.store import IMAGES, open_store
from histodetect.errors import BadInputError, HistodetectError
from tests.data.test_sources import write_pcam


def test_pack_kaggle_equals_source(kaggle_dir, tmp_path):
    root = kaggle_dir(n=50, n_test=5)
    result = pack(root, tmp_path / "store", chunk_rows=16, workers=2, progress=False)
    assert result.patches == 55 and result.skipped == 0
    store, src = open_store(tmp_path / "store"), open_source(root)
    assert list(store.ids) == list(src.ids)
    assert np.array_equal(store.labels, src.labels) and np.array_equal(store.splits, src.splits)
    for i in range(len(src)):
        assert np.array_equal(store.read_one(i), tifffile.imread(src.files[i]))
    rng = np.random.default_rng(0)
    idx = rng.permutation(55)[:20]
    assert np.array_equal(store.read(idx), np.stack([src.read_one(i) for i in idx]))


def test_pack_pcam_keeps_slides_and_splits(tmp_path):
    write_pcam(tmp_path / "pcam", n=20, meta=True)
    pack(tmp_path / "pcam", tmp_path / "store", progress=False, workers=1)
    store = open_store(tmp_path / "store")
    assert store.slides is not None and len(store) == 60
    assert dict(zip(*np.unique(store.splits, return_counts=True), strict=True)) == {
        "test": 20,
        "train": 20,
        "valid": 20,
    }


def _break_files(root):
    files = sorted((root / "train").glob("*.tif"))
    files[0].write_bytes(b"garbage" * 50)
    data = files[1].read_bytes()
    files[2].write_bytes(data[: len(data) // 3])
    tifffile.imwrite(files[3], np.zeros((50, 50, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(files[4], np.zeros((96, 96), np.uint8))
    return files


def test_bad_patches_fail_listing_all_then_skip_bad_packs_the_rest(kaggle_dir, tmp_path):
    root = kaggle_dir(n=40)
    files = _break_files(root)
    with pytest.raises(BadInputError) as err:
        pack(root, tmp_path / "store", chunk_rows=8, progress=False, workers=1)
    text = str(err.value)
    for f, why in [
        (files[0], "corrupt"),
        (files[2], "truncated"),
        (files[3], "wrong size 50x50"),
        (files[4], "not an RGB image"),
    ]:
        assert f"{f}: " in text and why in text
    assert len(err.value.problems) == 4
    result = pack(root, tmp_path / "store", chunk_rows=8, skip_bad=True, progress=False)
    assert result.patches == 36 and result.skipped == 4
    store = open_store(tmp_path / "store")
    assert {files[k].stem for k in (0, 2, 3, 4)}.isdisjoint(set(store.ids))
    listed = (tmp_path / "store" / "bad_patches.csv").read_text()
    assert all(str(files[k]) in listed for k in (0, 2, 3, 4))


def test_fixing_a_bad_file_and_rerunning_redoes_only_its_chunk(kaggle_dir, tmp_path):
    root = kaggle_dir(n=32)
    files = sorted((root / "train").glob("*.tif"))
    original = files[5].read_bytes()
    files[5].write_bytes(b"broken")
    with pytest.raises(BadInputError):
        pack(root, tmp_path / "store", chunk_rows=8, progress=False, workers=1)
    files[5].write_bytes(original)
    result = pack(root, tmp_path / "store", chunk_rows=8, progress=False, workers=1)
    assert result.chunks_resumed == 3 and result.decoded_this_run == 8
    store = open_store(tmp_path / "store")
    i = list(store.ids).index(files[5].stem)
    assert np.array_equal(store.read_one(i), tifffile.imread(files[5]))


def test_rerun_of_finished_pack_is_a_no_op_and_other_data_is_refused(kaggle_dir, tmp_path):
    root = kaggle_dir(n=20)
    pack(root, tmp_path / "store", progress=False, workers=1)
    again = pack(root, tmp_path / "store", progress=False, workers=1)
    assert again.decoded_this_run == 0 and again.patches == 20
    other = kaggle_dir(n=12, seed=3, name="other")
    with pytest.raises(HistodetectError, match="different packed store"):
        pack(other, tmp_path / "store", progress=False)


def test_damaged_store_is_detected_on_open(kaggle_dir, tmp_path):
    pack(kaggle_dir(n=20), tmp_path / "store", progress=False, workers=1)
    images = tmp_path / "store" / IMAGES
    data = bytearray(images.read_bytes())
    data[-5000] ^= 0xFF
    images.write_bytes(bytes(data))
    with pytest.raises(HistodetectError, match="checksum mismatch"):
        open_store(tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "store.json").read_text())
    manifest["rows"] = 99
    (tmp_path / "store" / "store.json").write_text(json.dumps(manifest))
    with pytest.raises(HistodetectError, match="holds 20 rows"):
        open_store(tmp_path / "store")


@pytest.mark.slow
def test_kill_9_mid_pack_then_resume_gives_identical_store(kaggle_dir, tmp_path):
    root = kaggle_dir(n=600)
    pack(root, tmp_path / "reference", chunk_rows=20, progress=False, workers=1)
    out = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "histodetect.cli",
        "pack",
        str(root),
        "--out",
        str(out),
        "--chunk-size",
        "20",
        "--workers",
        "1",
        "--quiet",
    ]
    # Slow each chunk down so the kill lands mid-way, whatever the machine's speed.
    env = dict(os.environ, HISTODETECT_PACK_DELAY="0.05")
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        log = out / LOG
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "store.json").exists()
    done = len([ln for ln in (out / LOG).read_text().splitlines() if ln.endswith("}")])
    assert 5 <= done < 30
    result = pack(root, out, chunk_rows=20, progress=False, workers=1)
    assert result.chunks_resumed >= done - 1  # a torn last line is simply redone
    assert result.decoded_this_run == 600 - 20 * result.chunks_resumed
    a, b = open_store(out), open_store(tmp_path / "reference")
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert list(a.ids) == list(b.ids) and np.array_equal(a.labels, b.labels)
    assert a.manifest["checksums"] == b.manifest["checksums"]
