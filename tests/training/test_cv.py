"""Cross-validation: fold runs, out-of-fold predictions, ensemble folder, resume after kill -9."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from histodetect.cli.main import main


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "histodetect.cli", *args], **kw)


def _oof(folder) -> list[tuple[str, str]]:
    with open(folder / "oof.csv", newline="") as fh:
        return [(r["id"], r["fold"]) for r in csv.DictReader(fh)]


def _steps(folder, k: int) -> int:
    return json.loads((folder / f"fold_{k}" / "metrics.json").read_text())["optimizer_steps"]


@pytest.mark.slow
def test_cv_killed_mid_fold_resumes_to_the_same_folds_and_steps(kaggle_dir, tmp_path, capsys):
    data = kaggle_dir(n=200)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  epochs: 1\n  checkpoint_every: 2\ndata:\n  batch_size: 16\n")
    common = ["cv", "--data", str(data), "--config", str(cfg), "--folds", "3"]
    common += ["--accelerator", "cpu", "--holdout-tta", "1"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    # Only the killed run needs a process of its own; the others run here (no fresh imports).
    assert main([*common, "--out", str(tmp_path / "ref")]) == 0

    out = tmp_path / "cv"
    proc = cli(*common, "--out", str(out), **quiet)
    mid_fold = out / "fold_1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not mid_fold.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "fold_1" / "model.json").exists(), "fold 1 finished before the kill"
    finished_before = (out / "fold_0" / "model.safetensors").stat().st_mtime_ns

    capsys.readouterr()
    assert main([*common, "--out", str(out)]) == 0
    ref = tmp_path / "ref"
    assert (out / "fold_0" / "model.safetensors").stat().st_mtime_ns == finished_before
    assert json.loads((out / "fold_1" / "metrics.json").read_text())["resumed"] is True
    assert [_steps(out, k) for k in range(3)] == [_steps(ref, k) for k in range(3)]
    assert _oof(out) == _oof(ref)  # every fold patch once, in the same fold
    assert len(_oof(out)) == len({i for i, _ in _oof(out)}) == 180  # 200 minus the 10% holdout
    text = capsys.readouterr().out
    assert "out-of-fold AUC" in text and "mean ± std" in text and "ensemble AUC" in text
    metrics = json.loads((out / "cv_metrics.json").read_text())
    lo, hi = metrics["oof_interval"]
    assert lo <= metrics["oof_auc"] <= hi

    # The ensemble folder is a run for every command; a rerun with other settings is refused.
    sub = tmp_path / "sub.csv"
    assert (
        main(["predict", str(out / "ensemble"), "--data", str(data / "train"), "--out", str(sub)])
        == 0
    )
    assert sub.exists()
    capsys.readouterr()
    assert main([*common[:-2], "--out", str(out), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "Traceback" not in err
