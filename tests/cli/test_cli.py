"""The command line: help from docstrings, and bad input as one clear paragraph, no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from histodetect.cli.main import COMMANDS, build_parser, main


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
