"""The run report: one offline HTML page with the run's numbers, figures and explanations."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodetect.config import RunConfig, merge
from histodetect.reports.html import build_report
from histodetect.training.run import train
from tests.conftest import CHROMIUM, CHROMIUM_OFFLINE_FLAGS


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, Path, str]:
    """A tiny trained run on SYNTHETIC-marked data, reported with DATA (evaluates, explains)."""
    from tests.conftest import write_kaggle

    root = tmp_path_factory.mktemp("report")
    write_kaggle(root / "k", n=80)
    (root / "k" / "SYNTHETIC.md").write_text("generated patches\n")
    cfg = merge(RunConfig(), {"train": {"epochs": 2}, "data": {"batch_size": 16}})
    run = root / "run"
    train(root / "k", run, cfg, progress=False)
    path = build_report(run, root / "k")
    return run, path, path.read_text(encoding="utf-8")


def _copy_run(run: Path, dest: Path, keep_results: bool = True) -> Path:
    """A copy of the run folder without checkpoints (and without results unless kept)."""
    skip = ["checkpoints", "tensorboard", "report.html"]
    if not keep_results:
        skip += ["metrics_*.json", "evaluation_*.png", "explain"]
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(*skip))
    return dest


@pytest.mark.slow
def test_report_is_one_self_contained_page_with_metrics(reported):
    run, path, page = reported
    assert path == run / "report.html"
    assert (run / "metrics_valid.json").exists()  # evaluated because DATA was given
    assert (run / "explain" / "explain.json").exists()  # and explained
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert not [r for r in refs if re.match(r"(https?:)?//", r, flags=re.I)]
    assert not [r for r in refs if not r.startswith(("data:image/png;base64,", "#"))]
    assert "<script" not in page.lower() and "<link" not in page.lower()
    images = re.findall(r"<img\b[^>]*>", page)
    assert len(images) >= 4  # curves, evaluation, top losses, most uncertain
    for tag in images:
        data = re.search(r'src="data:image/png;base64,([^"]+)"', tag)
        assert data, tag[:80]
        assert base64.b64decode(data.group(1))[:8] == b"\x89PNG\r\n\x1a\n"

    ev = json.loads((run / "metrics_valid.json").read_text())
    lo, hi = ev["intervals"]["auc"]
    assert f"{ev['metrics']['auc']:.4f}" in page
    assert f"{lo:.4f}–{hi:.4f}" in page
    assert 'class="banner">SYNTHETIC DATA' in page
    top = json.loads((run / "explain" / "explain.json").read_text())["top_losses"]
    assert top and top[0]["id"] in page
    # The out-of-scope section: the validation scores' histogram per class and the share.
    scope = ev["scope"]
    assert '<h2 id="scope">Out of scope</h2>' in page and page.count("<svg") == 1
    assert f"{100 * scope['out_of_scope']:.1f} %" in page and "not a diagnosis" in page
    assert sum(scope["histogram"]["normal"]) + sum(scope["histogram"]["tumour"]) == ev["n"]


@pytest.mark.slow
def test_report_of_real_data_has_no_banner_and_escapes_text(reported, tmp_path):
    run = _copy_run(reported[0], tmp_path / "run <b>&amp;")
    for name in ("data.json", "model.json", "metrics_valid.json", "explain/explain.json"):
        meta = json.loads((run / name).read_text())
        meta["synthetic"] = False
        (run / name).write_text(json.dumps(meta))
    page = build_report(run).read_text(encoding="utf-8")
    assert "SYNTHETIC" not in page
    assert "run <b>" not in page and "run &lt;b&gt;&amp;amp;" in page


@pytest.mark.slow
def test_report_without_data_says_what_is_missing(reported, tmp_path):
    run = _copy_run(reported[0], tmp_path / "bare", keep_results=False)
    page = build_report(run).read_text(encoding="utf-8")
    assert "histodetect evaluate" in page and "histodetect explain" in page
    assert not list(run.glob("metrics_*.json"))  # nothing computed without DATA
    assert page.count("<img") == 1  # only the training curves
    assert "No out-of-scope scores" in page and "<svg" not in page


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs a headless browser: apt install chromium")
def test_report_renders_in_a_headless_browser_without_errors(reported, tmp_path):
    _, path, _ = reported
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        *CHROMIUM_OFFLINE_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        "--enable-logging=stderr",
        "--v=0",
        path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    # Page console messages appear as "...:INFO:CONSOLE:..." (this chromium logs console.error
    # and uncaught exceptions at INFO); the page has no script, so any of them is a fault.
    console = [
        line for line in proc.stderr.splitlines() if "Uncaught" in line or ":CONSOLE" in line
    ]
    assert not console, console


@pytest.mark.slow
def test_report_names_an_external_evaluation_and_keeps_it_apart(reported, tmp_path):
    from histodetect.inference.evaluate import evaluate
    from tests.conftest import write_kaggle

    run = _copy_run(reported[0], tmp_path / "run")
    other = tmp_path / "hospital_b"
    write_kaggle(other, n=30, seed=5)
    evaluate(run, other, "all", n_boot=50)
    scored = json.loads((run / "metrics_all.json").read_text())["data"]
    assert scored["path"] == str(other.resolve()) and scored["n"] == 30
    assert scored["run_data"] is False and scored["kind"] == "kaggle"
    assert json.loads((run / "metrics_valid.json").read_text())["data"]["run_data"] is True

    page = build_report(run).read_text(encoding="utf-8")
    named = f"30 patches, every labelled patch of kaggle data at <code>{other.resolve()}</code>"
    assert named in page and "External data: hospital_b all" in page
    # The headline figures stay those of the run's own validation, named as such.
    glance = page.split('id="glance"')[1].split('id="data"')[0]
    assert "hospital_b" not in glance and "the valid split (as the run saw it)" in glance
    own = page.split("On the run's own data")[1].split("External data")[0]
    assert "hospital_b" not in own


@pytest.mark.slow
def test_report_with_data_evaluates_the_run_even_after_an_external_evaluation(reported, tmp_path):
    from histodetect.inference.evaluate import evaluate
    from tests.conftest import write_kaggle

    run = _copy_run(reported[0], tmp_path / "run")
    (run / "metrics_valid.json").unlink()
    write_kaggle(tmp_path / "other", n=30, seed=5)
    evaluate(run, tmp_path / "other", "all", n_boot=50)
    build_report(run, reported[0].parent / "k")
    assert json.loads((run / "metrics_valid.json").read_text())["data"]["run_data"] is True
