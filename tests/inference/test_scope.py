"""Out-of-scope statistics files: whole ones load, damaged ones are named in one line."""

from __future__ import annotations

import numpy as np
import pytest

from histodetect.errors import HistodetectError
from histodetect.inference.scope import load_scope, save_scope


def _stats(d: int = 4) -> dict[str, np.ndarray]:
    stats = {"threshold": np.array([1.0, 0.95], np.float32)}
    for name in ("0", "1", "lbp", "glcm"):
        stats |= {
            f"centre{name}": np.zeros(d, np.float32),
            f"spread{name}": np.ones(d, np.float32),
            f"means{name}": np.zeros((2, d), np.float32),
            f"precision{name}": np.eye(d, dtype=np.float32),
            f"scale{name}": np.array([0.0, 1.0], np.float32),
        }
    return stats


def test_whole_statistics_load(tmp_path):
    save_scope(tmp_path, _stats())
    assert set(load_scope(tmp_path)) == set(_stats())


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.pop("spread1"),  # standardised half-way
        lambda s: s.pop("meanslbp"),  # one texture set without the other
        lambda s: s.__setitem__("means7", s["means0"]),  # a set no run has
        lambda s: s["precision0"].__setitem__((0, 0), np.nan),
        lambda s: s["spread0"].__setitem__(1, 0.0),
        lambda s: s.__setitem__("scale0", np.zeros(3, np.float32)),
    ],
)
def test_damaged_statistics_are_named_in_one_line(tmp_path, damage):
    stats = _stats()
    damage(stats)
    save_scope(tmp_path, stats)
    with pytest.raises(HistodetectError) as err:
        load_scope(tmp_path)
    assert "scope.safetensors" in str(err.value) and "\n" not in str(err.value)
