"""Tiles of other sizes and resolutions become patches at the model's resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodetect.data.tiles import tile_patches
from histodetect.errors import HistodetectError

OOD = Path(__file__).resolve().parents[3] / "shared" / "ood" / "tiles"


def _tile(folder: Path, name: str, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path = folder / name
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_mixed_tile_sizes_each_give_the_patches_that_fit(tmp_path):
    files = [
        _tile(tmp_path, "a.png", 224),  # 115 px at 0.972: one patch, keeps its name
        _tile(tmp_path, "b.png", 512),  # 263 px: a 2 x 2 grid
        _tile(tmp_path, "c.png", 150),  # 77 px: smaller than a patch, named as a problem
    ]
    ids, patches, tiles, problems = tile_patches(files, 0.5)
    assert ids == ["a", "b_0_0", "b_0_1", "b_1_0", "b_1_1"]
    assert tiles.tolist() == [0, 1, 1, 1, 1]  # each patch's tile, by index in the files
    assert patches.shape == (5, 96, 96, 3) and patches.dtype == np.uint8
    assert len(problems) == 1 and problems[0][0].endswith("c.png")
    assert "smaller than one patch" in problems[0][1]
    with pytest.raises(HistodetectError, match="--mpp must be a positive"):
        tile_patches(files, 0.0)


def test_the_real_out_of_scope_tiles_resample_to_whole_patches():
    if not OOD.is_dir():
        pytest.skip(f"real out-of-scope tiles not found at {OOD} (only present in CI/dev)")
    files = sorted(OOD.iterdir())
    ids, patches, _, problems = tile_patches(files, 0.5)
    # 224 and 256 px tiles give one patch each, 512 px tiles four (README of ../shared/ood).
    sizes = [Image.open(f).size[0] for f in files]
    assert len(ids) == sum(4 if s == 512 else 1 for s in sizes) and not problems
    assert patches.std() > 10  # real tissue, not padding
