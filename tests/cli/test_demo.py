"""`histodetect demo`: the whole SYNTHETIC pipeline ends with an evaluation and a report page."""

from __future__ import annotations

from pathlib import Path

import pytest

from histodetect.cli.main import main


@pytest.mark.slow
def test_demo_ends_with_evaluation_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    # Tiny sizes: the point is the sequence of steps and the files, not the model's quality.
    args = ["demo", "--out", str(out), "--n", "300", "--epochs", "1", "--bootstrap", "50"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()

    for k in range(1, 7):
        assert f"[{k}/6] " in stdout
    assert "[SYNTHETIC DATA]" in stdout  # the evaluation summary is printed and labelled
    assert "ROC AUC" in stdout and "95% CI" in stdout

    (run,) = (out / "runs").iterdir()
    assert (run / "metrics_valid.json").exists()
    assert (run / "explain" / "top_losses.png").exists()
    report = (run / "report.html").resolve()
    assert report.exists()
    assert "SYNTHETIC DATA" in report.read_text(encoding="utf-8")
    # The report's absolute path is the very last line, ready to copy into a browser.
    assert lines[-1] == f"open this in a browser: {report}"
    assert Path(lines[-1].split(": ", 1)[1]).is_absolute()
