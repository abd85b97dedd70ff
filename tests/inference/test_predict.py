"""Prediction and evaluation: Kaggle submissions, TTA, ensembles, intervals, bad patches."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from histodetect.config import RunConfig, merge
from histodetect.inference.evaluate import evaluate_probabilities, point_metrics
from histodetect.inference.predictor import Predictor, list_patches, predict_patches
from histodetect.training.run import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny trained run shared by the tests of this module."""
    from tests.conftest import write_kaggle

    root = tmp_path_factory.mktemp("data")
    write_kaggle(root / "k", n=120, n_test=20)
    cfg = merge(RunConfig(), {"train": {"epochs": 2}, "data": {"batch_size": 16}})
    run = root / "run"
    train(root / "k", run, cfg, progress=False)
    return root / "k", run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histodetect.cli", *args], capture_output=True, text=True
    )


@pytest.mark.slow
def test_submission_follows_sample_submission_and_reports_missing_or_extra(trained_run, tmp_path):
    data, run = trained_run
    ids = sorted(p.stem for p in (data / "test").glob("*.tif"))
    order = list(np.random.default_rng(5).permutation(ids))
    (data / "sample_submission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in order))
    out = tmp_path / "sub.csv"
    proc = _cli("predict", str(run), "--data", str(data), "--out", str(out), "--tta", "2")
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == order  # same order, one row per id
    probs = np.array([float(r[1]) for r in rows[1:]])
    assert ((probs >= 0) & (probs <= 1)).all()
    # The same numbers as the predictor on the decoded files.
    images = np.stack([tifffile.imread(data / "test" / f"{i}.tif") for i in order])
    assert np.allclose(probs, Predictor.from_run(run).predict_proba(images, tta=2), atol=1e-5)

    missing = data / "test" / f"{order[3]}.tif"
    saved = missing.read_bytes()
    missing.unlink()
    extra = data / "test" / "extra_patch.tif"
    extra.write_bytes(saved)
    proc = _cli("predict", str(run), "--data", str(data), "--out", str(tmp_path / "x.csv"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{order[3]}.tif: in sample_submission.csv, no file" in proc.stderr
    assert "extra_patch.tif: file not in sample_submission.csv" in proc.stderr
    assert not (tmp_path / "x.csv").exists()
    proc = _cli(
        "predict", str(run), "--data", str(data), "--out", str(tmp_path / "y.csv"), "--skip-bad"
    )
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "y.csv") as fh:
        got = {r["id"]: float(r["label"]) for r in csv.DictReader(fh)}
    assert set(got) == set(order) and got[order[3]] == 0.5
    assert "extra_patch" in (tmp_path / "y.problems.csv").read_text()
    missing.write_bytes(saved)
    extra.unlink()


@pytest.mark.slow
def test_corrupt_patch_stops_prediction_with_its_name(trained_run, tmp_path):
    data, run = trained_run
    folder = tmp_path / "patches"
    folder.mkdir()
    for f in sorted((data / "test").glob("*.tif"))[:5]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.tif").write_bytes(b"oops")
    proc = _cli("predict", str(run), "--data", str(folder), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode != 0 and "broken.tif" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_an_ensemble_of_one_run_with_itself_predicts_as_the_run(trained_run):
    data, run = trained_run
    patches = list_patches(data)
    single, _ = predict_patches(Predictor.from_run(run), patches, progress=False)
    double, _ = predict_patches(
        Predictor.from_runs([run, run], weights=[1, 3]), patches, progress=False
    )
    assert np.allclose(single, double, atol=1e-6)


@pytest.mark.slow
def test_evaluate_split_all_scores_every_patch_of_an_external_folder(trained_run, tmp_path):
    from tests.conftest import write_kaggle

    _, run = trained_run
    external = tmp_path / "external"
    write_kaggle(external, n=50, seed=7)  # other patches and ids: never seen by the run
    out = tmp_path / "ext-eval"
    proc = _cli(
        "evaluate",
        str(run),
        "--data",
        str(external),
        "--split",
        "all",
        "--out",
        str(out),
        "--bootstrap",
        "100",
    )
    assert proc.returncode == 0, proc.stderr
    assert "all: 50 patches" in proc.stdout and "optimistic" not in proc.stdout
    assert "chosen on the run's own validation split" in proc.stdout
    metrics = json.loads((out / "metrics_all.json").read_text())
    assert metrics["n"] == 50 and set(metrics["thresholds"]) >= {"run", "youden"}
    # The same folder's own split, scored as before, still works and says where it came from.
    own = _cli("evaluate", str(run), "--data", str(external), "--split", "valid", "--out", str(out))
    assert own.returncode == 0 and "valid: 4 patches" in own.stdout  # 10% of 2 x 25


@pytest.mark.slow
def test_evaluate_cli_writes_metrics_with_intervals(trained_run):
    data, run = trained_run
    proc = _cli("evaluate", str(run), "--data", str(data), "--tta", "8", "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr
    assert "ROC AUC" in proc.stdout and "95% CI" in proc.stdout
    metrics = json.loads((run / "metrics_valid.json").read_text())
    lo, hi = metrics["intervals"]["auc"]
    assert lo <= metrics["metrics"]["auc"] <= hi
    assert (run / "evaluation_valid.png").stat().st_size > 10_000


def test_confidence_interval_narrows_as_the_evaluation_set_grows():
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        y = rng.integers(0, 2, n)
        p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0, 1)
        ev = evaluate_probabilities(y, p, "valid", n_boot=300)
        lo, hi = ev.intervals["auc"]
        return hi - lo

    small, large = width(100), width(2000)
    assert large < small / 2.5  # ~ 1/sqrt(n): 20x the data, ~4.5x narrower


def test_point_metrics_match_a_hand_count():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
    m = point_metrics(y, p, 0.5)
    # tp=3 (0.9, 0.8, 0.7), fn=1 (0.3), fp=1 (0.6), tn=3
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["accuracy"] == 0.75
    assert m["precision"] == 0.75 and m["f1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(0.875)


@pytest.mark.slow
def test_onnx_export_matches_pytorch_with_any_batch_size(trained_run, tmp_path):
    import onnxruntime as ort

    data, run = trained_run
    proc = _cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert proc.returncode == 0, proc.stderr
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    images = np.stack([tifffile.imread(f) for f in sorted((data / "test").glob("*.tif"))[:7]])
    got = session.run(["probability"], {"patches": images})[0]
    want = Predictor.from_run(run).predict_proba(images)
    assert got.shape == (7,) and np.abs(got - want).max() < 1e-4


def test_predict_mpp_resamples_a_folder_of_mixed_tiles(trained_run, tmp_path):
    from PIL import Image

    _, run = trained_run
    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("small.png", 224), ("big.jpg", 512)):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "tiles.csv"
    # Without --mpp the wrong-sized tile is named, with the option that reads it.
    proc = _cli("predict", str(run), "--data", str(folder), "--out", str(out))
    assert proc.returncode == 2 and "big.jpg" in proc.stderr and "--mpp" in proc.stderr
    proc = _cli("predict", str(run), "--data", str(folder), "--out", str(out), "--mpp", "0.5")
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows] == ["id", "big_0_0", "big_0_1", "big_1_0", "big_1_1", "small"]


def test_evaluate_mpp_scores_labelled_tiles_per_tile_as_predict_sees_them(trained_run, tmp_path):
    from PIL import Image

    _, run = trained_run
    root = tmp_path / "tiles"
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(1)
    sizes = {"a": 224, "b": 512, "c": 224, "d": 512, "e": 300, "f": 224}
    for name, size in sizes.items():
        tile = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(tile).save(root / "train" / f"{name}.tif")
    labels = {name: k % 2 for k, name in enumerate(sizes)}
    (root / "train_labels.csv").write_text(
        "id,label\n" + "".join(f"{n},{v}\n" for n, v in labels.items())
    )
    out = tmp_path / "out"
    proc = _cli("evaluate", str(run), "--data", str(root), "--mpp", "0.5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    ev = json.loads((out / "metrics_tiles.json").read_text())
    assert ev["n"] == len(sizes) and (out / "evaluation_tiles.png").exists()
    # Each tile's probability is the highest of its patches' as `predict --mpp` gives them.
    sub = tmp_path / "patches.csv"
    proc = _cli("predict", str(run), "--data", str(root / "train"), "--out", str(sub), "--mpp=0.5")
    assert proc.returncode == 0, proc.stderr
    with open(sub, newline="") as fh:
        patch = {r["id"]: float(r["label"]) for r in csv.DictReader(fh)}
    tile_p = np.array([max(v for k, v in patch.items() if k.split("_")[0] == n) for n in sizes])
    y = np.array(list(labels.values()))
    want = point_metrics(y, tile_p, Predictor.from_run(run).threshold)
    assert ev["metrics"]["auc"] == pytest.approx(want["auc"])
    assert ev["metrics"]["accuracy"] == pytest.approx(want["accuracy"])
    # A tile too small for one patch is named, exit 2; options that do not apply are refused.
    small = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
    Image.fromarray(small).save(root / "train" / "g.tif")
    (root / "train_labels.csv").write_text((root / "train_labels.csv").read_text() + "g,1\n")
    proc = _cli("evaluate", str(run), "--data", str(root), "--mpp", "0.5", "--out", str(out))
    assert proc.returncode == 2 and "g.tif" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("evaluate", str(run), "--data", str(root), "--mpp", "0.5", "--by", "centre")
    assert proc.returncode == 2 and "--by" in proc.stderr


def test_evaluate_by_column_scores_each_group_and_names_the_worst(trained_run, tmp_path):
    from histodetect.inference.evaluate import evaluate

    data, run = trained_run
    with open(data / "train_labels.csv", newline="") as fh:
        ids = [r["id"] for r in csv.DictReader(fh)]
    table = tmp_path / "centres.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "centre"])
        writer.writerows([i, f"centre-{k % 3}"] for k, i in enumerate(ids))
    ev = evaluate(run, data, "all", n_boot=50, out=tmp_path, by="centre", groups_csv=table)
    rows = ev.groups["rows"]
    assert [r["group"] for r in rows] == ["centre-0", "centre-1", "centre-2"]
    assert sum(r["n"] for r in rows) == ev.n
    aucs = {r["group"]: r["auc"] for r in rows}
    assert ev.groups["worst"] == min(aucs, key=aucs.get)
    assert "<- worst" in ev.summary()
    # Metrics on the in-scope patches beside all of them.
    assert 0 <= ev.scope["out_of_scope"] <= 1 and ev.scope["n_in_scope"] <= ev.n
    assert "in scope: ROC AUC" in ev.summary() or "EVERY patch" in ev.summary()
    saved = json.loads((tmp_path / "metrics_all.json").read_text())
    assert saved["groups"]["worst"] == ev.groups["worst"]
    # A table that leaves patches out is named, in one line, exit 2.
    table.write_text("id,centre\n" + ids[0] + ",a\n")
    proc = _cli(
        "evaluate",
        str(run),
        "--data",
        str(data),
        "--split",
        "all",
        "--out",
        str(tmp_path),
        "--by",
        "centre",
        "--groups",
        str(table),
    )
    assert proc.returncode == 2 and "centres.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_probabilities_and_scope_scores_of_one_pass_equal_those_of_two(trained_run):
    from tests.conftest import fake_patches

    _, run = trained_run
    predictor = Predictor.from_run(run)
    images, _ = fake_patches(20, seed=4)
    for tta in (1, 8):
        probs, scores = predictor.predict_and_score(images, tta, batch_size=7)
        assert np.allclose(probs, predictor.predict_proba(images, tta), atol=1e-6)
        assert np.allclose(scores, predictor.scope_scores(images), rtol=1e-5, atol=1e-5)


def test_predict_details_flag_out_of_scope_patches_and_old_runs_still_work(trained_run, tmp_path):
    import shutil

    from histodetect.inference.scope import SCOPE_FILE

    data, run = trained_run
    details, out = tmp_path / "details.csv", tmp_path / "sub.csv"
    # Patches unlike the training data: flat saturated colours.
    folder = tmp_path / "odd"
    folder.mkdir()
    for k, colour in enumerate([(0, 200, 0), (20, 20, 220), (250, 250, 0)]):
        tifffile.imwrite(folder / f"odd{k}.tif", np.full((96, 96, 3), colour, np.uint8))
    for f in sorted((data / "test").glob("*.tif"))[:6]:
        shutil.copy(f, folder / f.name)
    proc = _cli(
        "predict", str(run), "--data", str(folder), "--out", str(out), "--details", str(details)
    )
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as fh:
        assert next(csv.reader(fh)) == ["id", "label"]  # the submission keeps its two columns
    with open(details, newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    assert all(rows[f"odd{k}"]["in_scope"] == "no" for k in range(3))
    assert "OUT OF SCOPE" in proc.stdout
    # A run without the statistics predicts as before and says the score is unavailable.
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    (old / SCOPE_FILE).unlink()
    proc = _cli(
        "predict", str(old), "--data", str(folder), "--out", str(out), "--details", str(details)
    )
    assert proc.returncode == 0 and "unavailable" in proc.stdout
    with open(details, newline="") as fh:
        assert {r["in_scope"] for r in csv.DictReader(fh)} == {""}
    # A damaged statistics file is named in one line, exit 2.
    (old / SCOPE_FILE).write_bytes(b"\x00" * 40)
    proc = _cli("predict", str(old), "--data", str(folder), "--out", str(out))
    assert proc.returncode == 2 and SCOPE_FILE in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_scope_statistics_written_before_the_texture_sets_score_with_their_stages(
    trained_run, tmp_path, monkeypatch
):
    import shutil

    from histodetect.data import texture
    from histodetect.inference.scope import TEXTURE, descriptors, load_scope, save_scope
    from tests.conftest import fake_patches

    _, run = trained_run
    images, _ = fake_patches(12, seed=5)
    assert all(f"means{name}" in load_scope(run) for name in TEXTURE)  # new runs: texture too
    predictor = Predictor.from_run(run)
    raw = descriptors(predictor, images, texture=False)
    # The first statistics' layout: stage sets only, fitted on raw (unstandardised) descriptors.
    rng = np.random.default_rng(0)
    old = {"threshold": np.array([0.5, 0.95], np.float32)}
    for name, feats in raw.items():
        d = feats.shape[1]
        old |= {
            f"means{name}": feats[rng.choice(len(feats), 2)].astype(np.float32),
            f"precision{name}": np.eye(d, dtype=np.float32) * rng.uniform(0.5, 2),
            f"scale{name}": np.array([1.0, 2.0], np.float32),
        }
    old_run = tmp_path / "old-run"
    shutil.copytree(run, old_run)
    save_scope(old_run, old)
    monkeypatch.setattr(texture, "texture_descriptors", lambda _: pytest.fail("texture used"))
    _, scores = Predictor.from_run(old_run).predict_and_score(images)
    want = np.zeros(len(images))
    for name, feats in raw.items():  # the score as first defined, written out
        means, precision = old[f"means{name}"], old[f"precision{name}"]
        d2 = [np.einsum("ij,jk,ik->i", feats - m, precision, feats - m) for m in means]
        want += (np.log(np.maximum(np.min(d2, axis=0), 1e-12)) - 1.0) / 2.0
    assert np.allclose(scores, want, rtol=1e-4, atol=1e-4)
