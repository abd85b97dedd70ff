"""The declared dependencies are the imported ones: `deptry src`, as `make test` runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPTRY = Path(sys.executable).with_name("deptry")


def _deptry(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DEPTRY, "src"], cwd=project, capture_output=True, text=True)


@pytest.mark.skipif(not DEPTRY.exists(), reason="deptry is in the dev extra")
def test_the_dependency_check_fails_on_a_stray_import_or_an_unused_declaration(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(
        ROOT / "src",
        tmp_path / "src",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "node_modules"),
    )
    ok = _deptry(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # An import nobody declared (rich arrives with a dev tool, not with histodetect).
    stray = tmp_path / "src" / "histodetect" / "stray.py"
    stray.write_text("import rich\n")
    bad = _deptry(tmp_path)
    assert bad.returncode == 1 and "'rich' imported but" in bad.stdout + bad.stderr
    # A declaration nobody imports.
    stray.unlink()
    toml = tmp_path / "pyproject.toml"
    toml.write_text(
        toml.read_text().replace('    "tqdm>=4.66",\n', '    "tqdm>=4.66",\n    "requests",\n')
    )
    unused = _deptry(tmp_path)
    assert unused.returncode == 1
    assert "'requests' defined as a dependency but not used" in unused.stdout + unused.stderr
