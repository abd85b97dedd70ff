"""The command line: help from docstrings, and bad input as one clear paragraph, no traceback."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from histodetect.cli.main import COMMANDS, build_parser, main
from tests.conftest import SHARED_SAMPLE


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "histodetect.cli", *args], capture_output=True, text=True
    )


def test_every_subcommand_has_help_from_its_docstring(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    overview = capsys.readouterr().out
    assert all(name in overview for name in COMMANDS)
    for name, (func, _) in COMMANDS.items():
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        assert func.__doc__.splitlines()[0] in capsys.readouterr().out


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("histodetect pack: error: ")
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_bad_inputs_each_give_a_clear_error(kaggle_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_error(run_cli("pack", str(empty), "--out", str(tmp_path / "s0")), "is empty")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "readme.txt").write_text("hi")
    _assert_clean_error(
        run_cli("pack", str(odd), "--out", str(tmp_path / "s1")),
        "not a recognised data folder",
        "train_labels.csv",
    )
    root = kaggle_dir(n=12)
    files = sorted((root / "train").glob("*.tif"))
    files[0].write_bytes(b"\x00" * 300)
    proc = run_cli("pack", str(root), "--out", str(tmp_path / "s2"), "--quiet")
    _assert_clean_error(proc, str(files[0]), "corrupt or truncated", "--skip-bad")
    tifffile.imwrite(files[0], np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    proc = run_cli("pack", str(root), "--out", str(tmp_path / "s2"), "--quiet")
    _assert_clean_error(proc, str(files[0]), "wrong size 32x32")
    files[1].unlink()
    proc = run_cli("pack", str(root), "--out", str(tmp_path / "s3"), "--quiet")
    _assert_clean_error(proc, f"{files[1]}: listed in train_labels.csv, no file")
    csv = root / "train_labels.csv"
    csv.write_text(csv.read_text().replace(",0\n", ",x\n", 1))
    _assert_clean_error(run_cli("pack", str(root), "--out", str(tmp_path / "s4")), "'x' is not 0")


def test_skip_bad_packs_the_rest(kaggle_dir, tmp_path, capsys):
    root = kaggle_dir(n=12)
    sorted((root / "train").glob("*.tif"))[3].write_bytes(b"junk")
    assert main(["pack", str(root), "--out", str(tmp_path / "s"), "--skip-bad", "--quiet"]) == 0
    assert "packed 11 patches" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("yaml_text", "needles"),
    [
        ("train: {loss: focal2, lr: -1}", ["train.loss: 'focal2'", "train.lr: -1", "'bce'"]),
        ("data: {mean: [0.5]}", ["data.mean: [0.5]", "list of 3 numbers"]),
        ("train: {epoch: 7}", ["train.epoch: unknown setting 'epoch'", "'epochs'"]),
    ],
)
def test_train_refuses_a_bad_config_at_once_before_reading_data(
    yaml_text, needles, kaggle_dir, tmp_path, private_cache
):
    data = SHARED_SAMPLE if SHARED_SAMPLE.exists() else kaggle_dir(n=12)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text + "\n")
    start = time.perf_counter()
    proc = run_cli(
        "train", "--data", str(data), "--config", str(config), "--out", str(tmp_path / "X")
    )
    assert time.perf_counter() - start < 5
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"histodetect train: error: {config}: ")
    assert proc.stderr.strip().count("\n") == 0, "one paragraph"
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    # Nothing was read or written: no store packed into the cache, no run folder.
    assert not any(private_cache.iterdir()) and not (tmp_path / "X").exists()


def test_a_split_that_cannot_hold_out_a_slide_warns_in_one_line(kaggle_dir, tmp_path, capsys):
    root = kaggle_dir(n=12)
    ids = (root / "train_labels.csv").read_text().split()[1:]
    rows = "".join(f"{line.split(',')[0]},only,0,0\n" for line in ids)
    (root / "meta.csv").write_text("id,slide,x,y\n" + rows)
    assert main(["pack", str(root), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("histodetect pack: warning: all 12 patches come from one slide (only)")
    assert err.count("\n") == 1
